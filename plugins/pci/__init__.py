# SPDX-License-Identifier: BSD-2-Clause
"""The PCI plugin: the root bus, its configuration mechanisms and the host bridge.

Every ``pci.B.S.F`` node of the configuration becomes a device from the PCI device
registry (``-s slot,NAME``), whichever plugin registered the name. Every device also
takes QEMU's ``romfile=PATH`` (``-s 3,virtio-net,tap0,romfile=FILE``, ``pci.B.S.F.romfile``):
the file (at most 16 MiB, a 0x55AA option ROM, padded to a power of two of at least
2 KiB) is served read-only through the function's expansion ROM BAR, where the firmware
finds it; the option is taken out of the device's configuration before its factory runs,
so no device parses it (see :mod:`hvf.plugins.pci.rom`).

This package's names are the PCI device API, the one public API other plugins and
third parties import from a plugin: :class:`PciDevice` (identity, BARs, an expansion
ROM, capabilities, INTx), :class:`Bar` and its kinds, :class:`MsiCapability` and :class:`MsixCapability`,
the bus (:func:`pci_bus`) and where the root complex is (:data:`ROOT_BRIDGE` in ACPI,
the ECAM window). Nothing else of the plugin is public.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.errors import ConfigError
from hvf.plugins.pci import hostbridge
from hvf.plugins.pci.acpi import ROOT_BRIDGE
from hvf.plugins.pci.acpi import describe as describe_acpi
from hvf.plugins.pci.bus import ECAM_BASE, ECAM_SIZE, PciBus
from hvf.plugins.pci.config_space import BAR_IO, BAR_MEM32, BAR_MEM64, BAR_ROM, Bar
from hvf.plugins.pci.device import PciDevice
from hvf.plugins.pci.msi import MsiCapability
from hvf.plugins.pci.msix import CAP_ID_MSIX, MsixCapability
from hvf.plugins.pci.rom import load_rom

if TYPE_CHECKING:
    from hvf.acpi import AcpiBuilder
    from hvf.context import Devices
    from hvf.registry import Registry
    from hvf.vm import Machine

__all__ = [
    "BAR_IO", "BAR_MEM32", "BAR_MEM64", "BAR_ROM", "CAP_ID_MSIX", "ECAM_BASE", "ECAM_SIZE", "ROOT_BRIDGE",
    "Bar", "MsiCapability", "MsixCapability", "PciBus", "PciDevice", "pci_bus",
]


def pci_bus(where: Devices) -> PciBus:
    """The machine's PCI bus, looked up on a machine or a device's context."""
    bus = where.device("pci")
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
    vm.attach(bus, config="pci")
    for bdf, node in _slots(vm):
        where = "pci slot {}:{}:{}".format(*bdf)
        name = node.get("device")
        if not name:
            raise ConfigError(f'{where}: missing "device" value')
        entry = vm.plugins.pci_devices.get(name)
        if entry is None:
            raise ConfigError(f'{where}: unknown device "{name}"')
        romfile = node.get("romfile")
        own = {key: value for key, value in node.items() if key != "romfile"}
        device = entry.factory(vm=vm, slot=bdf, config=own)
        if not isinstance(device, PciDevice):
            raise ConfigError(f"{where}: emulation '{name}' did not produce a PCI device")
        if romfile is not None:
            if not isinstance(romfile, str) or not romfile:
                raise ConfigError(f"{where}: romfile must name a file")
            device.set_rom(load_rom(romfile, f"{where} ({name})"))
        bus.add(bdf, device)


@hvf.hookimpl(trylast=True)
def hvf_machine_ready(vm: Machine) -> None:
    enable = vm.config.get_bool("pci.enable_bars", default=not vm.config.get("lpc.bootrom"))
    pci_bus(vm).assign_resources(enable_decoding=enable)


@hvf.hookimpl
def hvf_acpi_tables(vm: Machine, acpi: AcpiBuilder) -> None:
    describe_acpi(vm, acpi)
