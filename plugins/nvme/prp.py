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
        start = pages[0]
        if not start & _OFFSET and pages == list(range(start, start + len(pages) * PAGE, PAGE)):
            # One run of pages (a large buffer, the common case): one view with the
            # first page when they touch, checked at once.
            if prp1 + first == start:
                return [dma.view(prp1, first + rest)]
            return [dma.view(prp1, first), dma.view(start, rest)]
        segments = [[prp1, first]]
        for page in pages:
            if page & _OFFSET:
                raise PrpError(INVALID_PRP_OFFSET)
            size = min(PAGE, rest)
            rest -= size
            last = segments[-1]
            if last[0] + last[1] == page:
                last[1] += size
            else:
                segments.append([page, size])
        return [dma.view(gpa, size) for gpa, size in segments]
    except GuestMemoryError:
        raise PrpError(DATA_TRANSFER_ERROR) from None
