# SPDX-License-Identifier: BSD-2-Clause
"""Bounds-checked DMA: views, gather/scatter and ring fields, and a property test that
no helper ever touches memory outside the guest RAM it was asked for."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hvf.dma import GuestDma, Segment, memory_fence, read_views_into, write_views
from hvf.errors import GuestMemoryError
from hvf.memory import HIGHMEM_BASE, LOWMEM_LIMIT, GiB, GuestMemory, MiB, Region

SMALL = 64 * 1024
#: Both regions, sparse: low RAM up to the PCI hole and 2 MiB from 4 GiB.
HIGH = 3 * GiB + 2 * MiB
PAGE = 4096
#: Valid lists longer than this are left out of the property test, which compares
#: every byte they cover (the unit tests map huge ranges).
CHECKED_BYTES = 1 << 20


@contextmanager
def guest(size: int) -> Iterator[tuple[GuestMemory, GuestDma]]:
    # A memfd: its SEEK_DATA shows each page touched (anonymous RAM's huge pages would
    # count 2 MiB at a time).
    memory = GuestMemory(size, shared=True)
    try:
        yield memory, GuestDma(memory)
    finally:
        memory.close()


@pytest.fixture
def small() -> Iterator[tuple[GuestMemory, GuestDma]]:
    with guest(SMALL) as pair:
        yield pair


@pytest.fixture
def high() -> Iterator[tuple[GuestMemory, GuestDma]]:
    with guest(HIGH) as pair:
        yield pair


def test_view_is_writable_guest_ram_without_copy(small: tuple[GuestMemory, GuestDma]) -> None:
    memory, dma = small
    view = dma.view(0x100, 4)
    view[:] = b"abcd"
    assert memory.read(0x100, 4) == b"abcd"
    memory.write(0x102, b"Z")
    assert bytes(view) == b"abZd"


def test_view_reaches_exactly_the_end_of_ram(small: tuple[GuestMemory, GuestDma]) -> None:
    _, dma = small
    assert len(dma.view(SMALL - 8, 8)) == 8
    assert len(dma.view(SMALL, 0)) == 0
    with pytest.raises(GuestMemoryError, match=r"0xfff9 length 0x8 is not inside guest RAM"):
        dma.view(SMALL - 7, 8)


@pytest.mark.parametrize(("gpa", "length"), [
    (-1, 1), (0, -1), (-8, 16), (1 << 64, 0), ((1 << 64) - 1, 2), (1 << 70, 8), (SMALL, 1),
])
def test_view_refuses_hostile_ranges(small: tuple[GuestMemory, GuestDma], gpa: int,
                                     length: int) -> None:
    _, dma = small
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        dma.view(gpa, length)


def test_highmem_maps_after_lowmem_in_the_file(high: tuple[GuestMemory, GuestDma]) -> None:
    memory, dma = high
    assert [len(v) for v in dma.views([(0, LOWMEM_LIMIT), (HIGHMEM_BASE, 2 * MiB)],
                                      limit=HIGH)] == [LOWMEM_LIMIT, 2 * MiB]
    dma.view(HIGHMEM_BASE + 16, 3)[:] = b"top"
    assert memory.map[LOWMEM_LIMIT + 16 : LOWMEM_LIMIT + 19] == b"top"
    assert len(dma.view(LOWMEM_LIMIT - 4, 4)) == 4


@pytest.mark.parametrize(("gpa", "length"), [
    (LOWMEM_LIMIT - 4, 8),  # into the PCI hole
    (LOWMEM_LIMIT, 1),  # inside it
    (HIGHMEM_BASE - 1, 2),  # from the hole into high RAM
    (LOWMEM_LIMIT - 4, HIGHMEM_BASE - LOWMEM_LIMIT + 8),  # across it
    (HIGHMEM_BASE + 2 * MiB - 1, 2),  # past the end
])
def test_no_segment_spans_two_regions_or_the_hole(high: tuple[GuestMemory, GuestDma],
                                                  gpa: int, length: int) -> None:
    _, dma = high
    with pytest.raises(GuestMemoryError, match=f"{gpa:#x} length {length:#x}"):
        dma.view(gpa, length)


def test_views_checks_every_segment_and_the_total(small: tuple[GuestMemory, GuestDma]) -> None:
    _, dma = small
    views = dma.views([Segment(0, 4), (8, 2), Segment(SMALL - 1, 1)], limit=7)
    assert [len(v) for v in views] == [4, 2, 1]
    with pytest.raises(GuestMemoryError, match="longer than 0x6 bytes in total"):
        dma.views([Segment(0, 4), (8, 2), Segment(SMALL - 1, 1)], limit=6)
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        dma.views([Segment(0, 4), Segment(SMALL, 1)], limit=SMALL)


def test_gather_concatenates_segments(small: tuple[GuestMemory, GuestDma]) -> None:
    memory, dma = small
    memory.write(0x10, b"hello ")
    memory.write(0x400, b"world")
    segments = [Segment(0x10, 6), Segment(0x400, 5)]
    assert dma.gather(segments, limit=11) == b"hello world"
    out = bytearray(8)
    assert dma.gather_into(segments, out, limit=11) == 8
    assert out == b"hello wo"
    big = bytearray(b"." * 16)
    assert dma.gather_into(segments, memoryview(big), limit=11) == 11
    assert big == b"hello world....."


def test_scatter_stops_at_the_end_of_either_side(small: tuple[GuestMemory, GuestDma]) -> None:
    memory, dma = small
    segments = [Segment(0x20, 3), Segment(0x40, 4)]
    assert dma.scatter(segments, b"abcdefghij", limit=7) == 7
    assert memory.read(0x20, 4) == b"abc\0"
    assert memory.read(0x40, 5) == b"defg\0"
    assert dma.scatter(segments, b"XY", limit=7) == 2
    assert memory.read(0x20, 3) == b"XYc"


def test_scatter_writes_nothing_unless_every_segment_is_valid(
        small: tuple[GuestMemory, GuestDma]) -> None:
    memory, dma = small
    with pytest.raises(GuestMemoryError):
        dma.scatter([Segment(0x20, 3), Segment(SMALL - 1, 2)], b"abcde", limit=SMALL)
    with pytest.raises(GuestMemoryError, match="in total"):
        dma.scatter([Segment(0x20, 3), Segment(0x40, 3)], b"abcdef", limit=5)
    assert memory.read(0x20, 3) == b"\0\0\0"


def test_fixed_size_fields_are_little_endian(small: tuple[GuestMemory, GuestDma]) -> None:
    memory, dma = small
    dma.write_u16(0x10, 0x1234)
    dma.write_u32(0x20, 0x12345678)
    dma.write_u64(SMALL - 8, 0x0102030405060708)
    assert memory.read(0x10, 2) == b"\x34\x12"
    assert memory.read(0x20, 4) == b"\x78\x56\x34\x12"
    assert memory.read(SMALL - 8, 8) == bytes(range(8, 0, -1))
    assert (dma.read_u16(0x10), dma.read_u32(0x20), dma.read_u64(SMALL - 8)) == (
        0x1234, 0x12345678, 0x0102030405060708)
    for access in (dma.read_u16, dma.read_u32, dma.read_u64):
        with pytest.raises(GuestMemoryError):
            access(SMALL - 1)
    with pytest.raises(GuestMemoryError, match=f"{SMALL - 4:#x} length 0x8"):
        dma.write_u64(SMALL - 4, 0)


def test_view_helpers_copy_across_view_boundaries() -> None:
    parts = [memoryview(bytearray(3)), memoryview(bytearray(0)), memoryview(bytearray(4))]
    assert write_views(parts, b"abcdefghi") == 7
    assert [bytes(p) for p in parts] == [b"abc", b"", b"defg"]
    assert write_views(parts, b"") == 0
    out = bytearray(5)
    assert read_views_into(parts, out) == 5
    assert out == b"abcde"
    assert read_views_into(parts, bytearray(20)) == 7
    assert read_views_into([], out) == 0


def test_memory_fence_returns() -> None:
    memory_fence()
    memory_fence()


def test_views_outlive_the_memory_close() -> None:
    memory = GuestMemory(SMALL)
    view = GuestDma(memory).view(0, 4)
    memory.close()
    view[:] = b"safe"  # the mapping stays while a view holds it
    assert bytes(view) == b"safe"


# ---- property: a helper touches exactly the file offsets it should, or raises ----

_EDGES = (0, 1, PAGE - 1, PAGE, SMALL - 8, SMALL - 1, SMALL, LOWMEM_LIMIT - 8,
          LOWMEM_LIMIT - 1, LOWMEM_LIMIT, HIGHMEM_BASE - 1, HIGHMEM_BASE,
          HIGHMEM_BASE + 2 * MiB - 8, HIGHMEM_BASE + 2 * MiB, (1 << 63), (1 << 64) - 8,
          (1 << 64) - 1, 1 << 64)

gpas = st.one_of(
    st.sampled_from(_EDGES),
    st.builds(lambda e, d: e + d, st.sampled_from(_EDGES), st.integers(-16, 16)),
    st.integers(0, SMALL),
    st.integers(-(1 << 65), 1 << 65),
)
lengths = st.one_of(st.integers(0, 64), st.integers(-8, 8), st.sampled_from(
    [PAGE, SMALL, LOWMEM_LIMIT, HIGHMEM_BASE, 1 << 63, 1 << 64]),
    st.integers(-(1 << 65), 1 << 65))
plausible = st.one_of(
    st.tuples(st.integers(0, SMALL - 64), st.integers(0, 64)),
    st.tuples(st.integers(HIGHMEM_BASE - 64, HIGHMEM_BASE + 64), st.integers(0, 64)),
    st.tuples(st.integers(SMALL - 64, SMALL), st.integers(0, 64)),
    st.tuples(st.integers(LOWMEM_LIMIT - 64, LOWMEM_LIMIT), st.integers(0, 64)),
)
segment_lists = st.lists(st.one_of(plausible, plausible, st.tuples(gpas, lengths)), max_size=4)


def expected_offset(regions: tuple[Region, ...], gpa: int, length: int) -> int | None:
    """The file offset of a valid segment, None for one that must be refused."""
    if gpa < 0 or length < 0 or gpa + length > 1 << 64:
        return None
    for r in regions:
        if r.guest_base <= gpa and gpa + length <= r.guest_base + r.size:
            return r.file_offset + gpa - r.guest_base
    return None


def touched_pages(memory: GuestMemory) -> set[int]:
    """Pages of the (fresh, sparse) RAM file that anything wrote or read."""
    return {p for start, end in memory.data_extents() for p in range(start // PAGE, end // PAGE)}


def pattern(offset: int, length: int) -> bytes:
    """Non-zero bytes that depend on where they are, so a misplaced access shows."""
    return bytes((((offset + i) * 167 + ((offset + i) >> 8)) % 255) + 1 for i in range(length))


def pages_of(spans: list[tuple[int, int]]) -> set[int]:
    return {p for off, n in spans for p in range(off // PAGE, -(-(off + n) // PAGE))}


Segments = list[tuple[int, int]]
#: An operation under test: (dma, segments, limit, room, data) -> what it returned.
Operation = Callable[[GuestDma, Segments, int, int, bytes], object]


def _views(dma: GuestDma, segments: Segments, limit: int, room: int, data: bytes) -> object:
    """Map the segments, then write ``data`` through the views: a misplaced view shows."""
    return write_views(dma.views(segments, limit=limit), data)


def _gather(dma: GuestDma, segments: Segments, limit: int, room: int, data: bytes) -> object:
    return dma.gather(segments, limit=limit)


def _gather_into(dma: GuestDma, segments: Segments, limit: int, room: int,
                 data: bytes) -> object:
    out = bytearray(room)
    return bytes(out[: dma.gather_into(segments, out, limit=limit)])


def _scatter(dma: GuestDma, segments: Segments, limit: int, room: int, data: bytes) -> object:
    """``room`` bytes: the expected ones, then filler that must not land anywhere."""
    return dma.scatter(segments, data[:room].ljust(room, b"\xee"), limit=limit)


def _read_field(width: int) -> Operation:
    read = {2: GuestDma.read_u16, 4: GuestDma.read_u32, 8: GuestDma.read_u64}[width]
    return lambda dma, segments, limit, room, data: read(dma, segments[0][0])


def _write_field(width: int) -> Operation:
    write = {2: GuestDma.write_u16, 4: GuestDma.write_u32, 8: GuestDma.write_u64}[width]
    return lambda dma, segments, limit, room, data: write(
        dma, segments[0][0], int.from_bytes(data.ljust(width, b"\xee"), "little"))


#: name: (operation, whether it only reads, field width or None for a list)
OPERATIONS: dict[str, tuple[Operation, bool, int | None]] = {
    "views": (_views, False, None),
    "gather": (_gather, True, None),
    "gather_into": (_gather_into, True, None),
    "scatter": (_scatter, False, None),
    **{f"read_u{8 * w}": (_read_field(w), True, w) for w in (2, 4, 8)},
    **{f"write_u{8 * w}": (_write_field(w), False, w) for w in (2, 4, 8)},
}


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([SMALL, HIGH]), name=st.sampled_from(sorted(OPERATIONS)),
       segments=segment_lists,
       limit=st.sampled_from([0, 64, 256, SMALL, SMALL, 1 << 64, 1 << 64]),
       room=st.integers(0, 200))
def test_dma_never_touches_memory_outside_its_segments(
        size: int, name: str, segments: Segments, limit: int, room: int) -> None:
    operation, reads, width = OPERATIONS[name]
    if width:
        segments = [(segments[0][0] if segments else 0, width)]
        limit = width
    with guest(size) as (memory, dma):
        offsets = [expected_offset(memory.regions, g, n) for g, n in segments]
        valid = None not in offsets and sum(n for _, n in segments) <= limit
        assume(not valid or sum(n for _, n in segments) <= CHECKED_BYTES)
        spans = [(off, n) for off, (_, n) in zip(offsets, segments, strict=True)
                 if valid and off is not None]
        data = b"".join(pattern(off, n) for off, n in spans)  # in segment order
        if reads:
            for off, n in spans:
                memory.view[off : off + n] = pattern(off, n)
        before = touched_pages(memory)
        if not valid:
            with pytest.raises(GuestMemoryError):
                operation(dma, segments, limit, room, data)
            assert touched_pages(memory) == before, "a refused access touched memory"
            return
        result = operation(dma, segments, limit, room, data)
        if reads:
            expected = data[:room] if name == "gather_into" else data
            assert result == (int.from_bytes(data, "little") if width else expected)
            assert touched_pages(memory) == before, "a read strayed outside its segments"
            return
        count = min(room, len(data)) if name == "scatter" else len(data)
        if name in ("views", "scatter"):
            assert result == count
        image: dict[int, int] = {}
        for off, n in spans:
            take = min(n, count)
            image.update(zip(range(off, off + take), pattern(off, take)))
            count -= take
        assert touched_pages(memory) <= pages_of(spans)
        for page in touched_pages(memory):
            start = page * PAGE
            want = bytes(image.get(start + i, 0) for i in range(PAGE))
            assert memory.map[start : start + PAGE] == want, f"stray bytes in page {page:#x}"
