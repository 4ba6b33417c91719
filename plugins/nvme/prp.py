# SPDX-License-Identifier: BSD-2-Clause
"""Physical Region Page entries and lists (NVMe 1.4 §4.3): a command's data buffer as
views of guest RAM.

PRP1 addresses the first page, at a dword-aligned offset. What does not fit in the
rest of that page is either the one page PRP2 addresses (offset 0) or, past two pages,
in the pages listed from PRP2, a PRP list: qword entries of page addresses, whose last
entry, when more pages follow than fit in the list's page, points to the next list
page (page-aligned). Pages that follow each other in guest-physical memory become one
view. Every page and every list is checked against guest RAM before any byte moves.
A next list must be page-aligned, so each adds 511 pages: even a list that points to
itself ends when the transfer has its pages.
"""

from __future__ import annotations

import struct
from functools import reduce
from operator import or_, sub

from hvf.dma import GuestDma
from hvf.errors import GuestMemoryError
from hvf.plugins.nvme.spec import DATA_TRANSFER_ERROR, INVALID_PRP_OFFSET, PAGE

_ENTRY = 8
_OFFSET = PAGE - 1


class PrpError(Exception):
    """A data pointer the controller refuses; ``status`` is the completion's status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"PRP status {status:#x}")
        self.status = status


def _list_pages(dma: GuestDma, pointer: int, pages: int) -> list[int]:
    """The addresses of ``pages`` pages listed from ``pointer`` (a PRP list)."""
    found: list[int] = []
    if pointer & (_ENTRY - 1):
        raise PrpError(INVALID_PRP_OFFSET)
    while True:
        room = (PAGE - (pointer & _OFFSET)) // _ENTRY
        wanted = pages - len(found)
        if wanted <= room:
            found.extend(struct.unpack_from(f"<{wanted}Q", dma.view(pointer, wanted * _ENTRY)))
            return found
        # More than fit: the page's last entry points to the next list.
        *entries, pointer = struct.unpack_from(f"<{room}Q", dma.view(pointer, room * _ENTRY))
        if pointer & _OFFSET:
            raise PrpError(INVALID_PRP_OFFSET)
        found.extend(entries)


def prp_views(dma: GuestDma, prp1: int, prp2: int, length: int) -> list[memoryview]:
    """Views of the ``length`` bytes PRP1 and PRP2 describe, or :class:`PrpError`."""
    if prp1 & 3:
        raise PrpError(INVALID_PRP_OFFSET)
    try:
        first = min(length, PAGE - (prp1 & _OFFSET))
        rest = length - first
        if not rest:
            return [dma.view(prp1, first)]
        if rest <= PAGE:
            if prp2 & _OFFSET:
                raise PrpError(INVALID_PRP_OFFSET)
            pages = [prp2]
        else:
            pages = _list_pages(dma, prp2, (rest + _OFFSET) // PAGE)
        return [dma.view(gpa, size) for gpa, size in _segments(prp1, first, pages, rest)]
    except GuestMemoryError:
        raise PrpError(DATA_TRANSFER_ERROR) from None


def _segments(prp1: int, first: int, pages: list[int], rest: int) -> list[tuple[int, int]]:
    """The (address, length) runs of PRP1's ``first`` bytes and then ``rest`` bytes in
    ``pages``, pages that follow each other in guest-physical memory joined."""
    start = pages[0]
    count = len(pages)
    if pages == list(range(start, start + count * PAGE, PAGE)):
        if start & _OFFSET:
            raise PrpError(INVALID_PRP_OFFSET)
        cuts = [count]  # one run: a large buffer, the common case
    else:
        if reduce(or_, pages) & _OFFSET:
            raise PrpError(INVALID_PRP_OFFSET)
        steps = map(sub, pages[1:], pages)
        cuts = [i for i, step in enumerate(steps, 1) if step != PAGE]
        cuts.append(count)
    segments = []
    begin = 0
    for cut in cuts:
        segments.append((pages[begin], (cut - begin) * PAGE))
        begin = cut
    address, length = segments[-1]  # the last page holds what is left
    segments[-1] = (address, length - (count * PAGE - rest))
    if prp1 + first == start:
        segments[0] = (prp1, first + segments[0][1])
    else:
        segments.insert(0, (prp1, first))
    return segments
