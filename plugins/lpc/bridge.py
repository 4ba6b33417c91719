# SPDX-License-Identifier: BSD-2-Clause
"""bhyve's LPC bridge: a PIIX3-like PCI-to-ISA bridge carrying the legacy devices.

The bridge itself is a PCI function (8086:7000, class 0x0601) whose config bytes
0x60-0x63 and 0x68-0x6B are the PIRQA-H routing registers. The devices behind it are
built by the LPC plugin (:func:`attach_isa_devices`) once the PCI bus exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf.errors import ConfigError
from hvf.plugins.lpc.kbc import KeyboardController
from hvf.plugins.lpc.pm import SCI_IRQ, PowerManagement
from hvf.plugins.lpc.reset import ResetControl
from hvf.plugins.lpc.rtc import Rtc
from hvf.plugins.pci import PciDevice

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.vm import Machine

CLASS_ISA_BRIDGE = 0x060100
PIRQ_REGISTERS = {0x60: 0, 0x61: 1, 0x62: 2, 0x63: 3, 0x68: 4, 0x69: 5, 0x6A: 6, 0x6B: 7}
#: ISA IRQs of the four COM ports, always present on the LPC bus as in bhyve.
COM_IRQS = (4, 3)


def _reg(config: Any, key: str, default: int) -> int:
    value = config.get(f"lpc.pcireg.{key}")
    if value is None:
        return default
    try:
        return int(value, 0)
    except ValueError:
        raise ConfigError(f"invalid lpc.pcireg.{key} value '{value}'") from None


class LpcBridge(PciDevice):
    """The LPC (ISA) bridge; at most one, on bus 0."""

    def __init__(self, name: str, config: Any) -> None:
        super().__init__(name)
        self.set_identity(
            _reg(config, "vendor", 0x8086),
            _reg(config, "device", 0x7000),
            CLASS_ISA_BRIDGE,
            revision=_reg(config, "revid", 0),
            subsystem_vendor=_reg(config, "subvendor", 0),
            subsystem=_reg(config, "subdevice", 0),
        )

    def attach(self, ctx: DeviceContext) -> None:
        if self.address[0] != 0:
            raise ConfigError("LPC bridge can be present only on bus 0.")
        if any(isinstance(d, LpcBridge) for d in ctx.devices):
            raise ConfigError("Only one LPC bridge is allowed.")
        assert self.bus is not None
        self.router = self.bus.intx
        for irq in COM_IRQS:
            self.router.reserve(irq)
        self.router.use(SCI_IRQ)

    def config_read(self, offset: int, size: int) -> int:
        value = super().config_read(offset, size)
        for i in range(size):
            pirq = PIRQ_REGISTERS.get(offset + i)
            if pirq is not None:
                value = (value & ~(0xFF << (8 * i))) | (self.router.read(pirq) << (8 * i))
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        rest = []
        for i in range(size):
            pirq = PIRQ_REGISTERS.get(offset + i)
            if pirq is None:
                rest.append(i)
            else:
                self.router.write(pirq, (value >> (8 * i)) & 0xFF)
        for i in rest:
            super().config_write(offset + i, 1, (value >> (8 * i)) & 0xFF)


def create(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> LpcBridge:
    return LpcBridge("lpc@pci.{}.{}.{}".format(*slot), vm.config)


def attach_isa_devices(vm: Machine) -> None:
    """Behind the machine's LPC bridge (if any): the legacy hardware every PC has, then
    every registered LPC device (``-l``, whichever plugin registered it) that its
    factory builds from the configuration."""
    if not any(isinstance(d, LpcBridge) for d in vm.devices):
        return
    vm.attach(Rtc(vm.config.get_bool("rtc.use_localtime", default=True)), config="rtc")
    vm.attach(KeyboardController())
    vm.attach(ResetControl())
    vm.attach(PowerManagement())
    for entry in vm.plugins.lpc_devices:
        device = entry.factory(vm=vm, config=vm.config)
        if device is not None:
            vm.attach(device, config=f"lpc.{entry.name}")
