# SPDX-License-Identifier: BSD-2-Clause
"""The MSI capability (PCI Local Bus 3.0 §6.8.1): one message, 64-bit address, with
per-vector masking, backed by an :class:`hvf.interrupts.MsiVector` like MSI-X's.

Message control advertises one vector (Multiple Message Capable 0), 64-bit addresses
and per-vector masking; the mask and pending bits live in config space. The vector is
bound to KVM while MSI is enabled and unmasked; a trigger while masked sets the
pending bit and is delivered on unmask. The pending bit is saved with config space: a
restored one is a trigger waiting for the unmask, and a restored capability is bound
as its registers say (nothing for the device to do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvf.interrupts import InterruptController
    from hvf.plugins.pci.device import PciDevice

CAP_ID_MSI = 0x05
CONTROL_ENABLE = 1 << 0
CONTROL_64BIT = 1 << 7
CONTROL_PER_VECTOR_MASK = 1 << 8
# Offsets from the capability's start.
CONTROL, ADDRESS_LO, ADDRESS_HI, DATA, MASK, PENDING = 2, 4, 8, 12, 16, 20


class MsiCapability:
    """MSI for one PCI function, one vector."""

    def __init__(self, device: PciDevice, interrupts: InterruptController) -> None:
        self.device = device
        control = CONTROL_64BIT | CONTROL_PER_VECTOR_MASK
        body = control.to_bytes(2, "little") + bytes(20)
        writable = (b"\x01\x00" + b"\xfc\xff\xff\xff" + b"\xff" * 4 + b"\xff\xff\x00\x00"
                    + b"\x01\x00\x00\x00" + bytes(4))
        self.offset = device.add_capability(CAP_ID_MSI, body, writable=writable,
                                            on_write=self._written, on_restore=self._restored)
        self.vector = interrupts.msi_vector()

    def _reg(self, offset: int, size: int) -> int:
        return self.device.read_raw(self.offset + offset, size)

    @property
    def enabled(self) -> bool:
        """MSI is on: the function signals with its message, not INTx."""
        return bool(self._reg(CONTROL, 2) & CONTROL_ENABLE)

    def _written(self, offset: int, size: int) -> None:
        self.apply()

    def _restored(self) -> None:
        """Config space came from a snapshot: its pending bit becomes the vector's."""
        self.vector.mask()
        self.vector.take_pending()
        if self._reg(PENDING, 4) & 1:
            self.vector.trigger()
        self.apply()

    def apply(self) -> None:
        """Bind or unbind the vector as message control and the mask bit say."""
        if self.enabled and not self._reg(MASK, 4) & 1:
            address = self._reg(ADDRESS_LO, 4) | self._reg(ADDRESS_HI, 4) << 32
            self.vector.program(address, self._reg(DATA, 2))
            self.vector.unmask()
        else:
            self.vector.mask()
        self.device.write_raw(self.offset + PENDING, 4, int(self.vector.pending))

    def trigger(self) -> None:
        """Signal the message (pending while masked). Any thread."""
        self.vector.trigger()
        if self.vector.masked:
            self.device.write_raw(self.offset + PENDING, 4, 1)

    def close(self) -> None:
        self.vector.close()
