# SPDX-License-Identifier: BSD-2-Clause
"""The MSI-X capability (PCI Local Bus 3.0 §6.8.2): vector table and PBA in a BAR.

A device adds the capability, places the table and the pending-bit array at offsets of
one of its memory BARs and forwards that BAR's accesses there to
:meth:`MsixCapability.table_read` / :meth:`~MsixCapability.table_write` /
:meth:`~MsixCapability.pba_read`. Each table entry is backed by an
:class:`hvf.interrupts.MsiVector`: a vector is bound to KVM (its irqfd) only while
MSI-X is enabled and neither the function nor the entry is masked; a trigger while
masked sets the pending bit, and unmasking delivers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from hvf.errors import DeviceError
from hvf.snapshot_api import Fields, check_fields, field_bytes

if TYPE_CHECKING:
    from hvf.interrupts import InterruptController, MsiVector
    from hvf.plugins.pci.device import PciDevice

CAP_ID_MSIX = 0x11
ENTRY_SIZE = 16
MAX_VECTORS = 2048
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
ENTRY_MASKED = 1 << 0
#: Offsets inside a table entry.
ADDRESS_LO, ADDRESS_HI, DATA, VECTOR_CONTROL = 0, 4, 8, 12


@attrs.define
class MsixState:
    """What a snapshot holds of MSI-X beyond config space: the vector table and the
    pending bits."""

    table: bytes
    pending: bytes

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields, count: int) -> MsixState:
        """Rebuild for ``count`` vectors; ``ValueError`` names a bad field."""
        check_fields(fields, attrs.fields_dict(cls))
        return cls(field_bytes(fields, "table", size=count * ENTRY_SIZE),
                   field_bytes(fields, "pending", size=(count + 63) // 64 * 8))


class MsixCapability:
    """MSI-X for one PCI function: ``count`` vectors, table and PBA in BAR ``bar``."""

    def __init__(self, device: PciDevice, interrupts: InterruptController, count: int,
                 *, bar: int, table_offset: int, pba_offset: int,
                 on_control: Callable[[], None] | None = None) -> None:
        """``on_control`` runs after each driver write of message control (MSI-X on or
        off, the function mask), for a device whose back end signals vectors itself."""
        if not 1 <= count <= MAX_VECTORS:
            raise DeviceError(f"{device.name}: {count} MSI-X vectors (1-{MAX_VECTORS})")
        if table_offset % 8 or pba_offset % 8:
            raise DeviceError(f"{device.name}: MSI-X table and PBA must be 8-byte aligned")
        self.device = device
        self._on_control = on_control
        self.count = count
        self.table_size = count * ENTRY_SIZE
        self.pba_size = (count + 63) // 64 * 8
        self.table = bytearray(self.table_size)
        for i in range(count):
            self.table[i * ENTRY_SIZE + VECTOR_CONTROL] = ENTRY_MASKED
        body = ((count - 1).to_bytes(2, "little") + (table_offset | bar).to_bytes(4, "little")
                + (pba_offset | bar).to_bytes(4, "little"))
        self.offset = device.add_capability(CAP_ID_MSIX, body, writable=b"\x00\xc0",
                                            on_write=self._control_written)
        self.vectors: list[MsiVector] = [interrupts.msi_vector() for _ in range(count)]

    # ---- message control (config space) ----

    @property
    def control(self) -> int:
        return self.device.read_raw(self.offset + 2, 2)

    @property
    def enabled(self) -> bool:
        """MSI-X is on: the function signals through its vectors, not INTx."""
        return bool(self.control & CONTROL_ENABLE)

    def _control_written(self, offset: int, size: int) -> None:
        for i in range(self.count):
            self._apply(i)
        if self._on_control is not None:
            self._on_control()

    # ---- the table and the PBA (BAR accesses) ----

    def table_read(self, offset: int, size: int) -> int:
        if offset + size > self.table_size:
            return 0
        return int.from_bytes(self.table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        """Dword or qword writes of an entry (other widths are ignored)."""
        if size not in (4, 8) or offset % size or offset + size > self.table_size:
            return
        self.table[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little")
        self._apply(offset // ENTRY_SIZE)

    def pba_read(self, offset: int, size: int) -> int:
        value = 0
        for bit in range(8 * size):
            i = 8 * offset + bit
            if i < self.count and self.vectors[i].pending:
                value |= 1 << bit
        return value

    def entry(self, index: int) -> tuple[int, int, bool]:
        """Entry ``index`` as (address, data, masked)."""
        e = self.table[index * ENTRY_SIZE : (index + 1) * ENTRY_SIZE]
        address = int.from_bytes(e[0:8], "little")
        data = int.from_bytes(e[8:12], "little")
        return address, data, bool(e[VECTOR_CONTROL] & ENTRY_MASKED)

    def _apply(self, index: int) -> None:
        address, data, entry_masked = self.entry(index)
        control = self.control
        vector = self.vectors[index]
        if control & CONTROL_ENABLE and not control & CONTROL_FUNCTION_MASK and not entry_masked:
            vector.program(address, data)
            vector.unmask()
        else:
            vector.mask()

    # ---- the device's side ----

    def trigger(self, index: int) -> None:
        """Signal vector ``index`` (pending while masked). Any thread."""
        self.vectors[index].trigger()

    # ---- state ----

    def save_state(self) -> Fields:
        pending = bytearray(self.pba_size)
        for i, vector in enumerate(self.vectors):
            if vector.pending:
                pending[i // 8] |= 1 << (i % 8)
        return MsixState(bytes(self.table), bytes(pending)).to_fields()

    def restore_state(self, fields: Fields) -> None:
        """Load the table and pending bits; message control comes with config space."""
        state = MsixState.from_fields(fields, self.count)
        self.table[:] = state.table
        for i, vector in enumerate(self.vectors):
            vector.mask()
            vector.take_pending()
            if state.pending[i // 8] >> (i % 8) & 1:
                vector.trigger()
            self._apply(i)

    def close(self) -> None:
        for vector in self.vectors:
            vector.close()
