# SPDX-License-Identifier: BSD-2-Clause
"""Reading saved fields back: what a hostile snapshot may put there is refused by name."""

from __future__ import annotations

import pytest
from hvf.snapshot_api import field_bytes, field_int


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
