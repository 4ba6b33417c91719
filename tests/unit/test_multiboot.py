# SPDX-License-Identifier: BSD-2-Clause
"""Finding and validating multiboot headers (no guest runs here)."""

from __future__ import annotations

import struct

from hvf.loader.multiboot import FLAG_ADDRESSES, HEADER_MAGIC, Header, find_header


def header(flags: int, extra: bytes = b"", checksum_delta: int = 0) -> bytes:
    checksum = (-(HEADER_MAGIC + flags) + checksum_delta) & 0xFFFFFFFF
    return struct.pack("<III", HEADER_MAGIC, flags, checksum) + extra


def test_header_found_on_4_byte_boundary_within_8k() -> None:
    image = bytes(4096) + header(3) + bytes(100)
    assert find_header(image) == Header(4096, 3)
    assert find_header(bytes(8192) + header(3)) is None  # too far in
    assert find_header(bytes(4098) + header(3)) is None  # misaligned


def test_bad_checksum_is_not_a_header() -> None:
    assert find_header(header(3, checksum_delta=1) + bytes(64)) is None


def test_address_fields() -> None:
    fields = struct.pack("<5I", 0x100000, 0x100000, 0x101000, 0x102000, 0x10000C)
    h = find_header(header(FLAG_ADDRESSES | 3, fields))
    assert h == Header(0, FLAG_ADDRESSES | 3, 0x100000, 0x100000, 0x101000, 0x102000, 0x10000C)
    assert find_header(header(FLAG_ADDRESSES, b"\0" * 8)) is None  # truncated fields
