# SPDX-License-Identifier: BSD-2-Clause
"""Runs of guest pages: found in dirty bitmaps, in hvf's own write marks and in guest
RAM's data, merged, cut into PAGES messages, and read back from them.

A run is ``(first page, page count)`` in the RAM file's layout (:mod:`hvf.memory`:
low memory, then memory above 4 GiB). A PAGES payload is::

    u32 n                           runs in this message, 1 .. MAX_RUNS
    n × (u64 offset, u32 pages)     offset in bytes, page-aligned; pages >= 1
    the bytes of every run, in order

and a receiver checks the whole table, every run inside guest RAM and the payload's
length against it, before a byte lands in guest RAM.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from hvf._pages import ffi, lib
from hvf.errors import MigrationError
from hvf.extents import PAGE

if TYPE_CHECKING:
    from hvf.memory import GuestMemory

Run = tuple[int, int]

#: Pages in one PAGES message (4 MiB) and runs in its table.
MAX_PAGES = 1024
MAX_RUNS = 1024
COUNT = struct.Struct("<I")
ENTRY = struct.Struct("<QI")
#: The largest PAGES payload.
MAX_PAYLOAD = COUNT.size + MAX_RUNS * ENTRY.size + MAX_PAGES * PAGE

_MARKED = re.compile(rb"[^\0]+")
_FULL_WORD = (1 << 64) - 1


def bitmap_runs(words: memoryview, first_page: int = 0) -> list[Run]:
    """The runs of set bits in a KVM dirty bitmap (64-bit words, bit i of word w is
    page ``first_page + 64 * w + i``)."""
    runs: list[Run] = []
    start = end = -1
    for w, word in enumerate(words):
        if not word:
            continue
        base = first_page + 64 * w
        if word == _FULL_WORD:
            if base == end:
                end += 64
            else:
                if start >= 0:
                    runs.append((start, end - start))
                start, end = base, base + 64
            continue
        while word:
            low = word & -word
            bit = low.bit_length() - 1
            page = base + bit
            if page == end:
                end += 1
            else:
                if start >= 0:
                    runs.append((start, end - start))
                start, end = page, page + 1
            word ^= low
    if start >= 0:
        runs.append((start, end - start))
    return runs


def mark_runs(marks: bytes | bytearray) -> list[Run]:
    """The runs of non-zero bytes in a page map (one byte per page)."""
    return [(m.start(), m.end() - m.start()) for m in _MARKED.finditer(marks)]


def extent_runs(extents: Iterable[tuple[int, int]]) -> list[Run]:
    """Page-aligned ``(start, end)`` byte extents as runs."""
    return [(start // PAGE, (end - start) // PAGE) for start, end in extents if end > start]


def union(*lists: Iterable[Run]) -> list[Run]:
    """Every page of any of ``lists``, as sorted, disjoint, maximal runs."""
    merged: list[Run] = []
    for start, count in sorted(run for runs in lists for run in runs):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            last_start, last_count = merged[-1]
            merged[-1] = (last_start, max(last_count, start + count - last_start))
        else:
            merged.append((start, count))
    return merged


def pages_in(runs: Iterable[Run]) -> int:
    return sum(count for _, count in runs)


def data_runs(memory: GuestMemory) -> list[Run]:
    """The runs of non-zero pages of guest RAM (inside its data extents): what a copy
    must send first, the rest being zero there already."""
    base = ffi.cast("const unsigned char *", memory.host_addr)
    run_end = ffi.new("size_t *")
    runs: list[Run] = []
    for start, end in memory.data_extents():
        first, last = start // PAGE, end // PAGE
        i = first
        while (i := lib.hvf_nonzero_run(base, last, i, run_end)) < last:
            runs.append((i, run_end[0] - i))
            i = run_end[0]
    return runs


def batches(runs: Iterable[Run], max_pages: int = MAX_PAGES) -> Iterator[list[Run]]:
    """``runs`` cut into the tables of PAGES messages (at most ``max_pages`` pages, no
    more than :data:`MAX_PAGES`, and :data:`MAX_RUNS` runs each)."""
    max_pages = min(max_pages, MAX_PAGES)
    batch: list[Run] = []
    room = max_pages
    for start, count in runs:
        while count:
            take = min(count, room)
            batch.append((start, take))
            start, count, room = start + take, count - take, room - take
            if not room or len(batch) == MAX_RUNS:
                yield batch
                batch, room = [], max_pages
    if batch:
        yield batch


def encode_table(runs: list[Run]) -> bytes:
    return COUNT.pack(len(runs)) + b"".join(ENTRY.pack(start * PAGE, count)
                                             for start, count in runs)


def table_size(count: int) -> int:
    return COUNT.size + count * ENTRY.size


def decode_count(head: bytes, length: int) -> int:
    """The run count of a PAGES payload of ``length`` bytes, from its first 4."""
    (count,) = COUNT.unpack(head)
    if not 1 <= count <= MAX_RUNS or table_size(count) > length:
        raise MigrationError(f"a PAGES message of {length} bytes claims {count} runs "
                             f"(1 to {MAX_RUNS}, and the table must fit)")
    return count


def decode_table(table: bytes, count: int, length: int, ram_size: int) -> list[Run]:
    """The runs of a PAGES table, each inside guest RAM of ``ram_size`` bytes, their
    pages exactly filling the ``length``-byte payload after the table."""
    runs: list[Run] = []
    total = 0
    for i in range(count):
        offset, pages = ENTRY.unpack_from(table, i * ENTRY.size)
        if offset % PAGE or not 1 <= pages <= MAX_PAGES or offset + pages * PAGE > ram_size:
            raise MigrationError(f"PAGES run {i} ({pages} pages at offset {offset:#x}) is "
                                 f"not whole pages inside guest RAM ({ram_size:#x} bytes)")
        runs.append((offset // PAGE, pages))
        total += pages
    if total > MAX_PAGES or table_size(count) + total * PAGE != length:
        raise MigrationError(f"a PAGES message of {length} bytes holds {count} runs of "
                             f"{total} pages in all (at most {MAX_PAGES}, and they must "
                             f"fill it)")
    return runs
