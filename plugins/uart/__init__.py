# SPDX-License-Identifier: BSD-2-Clause
"""The UART plugin: the 16550A model, console backends, the PCI UART and COM1-COM4.

The register logic is in ``model.py``, the host side in ``backends.py``, the PCI wiring
in ``pci.py`` and the LPC wiring (COM1-COM4, LPC devices) in ``com.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.plugins.uart import backends, com, pci

if TYPE_CHECKING:
    from hvf.acpi import AcpiBuilder
    from hvf.registry import Registry
    from hvf.vm import Machine


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("uart", pci.create, parse=pci.parse,
                 help="PCI 16550 UART 131f:2000 (uart[,BACKEND])")


@hvf.hookimpl
def hvf_register_console_backends(registry: Registry) -> None:
    for name, (cls, help_text) in backends.BACKENDS.items():
        registry.add(name, cls, help=help_text)


@hvf.hookimpl
def hvf_register_lpc_devices(registry: Registry) -> None:
    for name, (base, irq) in com.COM_PORTS.items():
        registry.add(name, com.factory(name), parse=com.parser(name),
                     help=f"16550A at {base:#x}, IRQ {irq} ({name},BACKEND)")


@hvf.hookimpl
def hvf_acpi_tables(vm: Machine, acpi: AcpiBuilder) -> None:
    devices = com.acpi_devices(vm)
    if devices:
        acpi.dsdt(*devices)
