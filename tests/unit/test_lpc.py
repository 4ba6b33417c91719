# SPDX-License-Identifier: BSD-2-Clause
"""Tests for the LPC (PCI-to-ISA) bridge: identity, PIRQ routing registers, placement.

No KVM: the bridge sits on a real :class:`~hvf.plugins.pci.bus.PciBus` in a fake
machine, and config space is driven only through the guest-visible 0xCF8/0xCFC ports
and the ECAM window.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
from hvf.device import Device
from hvf.errors import ConfigError
from hvf.plugins.lpc import bridge
from hvf.plugins.lpc.bridge import LpcBridge
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.pci.device import PciDevice
from hvf.plugins.pci.intx import pirq_for
from hypothesis import given, settings
from hypothesis import strategies as st

import fakes
from fakes import cfg_read, cfg_write, ecam_read, ecam_write

LPC = (0, 31, 0)
PIRQ_OFFSETS = (0x60, 0x61, 0x62, 0x63, 0x68, 0x69, 0x6A, 0x6B)


class FakeVmfd(fakes.FakeVmfd):
    """Lines are only ever made level-triggered here: recorded as bare numbers."""

    def set_level_triggered(self, irq: int, level: bool = True) -> None:
        assert level is True
        self.level_triggered.append(irq)
        self.events.append(("level", irq))


class FakeVm(fakes.FakeVm):
    vmfd_type = FakeVmfd


class IntxDev(PciDevice):
    def __init__(self, name: str, pin: int = 1) -> None:
        super().__init__(name)
        self.set_identity(0x1AF4, 0x1000, 0x020000)
        self.request_intx(pin)


def machine(*devices: tuple[tuple[int, int, int], PciDevice], assign: bool = True,
            **kwargs: Any) -> tuple[FakeVm, PciBus, LpcBridge]:
    vm = FakeVm(**kwargs)
    bus = PciBus()
    vm.attach(bus)
    lpc = bridge.create(vm=vm, slot=LPC, config={})  # type: ignore[arg-type]
    bus.add(LPC, lpc)
    bridge.attach_isa_devices(vm)  # as the LPC plugin's hvf_machine_build does
    for bdf, dev in devices:
        bus.add(bdf, dev)
    if assign:
        bus.assign_resources(enable_decoding=True)
    return vm, bus, lpc


# ---- identity ----


def test_identity() -> None:
    vm, _bus, lpc = machine()
    assert lpc.name == "lpc@pci.0.31.0"
    assert vm.device("lpc@pci.0.31.0") is lpc
    assert cfg_read(vm, LPC, 0x00, 4) == 0x7000_8086
    assert cfg_read(vm, LPC, 0x08, 4) == 0x0601_0000  # ISA bridge, revision 0
    assert cfg_read(vm, LPC, 0x09, 1) == 0x00
    assert cfg_read(vm, LPC, 0x0A, 2) == 0x0601
    assert cfg_read(vm, LPC, 0x0E, 1) == 0x00
    assert cfg_read(vm, LPC, 0x2C, 4) == 0
    assert cfg_read(vm, LPC, 0x34, 1) == 0 and cfg_read(vm, LPC, 0x06, 2) & 0x10 == 0
    assert cfg_read(vm, LPC, 0x3C, 2) == 0x00FF  # no interrupt pin
    assert ecam_read(vm, LPC, 0x00, 4) == 0x7000_8086
    for bar in range(6):  # no BARs: sizing reads zero
        cfg_write(vm, LPC, 0x10 + 4 * bar, 4, 0xFFFF_FFFF)
        assert cfg_read(vm, LPC, 0x10 + 4 * bar, 4) == 0
    assert cfg_read(vm, LPC, 0x04, 2) == 0x0004  # nothing to decode: bus mastering only


def test_identity_is_read_only() -> None:
    vm, _bus, _lpc = machine()
    for offset in (0x00, 0x08, 0x2C):
        for size in (1, 2, 4):
            for sub in range(0, 4, size):
                cfg_write(vm, LPC, offset + sub, size, 0)
    cfg_write(vm, LPC, 0x0E, 1, 0x80)
    cfg_write(vm, LPC, 0x3D, 1, 0x01)
    assert cfg_read(vm, LPC, 0x00, 4) == 0x7000_8086
    assert cfg_read(vm, LPC, 0x08, 4) == 0x0601_0000
    assert cfg_read(vm, LPC, 0x0C, 4) == 0
    assert cfg_read(vm, LPC, 0x3C, 4) == 0x0000_00FF


def test_generic_registers_through_the_bridge() -> None:
    vm, _bus, _lpc = machine()
    cfg_write(vm, LPC, 0x04, 4, 0xFFFF_FFFF)
    assert cfg_read(vm, LPC, 0x04, 4) == 0x0000_077F
    cfg_write(vm, LPC, 0x0C, 4, 0xFFFF_FFFF)
    assert cfg_read(vm, LPC, 0x0C, 4) == 0x0000_FFFF
    cfg_write(vm, LPC, 0x3C, 4, 0xFFFF_FF09)
    assert cfg_read(vm, LPC, 0x3C, 4) == 0x0000_0009
    cfg_write(vm, LPC, 0x64, 4, 0xFFFF_FFFF)  # between the two PIRQ banks: nothing
    cfg_write(vm, LPC, 0x6C, 4, 0xFFFF_FFFF)
    assert cfg_read(vm, LPC, 0x64, 4) == 0 and cfg_read(vm, LPC, 0x6C, 4) == 0


def test_pcireg_overrides() -> None:
    vm, _bus, _lpc = machine(config={
        "lpc.pcireg.vendor": "0x1022", "lpc.pcireg.device": "0x790e",
        "lpc.pcireg.revid": "0x51", "lpc.pcireg.subvendor": "0x17aa",
        "lpc.pcireg.subdevice": "42",
    })
    assert cfg_read(vm, LPC, 0x00, 4) == 0x790E_1022
    assert cfg_read(vm, LPC, 0x08, 4) == 0x0601_0051
    assert cfg_read(vm, LPC, 0x2C, 4) == 0x002A_17AA


def test_bad_pcireg_value() -> None:
    vm = FakeVm(config={"lpc.pcireg.device": "fast"})
    with pytest.raises(ConfigError, match="lpc.pcireg.device"):
        bridge.create(vm=vm, slot=LPC, config={})  # type: ignore[arg-type]


# ---- PIRQ routing registers ----


def test_pirq_registers_reset_to_disabled() -> None:
    vm, _bus, _lpc = machine(assign=False)
    assert cfg_read(vm, LPC, 0x60, 4) == 0x8080_8080
    assert cfg_read(vm, LPC, 0x68, 4) == 0x8080_8080
    assert cfg_read(vm, LPC, 0x62, 2) == 0x8080
    assert [cfg_read(vm, LPC, off, 1) for off in PIRQ_OFFSETS] == [0x80] * 8
    assert ecam_read(vm, LPC, 0x68, 4) == 0x8080_8080
    assert cfg_read(vm, LPC, 0x64, 4) == 0


def test_pirq_byte_writes_are_masked() -> None:
    vm, bus, _lpc = machine(assign=False)
    for value, stored in ((0xFF, 0x8F), (0x0B, 0x0B), (0x70, 0x00), (0x85, 0x85), (0x2A, 0x0A)):
        for n, off in enumerate(PIRQ_OFFSETS):
            cfg_write(vm, LPC, off, 1, value)
            assert cfg_read(vm, LPC, off, 1) == stored
            assert bus.intx.read(n) == stored
    assert cfg_read(vm, LPC, 0x64, 4) == 0


def test_pirq_word_and_dword_writes() -> None:
    vm, bus, _lpc = machine(assign=False)
    cfg_write(vm, LPC, 0x60, 4, 0x0E0C_0A09)
    cfg_write(vm, LPC, 0x68, 4, 0xFFF0_8705)
    assert cfg_read(vm, LPC, 0x60, 4) == 0x0E0C_0A09
    assert cfg_read(vm, LPC, 0x68, 4) == 0x8F80_8705
    assert list(bus.intx.pirq) == [0x09, 0x0A, 0x0C, 0x0E, 0x05, 0x87, 0x80, 0x8F]
    cfg_write(vm, LPC, 0x62, 2, 0x0706)
    assert cfg_read(vm, LPC, 0x60, 4) == 0x0706_0A09
    ecam_write(vm, LPC, 0x6A, 2, 0x0B03)
    assert ecam_read(vm, LPC, 0x68, 4) == 0x0B03_8705
    assert bus.intx.isa_irq(6) == 3 and bus.intx.isa_irq(7) == 11
    assert bus.intx.isa_irq(5) is None  # bit 7: disabled
    cfg_write(vm, LPC, 0x61, 2, 0x0000)  # misaligned: ignored
    assert cfg_read(vm, LPC, 0x60, 4) == 0x0706_0A09
    # the routing took effect: each newly valid IRQ was made level-triggered
    # the SCI (IRQ 9) is made level-triggered first, when the PM block attaches
    assert vm.vmfd.level_triggered == [9, 10, 12, 14, 5, 6, 7, 3, 11]  # each once
    assert vm.irqs == []  # nothing was asserted


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0x5C, 0x6F), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFF_FFFF), st.booleans()), max_size=12))
def test_pirq_registers_random_writes(writes: list[tuple[int, int, int, bool]]) -> None:
    vm, bus, _lpc = machine(assign=False)
    model = dict.fromkeys(PIRQ_OFFSETS, 0x80)
    for offset, size, value, use_ecam in writes:
        value &= (1 << (8 * size)) - 1
        (ecam_write if use_ecam else cfg_write)(vm, LPC, offset, size, value)
        if offset % size == 0:
            for i in range(size):
                if offset + i in model:
                    model[offset + i] = (value >> (8 * i)) & 0x8F
    for offset in range(0x5C, 0x70):
        expected = model.get(offset, 0)
        assert cfg_read(vm, LPC, offset, 1) == expected
        assert ecam_read(vm, LPC, offset, 1) == expected
    assert list(bus.intx.pirq) == [model[off] for off in PIRQ_OFFSETS]
    assert vm.irqs == []


def test_routing_programs_the_pirq_registers() -> None:
    # slot 3 INTA → PIRQ 0 (0x60), slot 0 INTA → PIRQ 5 (0x69), slot 5 INTB → PIRQ 3 (0x63)
    devs = [((0, 3, 0), IntxDev("a")), ((0, 0, 0), IntxDev("b")), ((0, 5, 0), IntxDev("c", 2))]
    vm, bus, _lpc = machine(*devs)
    assert [pirq_for(s, p) for s, p in ((3, 1), (0, 1), (5, 2))] == [0, 5, 3]
    assert cfg_read(vm, LPC, 0x60, 4) == 0x0780_8005
    assert cfg_read(vm, LPC, 0x68, 4) == 0x8080_0680
    assert [cfg_read(vm, bdf, 0x3C, 1) for bdf, _dev in devs] == [5, 6, 7]
    assert sorted(vm.vmfd.level_triggered) == [5, 6, 7, 9]  # 9: the ACPI SCI
    assert bus.intx.reserved >= {3, 4}


def test_com_irqs_are_reserved() -> None:
    devs = [((0, slot, 0), IntxDev(f"d{slot}")) for slot in range(8)]
    vm, bus, _lpc = machine(*devs)
    irqs = [cfg_read(vm, bdf, 0x3C, 1) for bdf, _dev in devs]
    assert 3 not in irqs and 4 not in irqs
    assert sorted(irqs) == [5, 6, 7, 10, 11, 12, 14, 15]  # 9, the SCI, is used last
    # a guest may still route a PIRQ to them itself
    cfg_write(vm, LPC, 0x60, 1, 0x03)
    assert bus.intx.isa_irq(0) == 3


def test_rewriting_an_asserted_pirq_moves_the_assertion() -> None:
    dev = IntxDev("a")
    vm, bus, _lpc = machine(((0, 3, 0), dev))  # PIRQA (0x60) → IRQ 5, GSI 16
    assert cfg_read(vm, LPC, 0x60, 1) == 0x05
    vm.events.clear()
    dev.set_intx(True)
    assert vm.events == [("irq", 16, True), ("irq", 5, True)]
    vm.events.clear()
    cfg_write(vm, LPC, 0x60, 1, 0x0A)
    assert vm.events == [("irq", 5, False), ("level", 10), ("irq", 10, True)]
    vm.events.clear()
    cfg_write(vm, LPC, 0x60, 1, 0x0A)  # the same routing again: nothing happens
    cfg_write(vm, LPC, 0x60, 1, 0x1A)  # bit 4 is not stored: still IRQ 10
    assert vm.events == []
    cfg_write(vm, LPC, 0x60, 4, 0x8080_800B)  # a dword write reaches the router too
    assert vm.events == [("irq", 10, False), ("level", 11), ("irq", 11, True)]
    vm.events.clear()
    cfg_write(vm, LPC, 0x60, 1, 0x8B)  # disabled: the 8259 input drops, the IOAPIC pin stays
    assert vm.events == [("irq", 11, False)]
    vm.events.clear()
    cfg_write(vm, LPC, 0x60, 1, 0x0D)  # IRQ 13 is not permitted: still disabled
    assert vm.events == []
    assert bus.intx.isa_irq(0) is None
    cfg_write(vm, LPC, 0x60, 1, 0x0C)
    assert vm.events == [("level", 12), ("irq", 12, True)]
    vm.events.clear()
    dev.set_intx(False)
    assert vm.events == [("irq", 16, False), ("irq", 12, False)]
    vm.events.clear()
    cfg_write(vm, LPC, 0x60, 1, 0x0E)  # not asserted: only the trigger mode changes
    assert vm.events == [("level", 14)]
    assert cfg_read(vm, (0, 3, 0), 0x3C, 1) == 5  # INTLINE is the guest's to update


def test_rewriting_a_shared_pirq_moves_it_once() -> None:
    a, b = IntxDev("a"), IntxDev("b")
    vm, _bus, _lpc = machine(((0, 1, 0), a), ((0, 9, 0), b))  # both PIRQG (0x6A), IRQ 5
    assert cfg_read(vm, LPC, 0x6A, 1) == 0x05
    a.set_intx(True)
    b.set_intx(True)
    vm.events.clear()
    cfg_write(vm, LPC, 0x6A, 1, 0x09)
    # IRQ 9 is the SCI's, level-triggered already
    assert vm.events == [("irq", 5, False), ("irq", 9, True)]
    vm.events.clear()
    a.set_intx(False)
    assert vm.events == []
    b.set_intx(False)
    assert vm.events == [("irq", 22, False), ("irq", 9, False)]


def test_masked_intx_is_not_moved_by_a_pirq_rewrite() -> None:
    dev = IntxDev("a")
    vm, _bus, _lpc = machine(((0, 3, 0), dev))
    dev.set_intx(True)
    cfg_write(vm, (0, 3, 0), 0x04, 2, 0x0400)  # INTx Disable
    vm.events.clear()
    cfg_write(vm, LPC, 0x60, 1, 0x0A)
    assert vm.events == [("level", 10)]
    vm.events.clear()
    cfg_write(vm, (0, 3, 0), 0x04, 2, 0x0000)
    assert vm.events == [("irq", 16, True), ("irq", 10, True)]


# ---- placement and the devices behind the bridge ----


def test_only_on_bus_0() -> None:
    vm = FakeVm()
    bus = PciBus()
    vm.attach(bus)
    lpc = bridge.create(vm=vm, slot=(1, 31, 0), config={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="only on bus 0"):
        bus.add((1, 31, 0), lpc)
    assert not any(isinstance(d, LpcBridge) for d in vm.devices)


def test_only_one() -> None:
    vm, bus, _lpc = machine(assign=False)
    second = bridge.create(vm=vm, slot=(0, 30, 0), config={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Only one LPC bridge is allowed"):
        bus.add((0, 30, 0), second)
    assert sum(isinstance(d, LpcBridge) for d in vm.devices) == 1


def test_lpc_devices_are_built_behind_the_bridge() -> None:
    built: list[tuple[Any, Any]] = []

    class Legacy(Device):
        def attach(self, ctx: Any) -> None:
            ctx.pio.register(0x402, 1, self.name)

    def make(*, vm: Any, config: Any) -> Device:
        built.append((vm, config))
        return Legacy("legacy")

    def absent(*, vm: Any, config: Any) -> None:
        built.append((vm, config))
        return None

    entries = [types.SimpleNamespace(name="legacy", factory=make),
               types.SimpleNamespace(name="absent", factory=absent)]
    vm, _bus, lpc = machine(lpc_devices=entries, assign=False)
    assert built == [(vm, vm.config), (vm, vm.config)]
    assert [d.name for d in vm.devices if not isinstance(d, PciBus)] == [
        lpc.name, "rtc", "kbc", "reset", "pm", "legacy",  # the bridge, then what is behind it
    ]
    assert vm.pio.lookup(0x402).owner == "legacy"  # type: ignore[union-attr]


def test_kbc_output_queue_is_bounded() -> None:
    """A guest that issues commands and never reads the answers cannot grow it."""
    from hvf.plugins.lpc.kbc import QUEUE_LIMIT, KeyboardController

    vm = fakes.FakeVm()
    kbc = KeyboardController()
    vm.attach(kbc)
    for _ in range(10 * QUEUE_LIMIT):
        fakes.outp(vm, 0x64, 1, 0xAA)  # self test: answers 0x55
    assert len(kbc.state.queue) == QUEUE_LIMIT
    assert [fakes.inp(vm, 0x60, 1) for _ in range(QUEUE_LIMIT)] == [0x55] * QUEUE_LIMIT
    assert fakes.inp(vm, 0x64, 1) & 0x01 == 0  # output buffer empty
