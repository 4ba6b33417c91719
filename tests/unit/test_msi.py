# SPDX-License-Identifier: BSD-2-Clause
"""The MSI capability on a PCI function: message programming, masking, pending bit."""

from __future__ import annotations

import os

from fakes import FakeVm, cfg_read, cfg_write
from hvf._kvm import lib
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.pci.device import PciDevice
from hvf.plugins.pci.msi import (
    ADDRESS_HI,
    ADDRESS_LO,
    CAP_ID_MSI,
    CONTROL,
    DATA,
    MASK,
    PENDING,
    MsiCapability,
)

BDF = (0, 6, 0)


class MsiDevice(PciDevice):
    def __init__(self, vm: FakeVm) -> None:
        super().__init__("msi-dev")
        self.set_identity(0x1AF4, 0x10FF, 0xFF0000)
        self.msi = MsiCapability(self, vm.interrupts)


def test_msi_message_mask_and_pending() -> None:
    vm = FakeVm()
    bus = PciBus()
    vm.attach(bus)
    dev = MsiDevice(vm)
    bus.add(BDF, dev)
    cap = cfg_read(vm, BDF, 0x34, 1)
    assert cfg_read(vm, BDF, cap, 1) == CAP_ID_MSI
    assert cfg_read(vm, BDF, cap + CONTROL, 2) == 0x0180  # 64-bit, per-vector mask, 1 vector
    cfg_write(vm, BDF, cap + ADDRESS_LO, 4, 0xFEE0_1003)  # the low two bits are reserved
    cfg_write(vm, BDF, cap + ADDRESS_HI, 4, 0)
    cfg_write(vm, BDF, cap + DATA, 2, 0x4041)
    assert cfg_read(vm, BDF, cap + ADDRESS_LO, 4) == 0xFEE0_1000
    cfg_write(vm, BDF, cap + MASK, 4, 1)
    cfg_write(vm, BDF, cap + CONTROL, 2, 1)
    assert dev.msi.enabled and vm.vmfd.irqfds == {}
    dev.msi.trigger()  # masked: pending
    assert cfg_read(vm, BDF, cap + PENDING, 4) == 1
    cfg_write(vm, BDF, cap + MASK, 4, 0)
    vector = dev.msi.vector
    assert vm.vmfd.irqfds == {vector.fd: vector.gsi}
    assert (vector.gsi, lib.KVM_IRQ_ROUTING_MSI, 0xFEE0_1000, 0, 0x4041) in vm.vmfd.routes
    assert cfg_read(vm, BDF, cap + PENDING, 4) == 0
    assert os.eventfd_read(vector.fd) == 1  # the pending message went out on unmask
    cfg_write(vm, BDF, cap + CONTROL, 2, 0)
    assert not dev.msi.enabled and vm.vmfd.irqfds == {}
