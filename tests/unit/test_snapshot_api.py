# SPDX-License-Identifier: BSD-2-Clause
"""Reading saved fields back: what a hostile snapshot may put there is refused by name;
chunk versions: upgraded step by step, a newer one refused."""

from __future__ import annotations

from typing import Any

import pytest
from hvf.errors import SnapshotError
from hvf.snapshot_api import (
    Chunk,
    StateWriter,
    check_fields,
    field_bytes,
    field_flags,
    field_int,
    upgrade,
)


@pytest.mark.parametrize("value", [-1, 256, 1 << 70, 3.5, True, None, "7", b"\x07"])
def test_field_int_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="saved field 'reg' is not an unsigned integer of 8 bits"):
        field_int({"reg": value}, "reg", 8)


def test_field_int_accepts_the_range() -> None:
    assert [field_int({"r": v}, "r", 8) for v in (0, 0x7F, 0xFF)] == [0, 0x7F, 0xFF]
    with pytest.raises(ValueError, match="saved field 'r' is missing"):
        field_int({}, "r", 8)


def test_field_bytes() -> None:
    assert field_bytes({"b": b"abc"}, "b", size=3) == b"abc"
    assert field_bytes({"b": b""}, "b", max_size=3) == b""
    with pytest.raises(ValueError, match="'b' is not a byte string of 4 bytes"):
        field_bytes({"b": b"abc"}, "b", size=4)
    with pytest.raises(ValueError, match="'b' is not a byte string of at most 2 bytes"):
        field_bytes({"b": b"abc"}, "b", max_size=2)
    for bad in (100, [1, 2], "abc", bytearray(b"abc"), None):
        with pytest.raises(ValueError, match="'b' is not a byte string"):
            field_bytes({"b": bad}, "b")


def test_field_flags() -> None:
    assert field_flags({"f": 0x81}, "f", 8, 0x81) == 0x81
    with pytest.raises(ValueError, match="saved field 'f' has bits outside 0x81 set \\(0x3\\)"):
        field_flags({"f": 3}, "f", 8, 0x81)
    with pytest.raises(ValueError, match="'f' is not an unsigned integer of 8 bits"):
        field_flags({"f": 0x100}, "f", 8, 0x1FF)


def test_check_fields() -> None:
    check_fields({"a": 1, "b": 2}, ("a", "b"))
    with pytest.raises(ValueError, match="saved field 'b' is missing"):
        check_fields({"a": 1}, ("a", "b"))
    with pytest.raises(ValueError, match="saved field 'c' is unknown"):
        check_fields({"a": 1, "b": 2, "d": 0, "c": 3}, ("a", "b", "d"))


def _step(version: int) -> Any:
    return lambda fields: {**fields, "steps": [*fields["steps"], version]}


def test_upgrade_runs_each_step_from_the_chunk_version() -> None:
    steps = {1: _step(1), 2: _step(2), 3: _step(3)}
    chunk = Chunk("device.x", "o", 2, {"steps": []})
    assert upgrade(chunk, 4, steps) == {"steps": [2, 3]}
    assert upgrade(Chunk("device.x", "o", 4, {"steps": []}), 4, steps) == {"steps": []}
    assert chunk.fields == {"steps": []}  # the chunk itself is left alone


def test_upgrade_refuses_newer_and_gaps() -> None:
    with pytest.raises(SnapshotError, match="'device.x' was saved by a newer hvf \\(state "
                                            "version 5; this hvf reads up to 4\\)"):
        upgrade(Chunk("device.x", "o", 5, {}), 4, {})
    with pytest.raises(SnapshotError, match="'device.x': no upgrade from state version 2 to 3"):
        upgrade(Chunk("device.x", "o", 1, {"steps": []}), 3, {1: _step(1)})


def test_a_second_chunk_of_the_same_name_names_both_owners() -> None:
    """A plugin that saved one of its devices itself would clash with the core's chunk."""
    writer = StateWriter()
    writer.add(name="device.rtc", owner="hvf.plugins.lpc.rtc", version=2, fields={})
    with pytest.raises(SnapshotError, match="two chunks named 'device.rtc' \\(owners "
                                            "hvf.plugins.lpc.rtc and myplugin\\)"):
        writer.add(name="device.rtc", owner="myplugin", version=1, fields={})
