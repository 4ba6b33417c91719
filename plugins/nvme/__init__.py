# SPDX-License-Identifier: BSD-2-Clause
"""NVMe controller (bhyve's ``nvme``) on the shared block back ends."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import hvf
from hvf.pluginmanager import lazy

if TYPE_CHECKING:
    from hvf.registry import Registry
    from hvf.vm import Machine


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("nvme", lazy(f"{__name__}.factory:create"),
                 parse=lazy(f"{__name__}.options:parse"),
                 help="NVMe disk (fb5d:0a0a), PATH[,maxq=N][,qsz=N][,ioslots=N][,sectsz=N]"
                      "[,ser=ID][,eui64=N][,dsm=auto|enable|disable][,ro][,nocache][,direct]")


@hvf.hookimpl
def hvf_vm_pause(vm: Machine) -> None:
    """Every NVMe disk finishes what is in flight and flushes before a pause ends."""
    controller = sys.modules.get(f"{__name__}.controller")  # none before it is loaded
    for device in vm.devices:
        if controller is not None and isinstance(device, controller.NvmeController):
            device.quiesce()
