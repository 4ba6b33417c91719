# SPDX-License-Identifier: BSD-2-Clause
"""The virtio-pci transport driven from the guest's side, register by register, on a
fake machine (real buses, guest RAM, interrupt controller; KVM's ioctls recorded)."""

from __future__ import annotations

import os
import struct

import pytest

from fakes import FakeVm, cfg_read, cfg_write, mmio_read, mmio_write
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.virtio import console, rng
from hvf.plugins.virtio.pci import (
    CFG_COMMON,
    CFG_DEVICE,
    CFG_ISR,
    CFG_NOTIFY,
    ISR_CONFIG,
    ISR_QUEUE,
)
from hvf.plugins.virtio.spec import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    F_RING_EVENT_IDX,
    F_VERSION_1,
    FEATURES_OK,
    NO_VECTOR,
)
from hvf.testing.virtio import GF, GFSELECT, NUM_QUEUES, Q_MSIX, STATUS, Driver, VirtqDriver

BDF = (0, 4, 0)


def machine(device_factory=rng.create, config=None):  # type: ignore[no-untyped-def]
    vm = FakeVm()
    bus = PciBus()
    vm.attach(bus)
    device = device_factory(vm=vm, slot=BDF, config=config or {})
    bus.add(BDF, device)
    bus.assign_resources(enable_decoding=True)
    return vm, device, Driver(vm, BDF)


def run_io(vm: FakeVm, device) -> None:  # type: ignore[no-untyped-def]
    """Run what the I/O thread would: every rung doorbell."""
    for index, doorbell in enumerate(device.doorbells):
        device._doorbell(index)


def test_identity_and_capabilities() -> None:
    vm, device, driver = machine()
    assert cfg_read(vm, BDF, 0x00, 4) == 0x1044_1AF4
    assert cfg_read(vm, BDF, 0x08, 1) == 1  # revision 1: modern only
    assert cfg_read(vm, BDF, 0x2C, 4) == 0x1044_1AF4
    assert set(driver.caps) == {CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE}
    assert driver.multiplier == 4
    assert driver.read(NUM_QUEUES, 2) == 1
    assert driver.features() == F_VERSION_1 | F_RING_EVENT_IDX | (1 << 28)


def test_features_ok_needs_version_1_and_offered_bits() -> None:
    _vm, _device, driver = machine()
    assert not driver.negotiate(0) & FEATURES_OK  # a legacy driver is refused
    assert not driver.negotiate(F_VERSION_1 | 1 << 40) & FEATURES_OK
    assert driver.negotiate(F_VERSION_1) & FEATURES_OK
    driver.write(GFSELECT, 4, 0)
    driver.write(GF, 4, 0xFFFF)  # after FEATURES_OK the features are fixed
    assert driver.read(GF, 4) == 0


@pytest.mark.parametrize("event_idx", [False, True])
def test_rng_fills_buffers_and_interrupts_through_intx(event_idx: bool) -> None:
    vm, device, driver = machine()
    queue = VirtqDriver(vm.memory, 16, event_idx=event_idx)
    driver.negotiate(F_VERSION_1 | (F_RING_EVENT_IDX if event_idx else 0))
    driver.setup_queue(0, queue)
    driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    heads = [queue.add([], [512]) for _ in range(3)]
    driver.kick(0)
    assert device.notify_exits == 1  # no ioeventfd in a fake machine: the write came here
    run_io(vm, device)
    used = queue.used()
    assert [u.head for u in used] == heads and all(u.length == 512 for u in used)
    assert len({u.data for u in used}) == 3 and all(any(u.data) for u in used)
    assert device.intx_level  # INTx, since MSI-X is off
    assert mmio_read(vm, driver.addr(CFG_ISR, 0), 1) == ISR_QUEUE
    assert not device.intx_level and mmio_read(vm, driver.addr(CFG_ISR, 0), 1) == 0


