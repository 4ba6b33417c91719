# SPDX-License-Identifier: BSD-2-Clause
"""Tests for the device context: what a machine hands a device, made the same way by the
fake machine as by :class:`hvf.vm.Machine`, and the configuration views in it."""

from __future__ import annotations

import types
from typing import Any

import pytest
from hvf._kvm import lib
from hvf.config import Config, ConfigView
from hvf.context import DeviceContext
from hvf.device import Device
from hvf.errors import ConfigError
from hvf.memory import GuestMemory, MiB
from hvf.plugins.lpc import bridge
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.pci.device import PciDevice

from fakes import FakeVm


class Probe(PciDevice):
    """Keeps the context it was handed."""

    def __init__(self, name: str = "probe") -> None:
        super().__init__(name)
        self.set_identity(0x1AF4, 0x10FF, 0xFF0000)

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx


def test_a_view_reads_keys_relative_to_its_subtree() -> None:
    tree = Config({"pci.0.4.0.device": "x", "pci.0.4.0.size": "0x10",
                   "pci.0.4.0.on": "yes", "uuid": "u"})
    view = ConfigView(tree, "pci.0.4.0")
    assert view.get("device") == "x" and view.get("absent", "d") == "d"
    assert view.get_int("size", 0) == 16 and view.get_bool("on")
    assert view.node() == {"device": "x", "size": "0x10", "on": "yes"}
    view.node()["device"] = "changed"  # a copy: the tree is read-only through the view
    assert tree.get("pci.0.4.0.device") == "x"
    with pytest.raises(ConfigError, match="'pci.0.4.0.device'"):
        view.get_int("device", 0)
    whole = ConfigView(tree, "")
    assert whole.get("uuid") == "u" and set(whole.node()) == {"pci", "uuid"}
    empty = ConfigView(tree, None)
    assert empty.get("uuid") is None and empty.get_int("x", 3) == 3 and empty.node() == {}


def test_a_pci_function_gets_its_own_subtree_and_the_machine_services() -> None:
    vm = FakeVm({"pci.0.4.0.device": "probe", "pci.0.4.0.depth": "3", "name": "vm0"},
                GuestMemory(MiB), ncpus=2, capabilities={lib.KVM_CAP_READONLY_MEM: 1})
    bus = PciBus()
    vm.attach(bus)
    probe = Probe()
    bus.add((0, 4, 0), probe)
    ctx = probe.ctx
    assert ctx.name == "probe" and ctx.pio is vm.pio and ctx.mmio is vm.mmio
    assert ctx.interrupts is vm.interrupts and ctx.memory is vm.memory
    assert ctx.config.get_int("depth", 0) == 3 and ctx.config.get("name") is None
    assert ctx.machine_config.get("name") == "vm0"
    assert ctx.ncpus == 2 and not ctx.restoring
    assert ctx.has_capability(lib.KVM_CAP_READONLY_MEM)
    assert not ctx.has_capability(lib.KVM_CAP_IRQ_ROUTING)
    assert ctx.device("pci") is bus and list(ctx.devices) == [bus, probe]
    assert ctx.loop is vm.loop
    ctx.dma.write_u32(0x1000, 0x1234_5678)
    assert vm.memory.read_u32(0x1000) == 0x1234_5678
    ctx.log("guest error")
    ctx.request_exit(1, "power off")
    assert vm.logged == ["guest error"] and vm.exits == [(1, "power off")]
    doorbell = ctx.ioevent(2)
    doorbell.bind(0xC000_3000)
    assert vm.vmfd.ioeventfds == {doorbell.fd: (0xC000_3000, 2)}
    doorbell.close()
    slot = ctx.add_memory_slot(0xFFFF_0000, 0x10000, 0x7F00_0000, readonly=True)
    assert vm.memory_slots == [(0xFFFF_0000, 0x10000, 0x7F00_0000, True)]
    assert slot == len(vm.memory.regions)


def test_an_lpc_device_gets_lpc_name() -> None:
    seen: dict[str, Any] = {}

    class Legacy(Device):
        def attach(self, ctx: DeviceContext) -> None:
            seen["path"] = ctx.config.get("path")

    entries = [types.SimpleNamespace(name="legacy", factory=lambda **_: Legacy("legacy"))]
    vm = FakeVm({"lpc.legacy.path": "stdio"}, lpc_devices=entries)
    bus = PciBus()
    vm.attach(bus)
    lpc = bridge.create(vm=vm, slot=(0, 31, 0), config={})  # type: ignore[arg-type]
    bus.add((0, 31, 0), lpc)
    bridge.attach_isa_devices(vm)  # type: ignore[arg-type]
    assert seen == {"path": "stdio"}


def test_a_name_attaches_once() -> None:
    vm = FakeVm()
    vm.attach(Probe("twin"))
    with pytest.raises(ConfigError, match="'twin' is already attached"):
        vm.attach(Probe("twin"))
    assert len(vm.devices) == 1
