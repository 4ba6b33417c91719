# SPDX-License-Identifier: BSD-2-Clause
"""virtio 1.x devices on the PCI transport: ``virtio-rnd``, ``virtio-console``, ``virtio-blk``
and ``vhost-user-blk``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import hvf
from hvf.pluginmanager import lazy

if TYPE_CHECKING:
    from hvf.registry import Registry
    from hvf.vm import Machine


def _device(module: str) -> dict[str, Any]:
    """A device module's ``create`` and ``parse``, loaded when a machine uses it."""
    return {"factory": lazy(f"{__name__}.{module}:create"),
            "parse": lazy(f"{__name__}.{module}:parse")}


def _vhost_user_blks(vm: Machine) -> list:  # type: ignore[type-arg]
    module = sys.modules.get(f"{__name__}.vhost_user_blk")  # none before it is loaded
    return [] if module is None else [d for d in vm.devices
                                      if isinstance(d, module.VhostUserBlk)]


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("virtio-rnd", **_device("rng"),
                 help="virtio entropy source (1af4:1044), from the host's getrandom pool")
    registry.add("virtio-console", **_device("console"),
                 help="virtio console (1af4:1043), NAME=BACKEND ports as -l com1 takes")
    registry.add("virtio-blk", **_device("blk"),
                 help="virtio disk (1af4:1042), PATH[,ro][,nocache][,direct][,sectorsize=L[/P]]"
                      "[,ser=ID][,num_queues=N][,bootindex=N]")
    registry.add("vhost-user-blk", **_device("vhost_user_blk"), shares_ram=True,
                 help="virtio disk served by a vhost-user back end (qemu-storage-daemon), "
                      "socket=PATH[,queues=N]")


@hvf.hookimpl
def hvf_vm_pause(vm: Machine) -> None:
    for device in _vhost_user_blks(vm):
        device.quiesce()


@hvf.hookimpl
def hvf_vm_resume(vm: Machine) -> None:
    for device in _vhost_user_blks(vm):
        device.unquiesce()
