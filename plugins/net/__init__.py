# SPDX-License-Identifier: BSD-2-Clause
"""Networking: ``virtio-net`` on a back end (a tap; more through
:func:`hvf.plugins.net.backend.register_backend`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.plugins.net import options
from hvf.plugins.net.device import VirtioNet

if TYPE_CHECKING:
    from hvf.registry import Registry
    from hvf.vm import Machine


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("virtio-net", options.create, parse=options.parse,
                 help="virtio network card (1af4:1041), BACKEND[,mac=xx:xx:xx:xx:xx:xx]"
                      "[,mtu=N][,queues=N]; BACKEND a tap (tap0, created when missing) or "
                      "slirp[,hostfwd=tcp:HOSTADDR:PORT-:PORT[;...]][,restrict=off]")


@hvf.hookimpl
def hvf_vm_start(vm: Machine) -> None:
    for device in vm.devices:
        if isinstance(device, VirtioNet) and device.announce_pending:
            device.announce_pending = False
            vm.loop.call_soon(device.announce)
