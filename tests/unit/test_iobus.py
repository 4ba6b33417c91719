# SPDX-License-Identifier: BSD-2-Clause
"""The port and MMIO registries: ownership, overlap refusal, lookup, moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvf.errors import ResourceConflict
from hvf.iobus import MmioBus, PortBus


def test_port_lookup_and_offsets() -> None:
    bus = PortBus()
    seen = []
    r = bus.register(0x3F8, 8, "com1", lambda off, size: off, lambda off, size, v: seen.append((off, v)))
    assert bus.lookup(0x3FB) is r and bus.lookup(0x3F7) is None and bus.lookup(0x400) is None
    assert r.read(0x3FB - r.base, 1) == 3
    r.write(2, 1, 0x55)
    assert seen == [(2, 0x55)]


def test_port_overlap_names_both_owners() -> None:
    bus = PortBus()
    bus.register(0x3F8, 8, "com1")
    with pytest.raises(ResourceConflict, match=r"0x3fc-0x3ff of debug .*0x3f8-0x3ff of com1"):
        bus.register(0x3FC, 4, "debug")
    assert bus.lookup(0x3FC).owner == "com1"


def test_port_range_outside_space() -> None:
    with pytest.raises(ResourceConflict, match="outside"):
        PortBus().register(0xFFFE, 4, "x")


def test_move_and_failed_move_keeps_old_place() -> None:
    bus = PortBus()
    a = bus.register(0x2000, 16, "a")
    bus.register(0x3000, 16, "b")
    a.move(0x2100)
    assert bus.lookup(0x2000) is None and bus.lookup(0x2105) is a
    with pytest.raises(ResourceConflict):
        a.move(0x2FF8)
    assert bus.lookup(0x2105) is a and a.base == 0x2100


def test_unmapped_range_moves_without_decoding() -> None:
    bus = MmioBus()
    r = bus.register(0xC000_0000, 0x1000, "bar", mapped=False)
    assert bus.lookup(0xC000_0000) is None
    r.move(0xC010_0000)
    r.map()
    assert bus.lookup(0xC010_0FFF) is r and bus.lookup(0xC010_1000) is None
    r.unmap()
    assert bus.lookup(0xC010_0000) is None


def test_mmio_overlap_both_sides() -> None:
    bus = MmioBus()
    bus.register(0x1000, 0x1000, "mid")
    for base, size in ((0x800, 0x900), (0x1FFF, 2), (0x1100, 0x10), (0, 0x10000)):
        with pytest.raises(ResourceConflict, match="mid"):
            bus.register(base, size, "new")
    bus.register(0x2000, 0x10, "after")
    bus.register(0x0, 0x1000, "before")
    assert [r.owner for r in bus.ranges()] == ["before", "mid", "after"]


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 12)), max_size=30),
       st.lists(st.integers(0, (1 << 20) + (1 << 12)), max_size=50))
def test_mmio_lookup_agrees_with_linear_scan(ranges: list[tuple[int, int]], probes: list[int]) -> None:
    bus = MmioBus()
    accepted = []
    for i, (base, size) in enumerate(ranges):
        try:
            accepted.append(bus.register(base, size, f"r{i}"))
        except ResourceConflict:
            assert any(r.base < base + size and base < r.end for r in accepted)
    for addr in probes:
        expected = [r for r in accepted if r.base <= addr < r.end]
        assert len(expected) <= 1
        assert bus.lookup(addr) is (expected[0] if expected else None)
