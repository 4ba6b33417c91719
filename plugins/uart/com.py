# SPDX-License-Identifier: BSD-2-Clause
"""COM1-COM4 on the LPC bus: 16550As at the legacy ports and ISA IRQs, registered as
LPC devices (``-l comN,SPEC``) and described in ACPI (``PNP0501``).

All four ports always exist behind an LPC bridge, as in bhyve; ``-l comN,SPEC`` gives
one a console backend. The IRQ is gated by MCR.OUT2 as on a PC, and COM1/COM3 (IRQ 4)
and COM2/COM4 (IRQ 3) share their lines wired-OR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf.device import Device
from hvf.acpi import aml
from hvf.errors import ConfigError
from hvf.plugins.uart.port import SerialPort, open_backend

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.vm import Machine

#: name → (I/O base, ISA IRQ)
COM_PORTS = {
    "com1": (0x3F8, 4),
    "com2": (0x2F8, 3),
    "com3": (0x3E8, 4),
    "com4": (0x2E8, 3),
}
PORT_COUNT = 8


class ComPort(Device):
    """One legacy serial port behind the LPC bridge."""

    def __init__(self, name: str, spec: str | None) -> None:
        super().__init__(name)
        self.base, self.irq = COM_PORTS[name]
        self.spec = spec

    def attach(self, ctx: DeviceContext) -> None:
        irq = ctx.interrupts.line(self.irq).source(self.name)
        self.port = SerialPort(self.name, None, irq.set, gate_with_out2=True)
        open_backend(ctx, self.spec, f"LPC device {self.name}", self.port)
        ctx.pio.register(self.base, PORT_COUNT, self.name, self.port.read, self.port.write)

    def save_state(self) -> dict[str, Any]:
        return self.port.save_state()

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        self.port.restore_state(fields, version)

    def close(self) -> None:
        self.port.close()


def parser(name: str):  # type: ignore[no-untyped-def]
    def parse(conf: list[str]) -> dict[str, str]:
        if len(conf) != 1 or not conf[0]:
            raise ConfigError(f"{name} takes one console backend (e.g. {name},stdio)")
        return {f"{name}.path": conf[0]}

    return parse


def factory(name: str):  # type: ignore[no-untyped-def]
    def create(*, vm: Machine, config: Any) -> ComPort:
        return ComPort(name, config.get(f"lpc.{name}.path"))

    return create


def acpi_devices(vm: Machine) -> list[bytes]:
    """``Device (COMn)`` for each attached port."""
    devices = []
    for name, (base, irq) in COM_PORTS.items():
        if isinstance(vm.device(name), ComPort):
            devices.append(aml.device(
                name.upper(),
                aml.name("_HID", aml.hardware_id("PNP0501")),
                aml.name("_UID", int(name[3:])),
                aml.name("_CRS", aml.resource_template(aml.io(base, base, 1, PORT_COUNT),
                                                        aml.irq_noflags(irq))),
            ))
    return devices
