# SPDX-License-Identifier: BSD-2-Clause
"""The PCI UART (``-s N,uart[,SPEC]``): bhyve's 16550 as a SIIG CyberSerial 1-port card.

Vendor 0x131F, device 0x2000, class 0x0700, the UART at BAR0 (8 I/O ports) and a
level-triggered INTx, so Linux's 8250_pci driver binds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf.errors import ConfigError, DeviceError
from hvf.plugins.pci import BAR_IO, PciDevice
from hvf.plugins.uart.port import SerialPort, open_backend

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.vm import Machine

VENDOR_SIIG = 0x131F
DEVICE_SIIG_1S_20X_550 = 0x2000
CLASS_SERIAL_16550 = 0x070002  # simple communications, serial, 16550-compatible
#: Config byte Linux's SIIG quirk rewrites (clock select), kept writable.
SIIG_CLOCK_REGISTER = 0x6F


class PciUart(PciDevice):
    def __init__(self, name: str, spec: str | None) -> None:
        super().__init__(name)
        self.spec = spec
        self.set_identity(VENDOR_SIIG, DEVICE_SIIG_1S_20X_550, CLASS_SERIAL_16550)
        self.wmask[SIIG_CLOCK_REGISTER] = 0xFF
        self.port = SerialPort(name, None, self.set_intx)
        self.add_bar(0, BAR_IO, 8, self.port.read, self.port.write)
        self.request_intx()

    def attach(self, ctx: DeviceContext) -> None:
        open_backend(ctx, self.spec, f"pci uart at {self.address[1]}:{self.address[2]}", self.port)

    def save_state(self) -> dict[str, Any]:
        return {"pci": super().save_state(), "uart": self.port.save_state()}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        pci, uart = fields.get("pci"), fields.get("uart")
        if not isinstance(pci, dict) or not isinstance(uart, dict):
            raise DeviceError(f"{self.name}: saved state lacks its 'pci' or 'uart' part")
        super().restore_state(pci, version)
        self.port.restore_state(uart, version)

    def close(self) -> None:
        self.port.close()


def parse(conf: list[str]) -> dict[str, str]:
    if not conf or not conf[0]:
        return {}
    if len(conf) > 1:
        raise ConfigError(f"uart takes one console backend, not {','.join(conf)}")
    return {"path": conf[0]}


def create(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> PciUart:
    return PciUart("uart@pci.{}.{}.{}".format(*slot), config.get("path"))
