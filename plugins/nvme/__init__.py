# SPDX-License-Identifier: BSD-2-Clause
"""NVMe controller (bhyve's ``nvme``) on the shared block back ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.plugins.nvme import factory, options
from hvf.plugins.nvme.controller import NvmeController

if TYPE_CHECKING:
    from hvf.registry import Registry
    from hvf.vm import Machine


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("nvme", factory.create, parse=options.parse,
                 help="NVMe disk (fb5d:0a0a), PATH[,maxq=N][,qsz=N][,ioslots=N][,sectsz=N]"
                      "[,ser=ID][,eui64=N][,dsm=auto|enable|disable][,ro][,nocache][,direct]")


@hvf.hookimpl
def hvf_vm_pause(vm: Machine) -> None:
    """Every NVMe disk finishes what is in flight and flushes before a pause ends."""
    for device in vm.devices:
        if isinstance(device, NvmeController):
            device.quiesce()
