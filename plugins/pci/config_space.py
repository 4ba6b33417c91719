# SPDX-License-Identifier: BSD-2-Clause
"""A PCI function's type-0 configuration space: register offsets and bits, the base
address registers (:class:`Bar`), and the record a snapshot keeps of a function
(:class:`PciFunctionState`)."""

from __future__ import annotations

import attrs

from hvf.iobus import Range, ReadFn, WriteFn
from hvf.snapshot_api import Fields, check_fields, field_bytes

# Config space offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
CONFIG_SPACE_SIZE = 256
FIRST_CAPABILITY = 0x40

#: Registers a device's model fixes (offset, size): a restore must find them unchanged.
IDENTITY_REGISTERS = (
    (VENDOR_ID, 2), (DEVICE_ID, 2), (REVISION_ID, 4), (HEADER_TYPE, 1),
    (SUBSYSTEM_VENDOR_ID, 4), (CAPABILITIES_POINTER, 1), (INTERRUPT_PIN, 1),
)

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
#: Command bits a guest may set (bhyve's: 0-6, 8, 9, 10).
COMMAND_WRITABLE = 0x077F
STATUS_CAPABILITIES = 1 << 4
STATUS_INTERRUPT = 1 << 3

BAR_IO = "io"
BAR_MEM32 = "mem32"
BAR_MEM64 = "mem64"
#: The expansion ROM (:meth:`PciDevice.set_rom`), not one of the six BARs.
BAR_ROM = "rom"
MIN_BAR_SIZE = {BAR_IO: 4, BAR_MEM32: 16, BAR_MEM64: 16}


@attrs.define(slots=True)
class Bar:
    """A base address register and the range it decodes."""

    index: int
    kind: str
    size: int
    read: ReadFn
    write: WriteFn
    prefetchable: bool = False
    address: int = 0
    range: Range | None = None

    @property
    def label(self) -> str:
        return "ROM" if self.kind == BAR_ROM else f"BAR{self.index}"

    @property
    def low_bits(self) -> int:
        if self.kind == BAR_IO:
            return 0x1
        if self.kind == BAR_ROM:
            return 0
        return (0x4 if self.kind == BAR_MEM64 else 0x0) | (0x8 if self.prefetchable else 0)

    @property
    def decode_bit(self) -> int:
        return COMMAND_IO if self.kind == BAR_IO else COMMAND_MEMORY


@attrs.define
class PciFunctionState:
    """What a snapshot holds of a PCI function: config space (the expansion ROM
    register with it), where each BAR was, and the INTx level its model drove."""

    config: bytes
    bar_addresses: list[int]
    intx_level: bool

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields) -> PciFunctionState:
        """Rebuild from :meth:`to_fields`; ``ValueError`` names a bad field (whether the
        values fit a given device is :meth:`PciDevice.restore_state`'s to check)."""
        check_fields(fields, attrs.fields_dict(cls))
        addresses, level = fields["bar_addresses"], fields["intx_level"]
        if not isinstance(addresses, list) or len(addresses) != 6 or any(
                type(a) is not int or not 0 <= a < 1 << 64 for a in addresses):
            raise ValueError("saved BAR addresses are not a list of 6 (field 'bar_addresses')")
        if type(level) is not bool:
            raise ValueError("saved field 'intx_level' is not a bool")
        return cls(field_bytes(fields, "config", size=CONFIG_SPACE_SIZE), list(addresses),
                   level)
