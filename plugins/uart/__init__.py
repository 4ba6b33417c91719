# SPDX-License-Identifier: BSD-2-Clause
"""The UART plugin: the 16550A model, console backends and the PCI UART.

The register logic is in ``model.py``, the host side in ``backends.py``, the PCI wiring
in ``pci.py``; the LPC wiring (COM1-COM4) is ``hvf.plugins.lpc.com``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.plugins.uart import backends, pci

if TYPE_CHECKING:
    from hvf.registry import Registry


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("uart", pci.create, parse=pci.parse,
                 help="PCI 16550 UART 131f:2000 (uart[,BACKEND])")


@hvf.hookimpl
def hvf_register_console_backends(registry: Registry) -> None:
    for name, (cls, help_text) in backends.BACKENDS.items():
        registry.add(name, cls, help=help_text)