def test_msix_vectors_bind_irqfds_and_signal() -> None:
    vm, device, driver = machine()
    queue = VirtqDriver(vm.memory, 8)
    driver.negotiate(F_VERSION_1)
    driver.setup_queue(0, queue, vector=1)
    assert driver.read(Q_MSIX, 2) == 1
    driver.write(Q_MSIX, 2, 99)  # more than the table holds: NO_VECTOR reads back
    assert driver.read(Q_MSIX, 2) == NO_VECTOR
    driver.write(Q_MSIX, 2, 1)
    table = device.bar.address + 0x4000
    mmio_write(vm, table + 16, 4, 0xFEE0_0000)
    mmio_write(vm, table + 24, 4, 0x45)
    mmio_write(vm, table + 28, 4, 0)  # unmask entry 1
    cfg_write(vm, BDF, driver.msix_cap + 2, 2, 0x8000)  # MSI-X enable
    vector = device.msix.vectors[1]
    assert vm.vmfd.irqfds == {vector.fd: vector.gsi}
    driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    queue.add([], [64])
    driver.kick(0)
    run_io(vm, device)
    assert os.eventfd_read(vector.fd) == 1  # what KVM's irqfd would have taken
    assert not device.intx_level
    # function mask: the vector is unbound and a trigger stays pending (the PBA bit)
    cfg_write(vm, BDF, driver.msix_cap + 2, 2, 0xC000)
    assert vm.vmfd.irqfds == {}
    queue.add([], [64])
    driver.kick(0)
    run_io(vm, device)
    assert mmio_read(vm, device.bar.address + 0x6000, 4) == 1 << 1
    cfg_write(vm, BDF, driver.msix_cap + 2, 2, 0x8000)
    assert mmio_read(vm, device.bar.address + 0x6000, 4) == 0
    assert os.eventfd_read(vector.fd) == 1  # delivered on unmask


def test_doorbells_follow_the_bar() -> None:
    vm, device, driver = machine()
    notify = driver.addr(CFG_NOTIFY, 0)
    assert list(vm.vmfd.ioeventfds.values()) == [(notify, 2)]
    cfg_write(vm, BDF, 0x04, 2, 0)  # memory decoding off: the doorbell is unbound
    assert vm.vmfd.ioeventfds == {}
    new_base = device.bar.address + 0x10_0000
    cfg_write(vm, BDF, 0x10 + 4 * 4, 4, new_base & 0xFFFFFFFF | 0x4)
    cfg_write(vm, BDF, 0x04, 2, 0x6)
    assert list(vm.vmfd.ioeventfds.values()) == [(new_base + 0x3000, 2)]


@pytest.mark.parametrize("breakage", ["loop", "outside", "index"])
def test_a_broken_ring_needs_reset_and_the_vmm_carries_on(breakage: str) -> None:
    vm, device, driver = machine()
    queue = VirtqDriver(vm.memory, 8)
    driver.negotiate(F_VERSION_1)
    driver.setup_queue(0, queue)
    driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    head = queue.add([], [64])
    desc = queue.desc_addr + 16 * head
    if breakage == "loop":
        vm.memory.write(desc + 12, struct.pack("<HH", 1, head))  # NEXT to itself
    elif breakage == "outside":
        vm.memory.write(desc, struct.pack("<Q", 1 << 40))
    else:
        vm.memory.write(queue.avail_addr + 2, struct.pack("<H", 200))  # idx far ahead
    driver.kick(0)
    run_io(vm, device)
    assert driver.read(STATUS, 1) & DEVICE_NEEDS_RESET
    assert vm.logged and "needs reset" in vm.logged[-1]
    assert mmio_read(vm, driver.addr(CFG_ISR, 0), 1) == ISR_CONFIG
    driver.write(STATUS, 1, 0)  # reset recovers it
    assert driver.read(STATUS, 1) == 0


def test_transport_state_survives_save_and_restore() -> None:
    vm, device, driver = machine()
    queue = VirtqDriver(vm.memory, 8)
    driver.negotiate(F_VERSION_1)
    driver.setup_queue(0, queue)
    driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    queue.add([], [32])
    driver.kick(0)
    run_io(vm, device)
    queue.used()
    saved = device.save_state()
    vm2, device2, driver2 = machine()
    device2.restore_state(saved, 1)
    assert device2.save_state() == saved
    queue.add([], [32])
    driver2.kick(0)
    run_io(vm2, device2)
    # the restored device carries on where the first one stopped
    assert [u.length for u in queue.used()] == [32]


def test_console_parse() -> None:
    assert console.parse(["a=pty", "b=unix=/tmp/x"]) == {
        "port.a.path": "pty", "port.b.path": "unix=/tmp/x"}
    for bad in (["a"], ["=pty"], ["a=pty", "a=stdio"], []):
        with pytest.raises(Exception, match="virtio-console"):
            console.parse(bad)
    assert console._backend_spec("/tmp/vm.sock") == "unix=/tmp/vm.sock"
    assert console._backend_spec("/dev/null") == "/dev/null"
