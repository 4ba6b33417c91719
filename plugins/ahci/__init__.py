# SPDX-License-Identifier: BSD-2-Clause
"""AHCI host bus adapter with ATA disks and ATAPI CD-ROMs (bhyve's ``ahci``, ``ahci-hd``
and ``ahci-cd``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.pluginmanager import lazy

if TYPE_CHECKING:
    from hvf.registry import Registry

#: Loaded when a machine has an AHCI controller.
FACTORY, CONFIG = f"{__name__}.factory", f"{__name__}.config"


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    options = "[,ro][,nocache][,direct][,nodelete][,ser=ID][,model=M][,rev=R][,bootindex=N]"
    registry.add("ahci", lazy(f"{FACTORY}:create_ahci"), parse=lazy(f"{CONFIG}:parse_ahci"),
                 help="AHCI SATA controller (8086:2821), up to 32 ports: hd:PATH[,opts] "
                      "(disk, also sectorsize=L[/P], nmrr=N) or cd:PATH[,opts] (CD-ROM)")
    registry.add("ahci-hd", lazy(f"{FACTORY}:create_hd"), parse=lazy(f"{CONFIG}:parse_hd"),
                 help=f"AHCI controller with one SATA disk, PATH{options}[,sectorsize=L[/P]]")
    registry.add("ahci-cd", lazy(f"{FACTORY}:create_cd"), parse=lazy(f"{CONFIG}:parse_cd"),
                 help=f"AHCI controller with one ATAPI CD-ROM, PATH{options}")
