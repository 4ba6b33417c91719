# SPDX-License-Identifier: BSD-2-Clause
"""SMBIOS tables (DMI) describing the machine, from bhyve's configuration variables.

Firmware gets them through fw_cfg (``etc/smbios/smbios-anchor`` and
``etc/smbios/smbios-tables``, as QEMU provides them) and only links them into memory.
Structures: BIOS information (type 0), system (1), chassis (3), system boot (32), end
(127). Strings come from ``bios.vendor``, ``bios.version``, ``bios.release_date``,
``system.manufacturer``, ``system.product_name``, ``system.version``,
``system.serial_number``, ``system.sku``, ``system.family_name`` and ``uuid``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import hvf
from hvf.errors import ConfigError

if TYPE_CHECKING:
    from hvf.config import Config

SMBIOS_MAJOR, SMBIOS_MINOR = 2, 8
BIOS_START_SEGMENT = 0xE800
WAKEUP_POWER_SWITCH = 6
CHASSIS_OTHER = 1
STATE_SAFE = 3
SECURITY_NONE = 3
BIOS_CHARACTERISTICS_UNSUPPORTED = 1 << 3
BIOS_EXT2_VM = 1 << 4  # characteristics extension byte 2: this is a virtual machine

DEFAULTS = {
    "bios.vendor": "hvf",
    "bios.version": hvf.__version__,
    "bios.release_date": "11/23/2026",
    "system.manufacturer": "hvf",
    "system.product_name": "hvf",
    "system.version": "1.0",
    "system.serial_number": "None",
    "system.sku": "None",
    "system.family_name": "Virtual Machine",
}


class _Structure:
    """One SMBIOS structure: formatted area, then its strings."""

    def __init__(self, kind: int, handle: int) -> None:
        self.kind = kind
        self.handle = handle
        self.fields = bytearray()
        self.strings: list[bytes] = []

    def string(self, text: str) -> int:
        """Add a string; returns its number (0 means none)."""
        if not text:
            return 0
        self.strings.append(text.encode("ascii", "replace"))
        return len(self.strings)

    def encode(self) -> bytes:
        header = struct.pack("<BBH", self.kind, 4 + len(self.fields), self.handle)
        tail = b"".join(s + b"\0" for s in self.strings) + b"\0" if self.strings else b"\0\0"
        return header + bytes(self.fields) + tail


def _uuid(config: Config) -> bytes:
    text = config.get("uuid")
    if not text:
        return bytes(16)
    import uuid  # only for a configured UUID: uuid loads libuuid

    try:
        value = uuid.UUID(text)
    except ValueError:
        raise ConfigError(f"invalid uuid '{text}'") from None
    return value.bytes_le  # SMBIOS stores the first three fields little-endian


def build(config: Config) -> tuple[bytes, bytes]:
    """(entry point, structure table); the entry point's table address is left 0 for
    the firmware to fill in, as with QEMU's fw_cfg files."""

    def get(key: str) -> str:
        return config.get(key) or DEFAULTS[key]

    structures = []
    bios = _Structure(0, 0)
    vendor, version = bios.string(get("bios.vendor")), bios.string(get("bios.version"))
    date = bios.string(get("bios.release_date"))
    bios.fields += struct.pack("<BBHBBQBBBBBB", vendor, version, BIOS_START_SEGMENT, date, 0,
                               BIOS_CHARACTERISTICS_UNSUPPORTED, 0, BIOS_EXT2_VM, 0, 0,
                               0xFF, 0xFF)
    structures.append(bios)

    system = _Structure(1, 0x100)
    fields = [system.string(get(k)) for k in ("system.manufacturer", "system.product_name",
                                               "system.version", "system.serial_number")]
    system.fields += struct.pack("<BBBB", *fields) + _uuid(config)
    system.fields += struct.pack("<BBB", WAKEUP_POWER_SWITCH, system.string(get("system.sku")),
                                 system.string(get("system.family_name")))
    structures.append(system)

    chassis = _Structure(3, 0x300)
    manufacturer = chassis.string(get("system.manufacturer"))
    chassis.fields += struct.pack("<BBBBBBBBBIBBBB", manufacturer, CHASSIS_OTHER, 0, 0, 0,
                                  STATE_SAFE, STATE_SAFE, STATE_SAFE, SECURITY_NONE, 0,
                                  0, 0, 0, 0)
    structures.append(chassis)

    boot = _Structure(32, 0x2000)
    boot.fields += bytes(6) + b"\0"  # reserved, "no errors detected"
    structures.append(boot)
    structures.append(_Structure(127, 0x7F00))

    encoded = [s.encode() for s in structures]
    table = b"".join(encoded)
    intermediate = b"_DMI_" + struct.pack("<BHIHB", 0, len(table), 0, len(encoded),
                                          SMBIOS_MAJOR << 4 | SMBIOS_MINOR)
    intermediate = intermediate[:5] + bytes([-sum(intermediate) & 0xFF]) + intermediate[6:]
    anchor = b"_SM_" + struct.pack("<BBBBHB5s", 0, 0x1F, SMBIOS_MAJOR, SMBIOS_MINOR,
                                   max(len(e) for e in encoded), 0, bytes(5)) + intermediate
    anchor = anchor[:4] + bytes([-sum(anchor) & 0xFF]) + anchor[5:]
    return anchor, table
