# SPDX-License-Identifier: BSD-2-Clause
"""The PCI plugin: the root bus, its configuration mechanisms and the host bridge.

Every ``pci.B.S.F`` node of the configuration becomes a device from the PCI device
registry (``-s slot,NAME``), whichever plugin registered the name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.errors import ConfigError
from hvf.plugins.pci import hostbridge
from hvf.plugins.pci.acpi import describe as describe_acpi
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.pci.device import PciDevice

if TYPE_CHECKING:
    from hvf.acpi import AcpiBuilder
    from hvf.registry import Registry
    from hvf.vm import Machine

__all__ = ["PciBus", "PciDevice", "pci_bus"]


def pci_bus(vm: Machine) -> PciBus:
    """The machine's PCI bus."""
    bus = vm.device("pci")
    assert isinstance(bus, PciBus)
    return bus


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("hostbridge", hostbridge.create, help="host bridge (1275:1275)")
    registry.add("amd_hostbridge", hostbridge.create_amd, help="host bridge with AMD IDs (1022:7432)")


def _slots(vm: Machine) -> list[tuple[tuple[int, int, int], dict]]:
    found = []
    for b, slots in vm.config.node("pci").items():
        if not isinstance(slots, dict):
            continue
        for s, funcs in slots.items():
            for f, node in (funcs.items() if isinstance(funcs, dict) else ()):
                if not (b.isdigit() and s.isdigit() and f.isdigit()) or not isinstance(node, dict):
                    raise ConfigError(f"invalid PCI configuration node 'pci.{b}.{s}.{f}'")
                found.append(((int(b), int(s), int(f)), node))
    return sorted(found, key=lambda item: item[0])


@hvf.hookimpl
def hvf_machine_build(vm: Machine) -> None:
    bus = PciBus()
    vm.attach(bus)
    for bdf, node in _slots(vm):
        where = "pci slot {}:{}:{}".format(*bdf)
        name = node.get("device")
        if not name:
            raise ConfigError(f'{where}: missing "device" value')
        entry = vm.plugins.pci_devices.get(name)
        if entry is None:
            raise ConfigError(f'{where}: unknown device "{name}"')
        device = entry.factory(vm=vm, slot=bdf, config=node)
        if not isinstance(device, PciDevice):
            raise ConfigError(f"{where}: emulation '{name}' did not produce a PCI device")
        bus.add(bdf, device)


@hvf.hookimpl(trylast=True)
def hvf_machine_ready(vm: Machine) -> None:
    enable = vm.config.get_bool("pci.enable_bars", default=not vm.config.get("lpc.bootrom"))
    pci_bus(vm).assign_resources(enable_decoding=enable)


@hvf.hookimpl
def hvf_acpi_tables(vm: Machine, acpi: AcpiBuilder) -> None:
    describe_acpi(vm, acpi)
