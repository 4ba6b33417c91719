# SPDX-License-Identifier: BSD-2-Clause
"""Networking: ``virtio-net`` on a back end (a tap; more through
:func:`hvf.plugins.net.backend.register_backend`)."""

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
    registry.add("virtio-net", lazy(f"{__name__}.options:create"),
                 parse=lazy(f"{__name__}.options:parse"),
                 help="virtio network card (1af4:1041), BACKEND[,mac=xx:xx:xx:xx:xx:xx]"
                      "[,mtu=N][,queues=N]; BACKEND a tap (tap0, created when missing) or "
                      "slirp[,hostfwd=tcp:HOSTADDR:PORT-:PORT[;...]][,restrict=off]")


@hvf.hookimpl
def hvf_vm_start(vm: Machine) -> None:
    module = sys.modules.get(f"{__name__}.device")  # none before a virtio-net is made
    for device in vm.devices if module is not None else ():
        if isinstance(device, module.VirtioNet) and device.announce_pending:
            device.announce_pending = False
            vm.loop.call_soon(device.announce)
