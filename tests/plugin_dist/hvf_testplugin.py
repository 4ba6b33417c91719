# SPDX-License-Identifier: BSD-2-Clause
"""A third-party PCI device: ``-s N,testdev``, vendor:device 1dd1:0001.

BAR0 is 16 I/O ports and BAR1 4 KiB of 32-bit memory; a dword read at offset 0 of
either returns the magic 0x21465648 ("HVF!"), offset 4 is a read/write register whose
value at attach is ``pci.B.S.F.register`` (``-s N,testdev,register=VALUE``; 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.plugins.pci import BAR_IO, BAR_MEM32, PciDevice

if TYPE_CHECKING:
    from hvf.context import DeviceContext

MAGIC = 0x21465648


class TestDevice(PciDevice):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.set_identity(0x1DD1, 0x0001, 0xFF0000)
        self.register = 0
        self.add_bar(0, BAR_IO, 16, self._read, self._write)
        self.add_bar(1, BAR_MEM32, 4096, self._read, self._write)

    def attach(self, ctx: DeviceContext) -> None:
        self.register = ctx.config.get_int("register", 0)

    def _read(self, offset: int, size: int) -> int:
        if offset == 0:
            return MAGIC & ((1 << (8 * size)) - 1)
        if offset == 4:
            return self.register
        return 0

    def _write(self, offset: int, size: int, value: int) -> None:
        if offset == 4:
            self.register = value


def create(*, vm, slot, config):  # type: ignore[no-untyped-def]
    return TestDevice("testdev@pci.{}.{}.{}".format(*slot))


@hvf.hookimpl
def hvf_register_pci_devices(registry) -> None:  # type: ignore[no-untyped-def]
    registry.add("testdev", create, help="hvf test device 1dd1:0001 (third-party plugin)")
