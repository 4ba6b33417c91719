# SPDX-License-Identifier: BSD-2-Clause
"""The PCI root complex in ACPI: ``\\_SB.PC00`` (its windows and INTx routing) and MCFG.

``_PRT`` names I/O APIC inputs directly: INTx pin *p* of slot *s* reaches GSI
16 + PIRQ, with the PIRQ from the router's fixed formula, so it matches what
:mod:`hvf.plugins.pci.intx` drives whatever the firmware or guest does to the PIRQ
registers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvf.acpi import aml, tables
from hvf.plugins.pci.bus import CONFIG_ADDRESS, ECAM_BASE, PciBus
from hvf.plugins.pci.intx import IOAPIC_FIRST_PCI_PIN, pirq_for

if TYPE_CHECKING:
    from hvf.acpi import AcpiBuilder
    from hvf.vm import Machine

#: The root bridge's path; devices behind it (the LPC's ISA bridge) go in this scope.
ROOT_BRIDGE = "\\_SB.PC00"
SLOTS = 32
PINS = 4
#: A _PRT address: any function of the slot.
ANY_FUNCTION = 0xFFFF
CONFIG_PORTS = 8


def routing_table() -> list[list[int]]:
    """``_PRT`` entries {address, pin (0 = INTA), source 0, GSI} for every slot and pin."""
    return [
        [slot << 16 | ANY_FUNCTION, pin, 0, IOAPIC_FIRST_PCI_PIN + pirq_for(slot, pin + 1)]
        for slot in range(SLOTS)
        for pin in range(PINS)
    ]


def resources(vm: Machine, bus: PciBus) -> bytes:
    """The root bridge's ``_CRS``: bus numbers, the config ports, I/O and memory windows."""
    descriptors = [
        aml.word_bus_number(0, 255),
        aml.io(CONFIG_ADDRESS, CONFIG_ADDRESS, 1, CONFIG_PORTS),
        aml.word_io(0x0000, CONFIG_ADDRESS - 1),
        aml.word_io(CONFIG_ADDRESS + CONFIG_PORTS, 0xFFFF),
        aml.dword_memory(vm.memory.lowmem_size, ECAM_BASE - 1),
    ]
    mem64 = bus.windows.get("mem64")
    if mem64 is not None and mem64[1] > mem64[0]:
        descriptors.append(aml.qword_memory(mem64[0], mem64[1] - 1, cacheable=True))
    return aml.resource_template(*descriptors)


def root_bridge(vm: Machine, bus: PciBus) -> bytes:
    return aml.device(
        ROOT_BRIDGE.rsplit(".", 1)[1],
        aml.name("_HID", aml.hardware_id("PNP0A03")),
        aml.name("_CID", aml.hardware_id("PNP0A08")),  # PCI Express: config space by ECAM
        aml.name("_ADR", 0),
        aml.name("_UID", 0),
        aml.name("_BBN", 0),
        aml.name("_CRS", resources(vm, bus)),
        aml.name("_PRT", routing_table()),
    )


def describe(vm: Machine, acpi: AcpiBuilder) -> None:
    """Add the root bridge to the DSDT and the ECAM window as the MCFG table."""
    bus = vm.device("pci")
    if not isinstance(bus, PciBus):
        return
    acpi.dsdt(root_bridge(vm, bus), scope=ROOT_BRIDGE.rsplit(".", 1)[0])
    acpi.add_table(tables.mcfg(ECAM_BASE))
