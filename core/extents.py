# SPDX-License-Identifier: BSD-2-Clause
"""Where guest RAM may hold data: the parts of a file, or of a copy-on-write mapping,
outside of which every byte is known to be zero.

A fresh guest's anonymous RAM holds pages only where something wrote, which
``/proc/self/pagemap`` shows (in 2 MiB steps where they are huge pages); a memfd
answers ``SEEK_DATA``/``SEEK_HOLE``: pages the guest never touched are holes. A
restored guest runs on its snapshot's RAM file mapped ``MAP_PRIVATE``: a page holds
either the file's bytes or, once written, a private copy, and ``/proc/self/pagemap``
says which. So its data lies in the file's data extents plus its private pages, and a
save need not read the rest (reading it would fault in every page of the file's
holes).

Extents are page-aligned ``(start, end)`` offsets, sorted and disjoint.
"""

from __future__ import annotations

import errno
import heapq
import os
from collections.abc import Iterable, Iterator

from hvf._pages import ffi, lib

PAGE = lib.HVF_PAGE_SIZE
#: Private runs closer than this are reported as one extent (the save scans the gap,
#: file pages, rather than handling thousands of small extents).
COALESCE = 1 << 20
#: Pagemap entries read at a time (8 bytes each).
PAGEMAP_BATCH = 1 << 18

Extent = tuple[int, int]


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def file_extents(fd: int, size: int) -> Iterator[Extent]:
    """The data extents of the first ``size`` bytes of ``fd``; all of it where the
    file system cannot say."""
    try:
        pos = os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data at all
            return
        yield (0, size)  # SEEK_DATA unsupported here
        return
    last = 0
    while pos < size:
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        start = max(pos - pos % PAGE, last)  # whole pages, each once
        end = min(_round_up(hole), size)
        if end > start:
            yield (start, end)
            last = end
        try:
            pos = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise


def private_extents(address: int, size: int, pagemap: str = "/proc/self/pagemap", *,
                    coalesce: int = COALESCE) -> list[Extent]:
    """Offsets into the mapping at ``address`` (``size`` bytes, ``MAP_PRIVATE`` of a
    file, or anonymous) of the pages this process holds its own copy of (present or
    swapped anonymous pages; not the shared zero page a read maps), runs less than
    ``coalesce`` bytes apart merged. All of it if the pagemap cannot be read."""
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return [(0, size)]
    found: list[Extent] = []
    try:
        first = address // PAGE
        total = size // PAGE
        buf = bytearray(8 * PAGEMAP_BATCH)
        entries = ffi.cast("uint64_t *", ffi.from_buffer(buf))
        end_out = ffi.new("size_t *")
        open_run: list[int] = []  # [start, end] in pages, not yet in found
        for base in range(0, total, PAGEMAP_BATCH):
            n = min(PAGEMAP_BATCH, total - base)
            got = os.preadv(fd, [memoryview(buf)[:8 * n]], 8 * (first + base))
            if got != 8 * n:
                raise OSError(errno.EIO, f"short read of {pagemap}")
            i = 0
            while (i := lib.hvf_private_run(entries, n, i, end_out)) < n:
                start, i = base + i, int(end_out[0])
                if open_run and start - open_run[1] < max(coalesce // PAGE, 1):
                    open_run[1] = base + i
                else:
                    if open_run:
                        found.append((open_run[0] * PAGE, open_run[1] * PAGE))
                    open_run = [start, base + i]
        if open_run:
            found.append((open_run[0] * PAGE, open_run[1] * PAGE))
    except OSError:
        return [(0, size)]
    finally:
        os.close(fd)
    return found


def union(*sources: Iterable[Extent]) -> Iterator[Extent]:
    """The union of sorted extent lists, as sorted disjoint extents."""
    current: list[int] = []
    for start, end in heapq.merge(*sources):
        if current and start <= current[1]:
            current[1] = max(current[1], end)
            continue
        if current:
            yield (current[0], current[1])
        current = [start, end]
    if current:
        yield (current[0], current[1])
