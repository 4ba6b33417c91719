# SPDX-License-Identifier: BSD-2-Clause
"""SMBIOS tables built from bhyve's configuration variables."""

from __future__ import annotations

import struct

import pytest

from hvf import smbios
from hvf.config import Config
from hvf.errors import ConfigError


def parse(table: bytes) -> list[tuple[int, bytes, list[bytes]]]:
    """(type, formatted area, strings) of each structure."""
    out, pos = [], 0
    while pos < len(table):
        kind, length = table[pos], table[pos + 1]
        formatted = table[pos + 4 : pos + length]
        end = table.index(b"\0\0", pos + length)
        strings = [s for s in table[pos + length : end].split(b"\0") if s]
        out.append((kind, formatted, strings))
        pos = end + 2
    return out


def test_entry_point_checksums_and_counts() -> None:
    anchor, table = smbios.build(Config())
    assert len(anchor) == 31 and anchor[:4] == b"_SM_" and anchor[16:21] == b"_DMI_"
    assert sum(anchor) & 0xFF == 0 and sum(anchor[16:]) & 0xFF == 0
    length, _address, count = struct.unpack_from("<HIH", anchor, 22)
    structures = parse(table)
    assert length == len(table) and count == len(structures)
    assert [s[0] for s in structures] == [0, 1, 3, 32, 127]


def test_strings_and_uuid_come_from_the_config() -> None:
    config = Config({"system.manufacturer": "ACME", "system.product_name": "Box",
                     "uuid": "12345678-9abc-def0-1122-334455667788", "bios.vendor": "V"})
    structures = {s[0]: s for s in parse(smbios.build(config)[1])}
    _kind, formatted, strings = structures[1]
    assert strings[:2] == [b"ACME", b"Box"]
    # the first three UUID fields are stored little-endian
    assert formatted[4:20] == bytes.fromhex("78563412bc9af0de1122334455667788")
    assert structures[0][2][0] == b"V"


def test_bad_uuid() -> None:
    with pytest.raises(ConfigError, match="invalid uuid 'nope'"):
        smbios.build(Config({"uuid": "nope"}))
