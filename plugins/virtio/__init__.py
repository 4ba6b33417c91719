# SPDX-License-Identifier: BSD-2-Clause
"""virtio 1.x devices on the PCI transport: ``virtio-rnd``, ``virtio-console``, ``virtio-blk``
and ``vhost-user-blk``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.plugins.virtio import blk, console, rng, vhost_user_blk

if TYPE_CHECKING:
    from hvf.registry import Registry
    from hvf.vm import Machine


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("virtio-rnd", rng.create, parse=rng.parse,
                 help="virtio entropy source (1af4:1044), from the host's getrandom pool")
    registry.add("virtio-console", console.create, parse=console.parse,
                 help="virtio console (1af4:1043), NAME=BACKEND ports as -l com1 takes")
    registry.add("virtio-blk", blk.create, parse=blk.parse,
                 help="virtio disk (1af4:1042), PATH[,ro][,nocache][,direct][,sectorsize=L[/P]]"
                      "[,ser=ID][,num_queues=N][,bootindex=N]")
    registry.add("vhost-user-blk", vhost_user_blk.create, parse=vhost_user_blk.parse,
                 help="virtio disk served by a vhost-user back end (qemu-storage-daemon), "
                      "socket=PATH[,queues=N]")


@hvf.hookimpl
def hvf_vm_pause(vm: Machine) -> None:
    for device in vm.devices:
        if isinstance(device, vhost_user_blk.VhostUserBlk):
            device.quiesce()


@hvf.hookimpl
def hvf_vm_resume(vm: Machine) -> None:
    for device in vm.devices:
        if isinstance(device, vhost_user_blk.VhostUserBlk):
            device.unquiesce()
