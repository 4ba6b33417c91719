# SPDX-License-Identifier: BSD-2-Clause
"""virtio 1.x devices on the PCI transport: ``virtio-rnd``, ``virtio-console`` and ``virtio-blk``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.plugins.virtio import blk, console, rng

if TYPE_CHECKING:
    from hvf.registry import Registry


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("virtio-rnd", rng.create, parse=rng.parse,
                 help="virtio entropy source (1af4:1044), from the host's getrandom pool")
    registry.add("virtio-console", console.create, parse=console.parse,
                 help="virtio console (1af4:1043), NAME=BACKEND ports as -l com1 takes")
    registry.add("virtio-blk", blk.create, parse=blk.parse,
                 help="virtio disk (1af4:1042), PATH[,ro][,nocache][,direct][,sectorsize=L[/P]]"
                      "[,ser=ID]")
