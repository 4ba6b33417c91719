# SPDX-License-Identifier: BSD-2-Clause
"""Tests for the PCI core: config mechanism #1, ECAM, BARs, capabilities and INTx.

Nothing here needs KVM. Config space is driven only the way a guest drives it: through
the handlers registered at 0xCF8/0xCFC-0xCFF and in the ECAM window, called exactly as
the vCPU loop calls them (``range.read(port - range.base, size)``). BAR decoding is
checked in the port and MMIO registries themselves.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
from hvf.errors import ConfigError, DeviceError
from hvf.iobus import MmioBus, PortBus, Range
from hvf.memory import GiB, KiB, MiB
from hvf.plugins.pci import hostbridge
from hvf.plugins.pci.bus import ECAM_BASE, ECAM_SIZE, PciBus
from hvf.plugins.pci import BAR_IO, BAR_MEM32, BAR_MEM64, PciDevice
from hvf.plugins.pci.intx import PERMITTED_IRQS, pirq_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fakes import (
    FakeVm,
    cfg_read,
    cfg_write,
    conf1,
    ecam_read,
    ecam_write,
    inp,
    mmio_read,
    mmio_write,
    outp,
)

# ---- a machine with just what the PCI code touches (fakes.FakeVm) ----


def make_vm(**kwargs: Any) -> tuple[FakeVm, PciBus]:
    vm = FakeVm(**kwargs)
    bus = PciBus()
    vm.attach(bus)
    return vm, bus


ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


# ---- a test device ----


class Recorder:
    """BAR handlers that log (offset, size[, value]) and read back a marker."""

    def __init__(self, marker: int) -> None:
        self.marker = marker
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.marker

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class Dev(PciDevice):
    """A function with whatever BARs a test asks for: ``(index, kind, size[, prefetch])``."""

    def __init__(
        self,
        name: str,
        bars: tuple[tuple[Any, ...], ...] = (),
        *,
        vendor: int = 0x1AF4,
        device: int = 0x1234,
        class_code: int = 0x020000,
        revision: int = 0x05,
        pin: int = 0,
    ) -> None:
        super().__init__(name)
        self.set_identity(vendor, device, class_code, revision=revision,
                          subsystem_vendor=0x1AF4, subsystem=0x0042)
        self.handlers: dict[int, Recorder] = {}
        for index, kind, size, *prefetch in bars:
            rec = Recorder(0xA0 + index)
            self.handlers[index] = rec
            self.add_bar(index, kind, size, rec.read, rec.write,
                         prefetchable=bool(prefetch and prefetch[0]))
        if pin:
            self.request_intx(pin)


STD_BARS = ((0, BAR_IO, 32), (1, BAR_MEM32, 4096), (2, BAR_MEM64, 1 * MiB, True))


def machine_with(*devs: tuple[tuple[int, int, int], PciDevice], enable: bool = True,
                 **kwargs: Any) -> tuple[FakeVm, PciBus]:
    vm, bus = make_vm(**kwargs)
    for bdf, dev in devs:
        bus.add(bdf, dev)
    bus.assign_resources(enable_decoding=enable)
    return vm, bus


def bar_address(vm: FakeVm, bdf: tuple[int, int, int], index: int) -> int:
    """The address a guest reads out of BAR ``index`` (both halves for a MEM64 BAR)."""
    low = cfg_read(vm, bdf, 0x10 + 4 * index, 4)
    if low & 1:
        return low & ~0x3
    if low & 0x6 == 0x4:
        return (low & ~0xF) | cfg_read(vm, bdf, 0x14 + 4 * index, 4) << 32
    return low & ~0xF


def decoded_at(space: PortBus | MmioBus, bar_range: Range) -> list[Range]:
    return [r for r in space.ranges() if r is bar_range]


# ==== 1. configuration mechanism #1 and ECAM ====

BDF = (0, 3, 0)


@pytest.fixture
def one() -> tuple[FakeVm, PciBus, Dev]:
    dev = Dev("dev@pci.0.3.0", STD_BARS, pin=1)
    vm, bus = machine_with((BDF, dev))
    return vm, bus, dev


def test_config_ports_are_registered_as_bhyve_does() -> None:
    vm, _bus = make_vm()
    cf8 = vm.pio.lookup(0xCF8)
    assert cf8 is not None and cf8.length == 1
    data = vm.pio.lookup(0xCFC)
    assert data is not None and data.length == 4
    assert all(vm.pio.lookup(p) is data for p in range(0xCFC, 0xD00))
    assert vm.pio.lookup(0xCF9) is None  # the reset control register is not PCI's
    ecam = vm.mmio.lookup(ECAM_BASE)
    assert ecam is not None and (ecam.base, ecam.length) == (ECAM_BASE, ECAM_SIZE)


def test_cf8_latches_only_dword_writes(one: Any) -> None:
    vm, _bus, _dev = one
    outp(vm, 0xCF8, 4, 0x8012_3456)
    assert inp(vm, 0xCF8, 4) == 0x8012_3454  # bits 1:0 are not part of the register
    assert inp(vm, 0xCF8, 1) == 0xFF
    assert inp(vm, 0xCF8, 2) == 0xFFFF
    outp(vm, 0xCF8, 1, 0x00)
    outp(vm, 0xCF8, 2, 0x0000)
    assert inp(vm, 0xCF8, 4) == 0x8012_3454
    outp(vm, 0xCF8, 4, 0x7F00_0000 | conf1(BDF, 0))  # reserved bits 30:24 dropped
    assert inp(vm, 0xCF8, 4) == conf1(BDF, 0)
    assert inp(vm, 0xCFC, 4) == 0x1234_1AF4


def test_narrow_write_to_cf8_does_not_redirect_data(one: Any) -> None:
    vm, _bus, _dev = one
    outp(vm, 0xCF8, 4, conf1(BDF, 0x00))
    outp(vm, 0xCF8, 1, 0x08)  # would select the class register if it latched
    assert inp(vm, 0xCFC, 4) == 0x1234_1AF4


def test_disabled_enable_bit_reads_all_ones_and_ignores_writes(one: Any) -> None:
    vm, _bus, _dev = one
    outp(vm, 0xCF8, 4, conf1(BDF, 0x0C, enable=False))
    for size in (1, 2, 4):
        assert inp(vm, 0xCFC, size) == ONES[size]
    assert inp(vm, 0xCFD, 1) == 0xFF
    outp(vm, 0xCFC, 1, 0x20)  # cache-line size, but the access is not enabled
    assert cfg_read(vm, BDF, 0x0C, 1) == 0


def test_data_port_lanes(one: Any) -> None:
    vm, _bus, _dev = one
    outp(vm, 0xCF8, 4, conf1(BDF, 0x00))
    assert inp(vm, 0xCFC, 4) == 0x1234_1AF4
    assert [inp(vm, 0xCFC + k, 1) for k in range(4)] == [0xF4, 0x1A, 0x34, 0x12]
    assert inp(vm, 0xCFC, 2) == 0x1AF4
    assert inp(vm, 0xCFE, 2) == 0x1234
    outp(vm, 0xCF8, 4, conf1(BDF, 0x08))
    assert inp(vm, 0xCFC, 4) == 0x0200_0005  # class 02/00/00, revision 5
    assert inp(vm, 0xCFF, 1) == 0x02
    assert inp(vm, 0xCFC, 1) == 0x05
    outp(vm, 0xCF8, 4, conf1(BDF, 0x2C))
    assert inp(vm, 0xCFE, 2) == 0x0042


def test_data_port_lane_writes(one: Any) -> None:
    vm, _bus, _dev = one
    outp(vm, 0xCF8, 4, conf1(BDF, 0x3C))
    outp(vm, 0xCFC, 1, 0x0B)
    assert inp(vm, 0xCFC, 4) & 0xFF == 0x0B
    outp(vm, 0xCF8, 4, conf1(BDF, 0x0C))
    outp(vm, 0xCFD, 1, 0x40)  # latency timer
    outp(vm, 0xCFC, 1, 0x10)  # cache-line size
    assert inp(vm, 0xCFC, 2) == 0x4010


@pytest.mark.parametrize("port,size", [(0xCFD, 2), (0xCFF, 2), (0xCFD, 4), (0xCFE, 4), (0xCFF, 4)])
def test_misaligned_data_port_accesses(one: Any, port: int, size: int) -> None:
    vm, _bus, _dev = one
    outp(vm, 0xCF8, 4, conf1(BDF, 0x0C))
    assert inp(vm, port, size) == ONES[size]
    outp(vm, port, size, 0)
    outp(vm, 0xCF8, 4, conf1(BDF, 0x0C))
    outp(vm, 0xCFC, 4, 0x0000_2010)
    outp(vm, port, size, 0)  # ignored
    assert inp(vm, 0xCFC, 2) == 0x2010


def test_absent_functions_read_all_ones(one: Any) -> None:
    vm, _bus, _dev = one
    for bdf in ((0, 4, 0), (0, 3, 1), (1, 3, 0), (255, 31, 7)):
        for size in (1, 2, 4):
            assert cfg_read(vm, bdf, 0, size) == ONES[size]
            assert ecam_read(vm, bdf, 0, size) == ONES[size]
        cfg_write(vm, bdf, 0x3C, 1, 0)  # nothing to write: no error
        ecam_write(vm, bdf, 0x3C, 1, 0)


def test_ecam_matches_mechanism_1(one: Any) -> None:
    vm, _bus, _dev = one
    for offset in range(0, 0x40, 4):
        assert ecam_read(vm, BDF, offset, 4) == cfg_read(vm, BDF, offset, 4)
    assert ecam_read(vm, BDF, 0x02, 2) == 0x1234
    assert ecam_read(vm, BDF, 0x0B, 1) == 0x02
    ecam_write(vm, BDF, 0x0D, 1, 0x80)
    assert cfg_read(vm, BDF, 0x0D, 1) == 0x80
    cfg_write(vm, BDF, 0x3C, 1, 0x0E)
    assert ecam_read(vm, BDF, 0x3C, 1) == 0x0E


def test_ecam_extended_space(one: Any) -> None:
    vm, _bus, _dev = one
    for offset, size in ((0x100, 4), (0x100, 2), (0x102, 2), (0x100, 1), (0x103, 1)):
        assert ecam_read(vm, BDF, offset, size) == 0, (offset, size)
    for offset, size in ((0x104, 4), (0x104, 1), (0x200, 4), (0xFFC, 4), (0xFFF, 1)):
        assert ecam_read(vm, BDF, offset, size) == ONES[size], (offset, size)
    before = [ecam_read(vm, BDF, off, 4) for off in range(0, 256, 4)]
    ecam_write(vm, BDF, 0x100, 4, 0xFFFF_FFFF)
    ecam_write(vm, BDF, 0x13C, 1, 0x55)  # not an alias of INTLINE
    assert ecam_read(vm, BDF, 0x100, 4) == 0
    assert [ecam_read(vm, BDF, off, 4) for off in range(0, 256, 4)] == before


@pytest.mark.parametrize("offset,size", [(0x01, 2), (0x03, 2), (0x02, 4), (0x0D, 4), (0x101, 2),
                                         (0x102, 4), (0x00, 3), (0x00, 8)])
def test_ecam_misaligned_or_odd_widths_read_all_ones(one: Any, offset: int, size: int) -> None:
    vm, _bus, _dev = one
    assert ecam_read(vm, BDF, offset, size) == (1 << (8 * size)) - 1
    ecam_write(vm, BDF, offset, size, 0)
    assert ecam_read(vm, BDF, 0, 4) == 0x1234_1AF4


# ==== 2. identity, writable registers, command, header type ====


IDENTITY = [(0x00, 4), (0x08, 4), (0x2C, 4), (0x0E, 1), (0x3D, 1), (0x06, 2), (0x34, 1)]


def test_identity_registers_are_read_only(one: Any) -> None:
    vm, _bus, _dev = one
    before = {(off, size): cfg_read(vm, BDF, off, size) for off, size in IDENTITY}
    assert before[(0x00, 4)] == 0x1234_1AF4
    assert before[(0x08, 4)] == 0x0200_0005
    assert before[(0x2C, 4)] == 0x0042_1AF4
    assert before[(0x3D, 1)] == 1
    for value in (0xFFFF_FFFF, 0, 0x5A5A_5A5A):
        for off in range(0, 0x40, 4):
            if not 0x10 <= off < 0x28:
                for size in (1, 2, 4):
                    for sub in range(0, 4, size):
                        cfg_write(vm, BDF, off + sub, size, value)
                        ecam_write(vm, BDF, off + sub, size, value)
        assert {(o, s): cfg_read(vm, BDF, o, s) for o, s in IDENTITY} == before


def test_writable_registers(one: Any) -> None:
    vm, _bus, _dev = one
    assert cfg_read(vm, BDF, 0x0C, 2) == 0
    cfg_write(vm, BDF, 0x0C, 4, 0xFFFF_FFFF)  # header type and BIST bytes stay
    assert cfg_read(vm, BDF, 0x0C, 4) == 0x0000_FFFF
    cfg_write(vm, BDF, 0x0C, 1, 0x10)
    cfg_write(vm, BDF, 0x0D, 1, 0x40)
    assert cfg_read(vm, BDF, 0x0C, 2) == 0x4010
    cfg_write(vm, BDF, 0x3C, 4, 0xFFFF_FF0A)  # only INTLINE of the dword is writable
    assert cfg_read(vm, BDF, 0x3C, 4) == 0x0000_010A
    cfg_write(vm, BDF, 0x3C, 2, 0x0005)
    assert cfg_read(vm, BDF, 0x3C, 1) == 0x05


def test_command_register_mask(one: Any) -> None:
    vm, _bus, dev = one
    status = cfg_read(vm, BDF, 0x06, 2)
    cfg_write(vm, BDF, 0x04, 4, 0xFFFF_FFFF)
    assert cfg_read(vm, BDF, 0x04, 2) == 0x077F
    assert cfg_read(vm, BDF, 0x06, 2) == status  # no status bit is writable
    cfg_write(vm, BDF, 0x04, 2, 0)
    assert cfg_read(vm, BDF, 0x04, 4) == status << 16
    cfg_write(vm, BDF, 0x05, 1, 0xFF)
    assert cfg_read(vm, BDF, 0x04, 2) == 0x0700
    cfg_write(vm, BDF, 0x04, 1, 0xFF)
    assert cfg_read(vm, BDF, 0x04, 2) == 0x077F
    cfg_write(vm, BDF, 0x06, 2, 0xFFFF)
    cfg_write(vm, BDF, 0x07, 1, 0x00)
    assert cfg_read(vm, BDF, 0x06, 2) == status
    assert dev.command == 0x077F


def test_multifunction_bit_only_with_more_than_one_function() -> None:
    vm, bus = make_vm()
    bus.add((0, 2, 0), Dev("a"))
    bus.add((0, 5, 0), Dev("b"))
    assert cfg_read(vm, (0, 2, 0), 0x0E, 1) == 0x00
    assert cfg_read(vm, (0, 2, 0), 0x0C, 4) >> 16 == 0x0000
    bus.add((0, 2, 3), Dev("c"))
    for bdf in ((0, 2, 0), (0, 2, 3)):
        assert cfg_read(vm, bdf, 0x0E, 1) == 0x80
        assert cfg_read(vm, bdf, 0x0E, 2) == 0x0080
        assert cfg_read(vm, bdf, 0x0C, 4) == 0x0080_0000
        assert ecam_read(vm, bdf, 0x0E, 1) == 0x80
    assert cfg_read(vm, (0, 5, 0), 0x0E, 1) == 0x00  # its own slot has one function
    cfg_write(vm, (0, 2, 0), 0x0E, 1, 0x00)
    assert cfg_read(vm, (0, 2, 0), 0x0E, 1) == 0x80
    cfg_write(vm, (0, 5, 0), 0x0E, 1, 0x80)
    assert cfg_read(vm, (0, 5, 0), 0x0E, 1) == 0x00


def test_multifunction_bit_is_recomputed_not_just_added() -> None:
    dev = PciDevice("d")
    dev.set_identity(0x1AF4, 0x1000, 0x020000, header_type=0x80)
    vm, bus = make_vm()
    bus.add((0, 2, 0), dev)
    assert cfg_read(vm, (0, 2, 0), 0x0E, 1) == 0x00


def test_occupied_slot_is_refused() -> None:
    _vm, bus = make_vm()
    bus.add((0, 2, 0), Dev("a"))
    with pytest.raises(ConfigError, match="already occupied"):
        bus.add((0, 2, 0), Dev("b"))


# ==== 3. BARs ====


def sized(vm: FakeVm, bdf: tuple[int, int, int], offset: int) -> int:
    """Size a BAR register as firmware does, then put the old value back."""
    old = cfg_read(vm, bdf, offset, 4)
    cfg_write(vm, bdf, offset, 4, 0xFFFF_FFFF)
    probe = cfg_read(vm, bdf, offset, 4)
    cfg_write(vm, bdf, offset, 4, old)
    assert cfg_read(vm, bdf, offset, 4) == old
    return probe


@pytest.mark.parametrize("enable", [True, False])
def test_bar_sizing(enable: bool) -> None:
    dev = Dev("d", ((0, BAR_IO, 32), (1, BAR_MEM32, 4096), (2, BAR_MEM64, 1 * MiB, True),
                    (4, BAR_MEM64, 16 * KiB)))
    vm, _bus = machine_with((BDF, dev), enable=enable)
    assert sized(vm, BDF, 0x10) == 0xFFFF_FFE1
    assert sized(vm, BDF, 0x14) == 0xFFFF_F000
    assert sized(vm, BDF, 0x18) == 0xFFF0_000C
    assert sized(vm, BDF, 0x1C) == 0xFFFF_FFFF  # the upper half of a 64-bit BAR
    assert sized(vm, BDF, 0x20) == 0xFFFF_C004
    assert sized(vm, BDF, 0x24) == 0xFFFF_FFFF
    # the BARs still decode where they were (when decoding is on)
    for index, space in ((0, vm.pio), (1, vm.mmio), (2, vm.mmio), (4, vm.mmio)):
        bar = dev.bars[index]
        assert bar is not None and bar.range is not None
        assert bar.address == bar_address(vm, BDF, index)
        assert (space.lookup(bar.address) is bar.range) == enable



@pytest.mark.parametrize("kind,asked,size", [
    (BAR_IO, 1, 4), (BAR_IO, 4, 4), (BAR_IO, 5, 8), (BAR_IO, 200, 256),
    (BAR_MEM32, 1, 16), (BAR_MEM32, 17, 32), (BAR_MEM32, 3000, 4096),
    (BAR_MEM64, 0, 16), (BAR_MEM64, 100 * KiB, 128 * KiB), (BAR_MEM64, 3 * MiB, 4 * MiB),
])
def test_bar_sizes_are_powers_of_two_with_minimums(kind: str, asked: int, size: int) -> None:
    dev = Dev("d", ((0, kind, asked),))
    vm, _bus = machine_with((BDF, dev))
    low_bits = {BAR_IO: 0x1, BAR_MEM32: 0x0, BAR_MEM64: 0x4}[kind]
    assert sized(vm, BDF, 0x10) == (~(size - 1) & 0xFFFF_FFFF) | low_bits
    bar = dev.bars[0]
    assert bar is not None and bar.size == size and bar.address % size == 0


def test_unused_bar_registers_read_zero_and_ignore_writes() -> None:
    dev = Dev("d", ((1, BAR_MEM32, 4096),))
    vm, _bus = machine_with((BDF, dev))
    for index in (0, 2, 3, 4, 5):
        assert sized(vm, BDF, 0x10 + 4 * index) == 0
    assert cfg_read(vm, BDF, 0x28, 4) == 0  # CardBus CIS pointer
    assert cfg_read(vm, BDF, 0x30, 4) == 0  # no expansion ROM


def test_bar_declaration_errors() -> None:
    dev = PciDevice("d")
    with pytest.raises(DeviceError, match="unknown BAR kind"):
        dev.add_bar(0, "rom", 4, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(DeviceError):
        dev.add_bar(5, BAR_MEM64, 16, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(DeviceError):
        dev.add_bar(6, BAR_IO, 4, lambda o, s: 0, lambda o, s, v: None)
    dev.add_bar(1, BAR_IO, 4, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(DeviceError, match="already used"):
        dev.add_bar(0, BAR_MEM64, 16, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(DeviceError, match="already used"):
        dev.add_bar(1, BAR_MEM32, 16, lambda o, s: 0, lambda o, s, v: None)


def test_bar_over_the_upper_half_of_a_64_bit_bar_is_refused() -> None:
    dev = PciDevice("d")
    dev.add_bar(0, BAR_MEM64, 16, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(DeviceError, match="already used"):
        dev.add_bar(1, BAR_IO, 4, lambda o, s: 0, lambda o, s, v: None)


def test_allocation_is_largest_first_and_naturally_aligned() -> None:
    a = Dev("a", ((0, BAR_MEM32, 4096), (1, BAR_IO, 16)))
    b = Dev("b", ((0, BAR_MEM32, 1 * MiB), (1, BAR_MEM64, 2 * MiB), (3, BAR_IO, 256)))
    c = Dev("c", ((0, BAR_MEM32, 64 * KiB), (2, BAR_MEM64, 128 * MiB)))
    vm, bus = machine_with(((0, 1, 0), a), ((0, 2, 0), b), ((0, 3, 0), c))
    assert bar_address(vm, (0, 3, 0), 2) == 0xC000_0000  # 128 MiB: still the 32-bit window
    assert bar_address(vm, (0, 2, 0), 1) == 0xC800_0000
    assert bar_address(vm, (0, 2, 0), 0) == 0xC820_0000
    assert bar_address(vm, (0, 3, 0), 0) == 0xC830_0000
    assert bar_address(vm, (0, 1, 0), 0) == 0xC831_0000
    assert bar_address(vm, (0, 2, 0), 3) == 0x2000
    assert bar_address(vm, (0, 1, 0), 1) == 0x2100
    assert cfg_read(vm, (0, 3, 0), 0x1C, 4) == 0  # high half of a 32-bit-window MEM64
    assert bus.windows["mem32"] == (0xC000_0000, 0xC831_1000)
    assert bus.windows["io"] == (0x2000, 0x2110)
    for dev in (a, b, c):
        for bar in dev.bars:
            if bar is not None:
                assert bar.address % bar.size == 0


def test_allocation_skips_fixed_ranges() -> None:
    vm, bus = make_vm()
    vm.pio.register(0x2000, 8, "fixed legacy ports")
    vm.mmio.register(0xC000_1000, 0x10, "fixed mmio")
    dev = Dev("d", ((0, BAR_IO, 16), (1, BAR_IO, 256), (2, BAR_MEM32, 16), (3, BAR_MEM32, 8192)))
    bus.add(BDF, dev)
    bus.assign_resources(enable_decoding=True)
    assert bar_address(vm, BDF, 1) == 0x2100  # 0x2000 is taken; next 256-aligned
    assert bar_address(vm, BDF, 0) == 0x2200
    assert bar_address(vm, BDF, 3) == 0xC000_2000  # 8 KiB at 0xC0000000 overlaps 0xC0001000
    assert bar_address(vm, BDF, 2) == 0xC000_4000
    assert vm.pio.lookup(0x2000).owner == "fixed legacy ports"  # type: ignore[union-attr]
    assert vm.logged == []


def test_large_mem64_bar_goes_above_4g() -> None:
    dev = Dev("d", ((0, BAR_MEM64, 256 * MiB, True), (2, BAR_MEM64, 128 * MiB),
                    (4, BAR_MEM64, 512 * MiB)))
    vm, bus = machine_with((BDF, dev))
    base = 32 * GiB  # 64 MiB of RAM: no high memory, the window starts at 32 GiB
    assert bar_address(vm, BDF, 4) == base
    assert bar_address(vm, BDF, 0) == base + 512 * MiB
    assert cfg_read(vm, BDF, 0x10, 4) == 0x2000_000C
    assert cfg_read(vm, BDF, 0x14, 4) == 0x8
    assert bar_address(vm, BDF, 2) == 0xC000_0000
    assert cfg_read(vm, BDF, 0x1C, 4) == 0
    assert bus.windows["mem64"] == (base, base + 768 * MiB)
    assert vm.mmio.lookup(base + 512 * MiB) is dev.bars[0].range  # type: ignore[union-attr]
    assert vm.mmio.lookup(base + 768 * MiB - 1) is dev.bars[0].range  # type: ignore[union-attr]


def test_mem64_window_starts_above_high_memory() -> None:
    memory = types.SimpleNamespace(highmem_size=40 * GiB)  # RAM up to 44 GiB
    dev = Dev("d", ((0, BAR_MEM64, 1 * GiB),))
    vm, bus = machine_with((BDF, dev), memory=memory)
    assert bar_address(vm, BDF, 0) == 64 * GiB
    assert bus.windows["mem64"][0] == 64 * GiB


def test_no_room_in_window_is_a_config_error() -> None:
    vm, bus = make_vm()
    bus.add(BDF, Dev("d", ((0, BAR_MEM32, 1 * GiB),)))
    with pytest.raises(ConfigError, match="no room"):
        bus.assign_resources(enable_decoding=True)


def test_bar_handlers_get_offsets_inside_the_bar(one: Any) -> None:
    vm, _bus, dev = one
    io, mem = bar_address(vm, BDF, 0), bar_address(vm, BDF, 1)
    mem64 = bar_address(vm, BDF, 2)
    assert inp(vm, io + 6, 2) == 0xA0
    outp(vm, io + 31, 1, 0x5A)
    assert mmio_read(vm, mem + 0x10, 4) == 0xA1
    mmio_write(vm, mem + 0xFFC, 4, 7)
    mmio_write(vm, mem64 + 0x8_0000, 8, 1 << 40)
    assert dev.handlers[0].reads == [(6, 2)] and dev.handlers[0].writes == [(31, 1, 0x5A)]
    assert dev.handlers[1].reads == [(0x10, 4)] and dev.handlers[1].writes == [(0xFFC, 4, 7)]
    assert dev.handlers[2].writes == [(0x8_0000, 8, 1 << 40)]
    assert vm.pio.lookup(io + 32) is not dev.bars[0].range  # type: ignore[union-attr]
    assert vm.mmio.lookup(mem + 4096) is not dev.bars[1].range  # type: ignore[union-attr]


def test_reprogramming_bars_moves_handlers(one: Any) -> None:
    vm, _bus, dev = one
    io_range = dev.bars[0].range
    mem_range = dev.bars[1].range
    m64_range = dev.bars[2].range
    old_io, old_mem, old_m64 = (bar_address(vm, BDF, i) for i in (0, 1, 2))
    cfg_write(vm, BDF, 0x10, 4, 0x6000)
    assert vm.pio.lookup(old_io) is None
    assert vm.pio.lookup(0x6000) is io_range and vm.pio.lookup(0x601F) is io_range
    assert cfg_read(vm, BDF, 0x10, 4) == 0x6001
    cfg_write(vm, BDF, 0x14, 4, 0xD000_0FFF)  # low bits below the size are dropped
    assert cfg_read(vm, BDF, 0x14, 4) == 0xD000_0000
    assert vm.mmio.lookup(old_mem) is None and vm.mmio.lookup(0xD000_0000) is mem_range
    cfg_write(vm, BDF, 0x1C, 4, 0x1)  # upper half first: the BAR moves above 4 GiB
    assert vm.mmio.lookup(old_m64) is None
    assert vm.mmio.lookup((1 << 32) | old_m64) is m64_range
    cfg_write(vm, BDF, 0x18, 4, 0x0010_0000)
    assert cfg_read(vm, BDF, 0x18, 4) == 0x0010_000C
    assert vm.mmio.lookup(0x1_0010_0000) is m64_range
    assert vm.mmio.lookup((1 << 32) | old_m64) is None
    assert decoded_at(vm.mmio, m64_range) == [m64_range]  # type: ignore[arg-type]
    assert inp(vm, 0x6004, 4) == 0xA0 and dev.handlers[0].reads == [(4, 4)]
    assert mmio_read(vm, 0x1_0010_0010, 4) == 0xA2 and dev.handlers[2].reads == [(0x10, 4)]
    # narrow writes to a BAR are ignored, as in bhyve
    cfg_write(vm, BDF, 0x14, 2, 0)
    cfg_write(vm, BDF, 0x17, 1, 0xC1)
    assert cfg_read(vm, BDF, 0x14, 4) == 0xD000_0000
    assert vm.mmio.lookup(0xD000_0000) is mem_range
    assert vm.logged == []


def test_decode_toggles_unmap_and_remap(one: Any) -> None:
    vm, _bus, dev = one
    io, mem, m64 = (dev.bars[i] for i in (0, 1, 2))
    cfg_write(vm, BDF, 0x04, 2, 0x0002)  # I/O decoding off
    assert vm.pio.lookup(io.address) is None and not io.range.mapped
    assert vm.mmio.lookup(mem.address) is mem.range
    cfg_write(vm, BDF, 0x10, 4, 0x7000)  # moved while not decoding: stays off
    assert vm.pio.lookup(0x7000) is None and vm.pio.lookup(io.address) is None
    assert bar_address(vm, BDF, 0) == 0x7000
    cfg_write(vm, BDF, 0x04, 1, 0x01)  # I/O on, memory off
    assert vm.pio.lookup(0x7000) is io.range
    assert vm.mmio.lookup(mem.address) is None and vm.mmio.lookup(m64.address) is None
    assert [r for r in vm.mmio.ranges() if r in (mem.range, m64.range)] == []
    cfg_write(vm, BDF, 0x14, 4, 0xD100_0000)
    cfg_write(vm, BDF, 0x18, 4, 0xD200_0000)
    cfg_write(vm, BDF, 0x04, 2, 0x0003)
    assert vm.mmio.lookup(0xD100_0000) is mem.range
    assert vm.mmio.lookup(0xD200_0000) is m64.range
    assert vm.pio.lookup(0x7000) is io.range
    cfg_write(vm, BDF, 0x04, 2, 0x0003)  # no change: nothing moves, nothing doubles
    assert decoded_at(vm.mmio, mem.range) == [mem.range]
    assert vm.logged == []


def test_clashing_bar_address_is_left_undecoded_and_logged(one: Any) -> None:
    vm, _bus, dev = one
    io, mem = dev.bars[0], dev.bars[1]
    cfg_write(vm, BDF, 0x14, 4, ECAM_BASE + 0x1000)  # inside the ECAM window
    assert bar_address(vm, BDF, 1) == ECAM_BASE + 0x1000
    assert not mem.range.mapped
    assert vm.mmio.lookup(ECAM_BASE + 0x1000).owner == "pci ecam"  # type: ignore[union-attr]
    assert len(vm.logged) == 1 and "BAR 1" in vm.logged[0]
    cfg_write(vm, BDF, 0x10, 4, 0xCE0)  # 32 ports over 0xCF8-0xCFF
    assert not io.range.mapped and "BAR 0" in vm.logged[1]
    assert cfg_read(vm, BDF, 0x00, 4) == 0x1234_1AF4  # the config ports still work
    assert inp(vm, 0xCF8, 4) == conf1(BDF, 0)
    cfg_write(vm, BDF, 0x10, 4, 0xFFFF_FFE0)  # not a 16-bit port (sizing): not decoded,
    assert not io.range.mapped and len(vm.logged) == 2  # and not worth a log line
    cfg_write(vm, BDF, 0x10, 4, 0x5000)
    cfg_write(vm, BDF, 0x14, 4, 0xD000_0000)
    assert vm.pio.lookup(0x5000) is io.range and vm.mmio.lookup(0xD000_0000) is mem.range
    cfg_write(vm, BDF, 0x14, 4, ECAM_BASE)  # clash again, then toggle decoding
    cfg_write(vm, BDF, 0x04, 2, 0x0001)
    cfg_write(vm, BDF, 0x04, 2, 0x0003)  # re-enabling logs again, raises nothing
    assert not mem.range.mapped and len(vm.logged) == 4
    assert ecam_read(vm, BDF, 0, 4) == 0x1234_1AF4


def test_bars_clash_with_each_other() -> None:
    a = Dev("a", ((0, BAR_MEM32, 4096),))
    b = Dev("b", ((0, BAR_MEM32, 4096),))
    vm, _bus = machine_with(((0, 1, 0), a), ((0, 2, 0), b))
    target = bar_address(vm, (0, 2, 0), 0)
    cfg_write(vm, (0, 1, 0), 0x10, 4, target)
    assert vm.mmio.lookup(target) is b.bars[0].range  # type: ignore[union-attr]
    assert not a.bars[0].range.mapped  # type: ignore[union-attr]
    assert vm.logged and vm.logged[0].startswith("a: BAR 0 not decoded")


def test_bar_decodes_again_once_the_clash_is_gone() -> None:
    # Swapping two BARs' addresses, one register at a time (as an OS reassigning
    # resources does): real hardware decodes both afterwards.
    a = Dev("a", ((0, BAR_MEM32, 4096),))
    b = Dev("b", ((0, BAR_MEM32, 4096),))
    vm, _bus = machine_with(((0, 1, 0), a), ((0, 2, 0), b))
    addr_a, addr_b = bar_address(vm, (0, 1, 0), 0), bar_address(vm, (0, 2, 0), 0)
    cfg_write(vm, (0, 1, 0), 0x10, 4, addr_b)  # a overlaps b for a moment
    cfg_write(vm, (0, 2, 0), 0x10, 4, addr_a)
    assert vm.mmio.lookup(addr_a) is b.bars[0].range  # type: ignore[union-attr]
    assert vm.mmio.lookup(addr_b) is a.bars[0].range  # type: ignore[union-attr]


def test_enable_decoding_false_leaves_bars_for_the_guest() -> None:
    dev = Dev("d", STD_BARS)
    vm, _bus = machine_with((BDF, dev), enable=False)
    assert cfg_read(vm, BDF, 0x04, 2) == 0
    addrs = [bar_address(vm, BDF, i) for i in (0, 1, 2)]
    assert addrs == [bar.address for bar in dev.bars[:3]]  # type: ignore[union-attr]
    assert vm.pio.lookup(addrs[0]) is None
    assert vm.mmio.lookup(addrs[1]) is None and vm.mmio.lookup(addrs[2]) is None
    assert [r.owner for r in vm.mmio.ranges()] == ["pci ecam"]
    cfg_write(vm, BDF, 0x04, 2, 0x0002)
    assert vm.pio.lookup(addrs[0]) is None
    assert vm.mmio.lookup(addrs[1]) is dev.bars[1].range  # type: ignore[union-attr]
    assert vm.mmio.lookup(addrs[2]) is dev.bars[2].range  # type: ignore[union-attr]
    cfg_write(vm, BDF, 0x04, 2, 0x0007)
    assert vm.pio.lookup(addrs[0]) is dev.bars[0].range  # type: ignore[union-attr]
    assert cfg_read(vm, BDF, 0x04, 2) == 0x0007


def test_enable_decoding_sets_the_bits_the_bars_need() -> None:
    io_only = Dev("a", ((0, BAR_IO, 16),))
    mem_only = Dev("b", ((0, BAR_MEM32, 16),))
    none = Dev("c")
    vm, _bus = machine_with(((0, 1, 0), io_only), ((0, 2, 0), mem_only), ((0, 3, 0), none))
    assert cfg_read(vm, (0, 1, 0), 0x04, 2) == 0x0005
    assert cfg_read(vm, (0, 2, 0), 0x04, 2) == 0x0006
    assert cfg_read(vm, (0, 3, 0), 0x04, 2) == 0x0004


# ==== 4. capabilities ====


def test_capability_chain() -> None:
    dev = Dev("d")
    first = dev.add_capability(0x09, b"\x05\x01\x02", writable=b"\x00\xFF")
    second = dev.add_capability(0x05, bytes(12))
    third = dev.add_capability(0x11, bytes(10))
    assert (first, second, third) == (0x40, 0x48, 0x58)
    vm, _bus = machine_with((BDF, dev))
    assert cfg_read(vm, BDF, 0x06, 2) & 0x10
    assert cfg_read(vm, BDF, 0x34, 1) == 0x40
    chain, ptr = [], cfg_read(vm, BDF, 0x34, 1)
    while ptr:
        chain.append((ptr, cfg_read(vm, BDF, ptr, 1)))
        ptr = cfg_read(vm, BDF, ptr + 1, 1)
    assert chain == [(0x40, 0x09), (0x48, 0x05), (0x58, 0x11)]
    assert cfg_read(vm, BDF, 0x40, 4) == 0x0105_4809
    # IDs and next pointers are read-only; the body follows its writable mask
    cfg_write(vm, BDF, 0x40, 4, 0xFFFF_FFFF)
    assert cfg_read(vm, BDF, 0x40, 4) == 0xFF05_4809
    cfg_write(vm, BDF, 0x43, 1, 0x12)
    assert cfg_read(vm, BDF, 0x43, 1) == 0x12
    cfg_write(vm, BDF, 0x48, 4, 0xFFFF_FFFF)
    assert cfg_read(vm, BDF, 0x48, 4) == 0x0000_5805
    cfg_write(vm, BDF, 0x34, 1, 0x80)
    assert cfg_read(vm, BDF, 0x34, 1) == 0x40


def test_no_capabilities() -> None:
    vm, _bus = machine_with((BDF, Dev("d")))
    assert cfg_read(vm, BDF, 0x06, 2) & 0x10 == 0
    assert cfg_read(vm, BDF, 0x34, 1) == 0


def test_capability_that_does_not_fit() -> None:
    dev = Dev("d")
    dev.add_capability(0x10, bytes(150))
    with pytest.raises(DeviceError, match="does not fit"):
        dev.add_capability(0x05, bytes(60))


def test_hostbridge() -> None:
    vm, bus = make_vm()
    hb = hostbridge.create(vm=vm, slot=(0, 0, 0), config={})
    assert hb.name == "hostbridge@pci.0.0.0"
    bus.add((0, 0, 0), hb)
    bus.assign_resources(enable_decoding=True)
    hb_bdf = (0, 0, 0)
    assert cfg_read(vm, hb_bdf, 0x00, 4) == 0x1275_1275
    assert cfg_read(vm, hb_bdf, 0x08, 4) == 0x0600_0000
    assert cfg_read(vm, hb_bdf, 0x0E, 1) == 0x00
    assert cfg_read(vm, hb_bdf, 0x06, 2) & 0x10
    assert cfg_read(vm, hb_bdf, 0x34, 1) == 0x40
    assert cfg_read(vm, hb_bdf, 0x40, 1) == 0x10
    assert cfg_read(vm, hb_bdf, 0x41, 1) == 0x00  # the only capability
    assert cfg_read(vm, hb_bdf, 0x42, 2) == 0x0042  # PCIe v2, root port
    assert all(cfg_read(vm, hb_bdf, 0x10 + 4 * i, 4) == 0 for i in range(6))
    assert cfg_read(vm, hb_bdf, 0x3D, 1) == 0
    assert vm.irqs == [] and vm.vmfd.level_triggered == []


@pytest.mark.parametrize("factory,config,ids", [
    (hostbridge.create_amd, {}, 0x7432_1022),
    (hostbridge.create, {"vendor": "0x8086", "devid": "0x1237"}, 0x1237_8086),
    (hostbridge.create, {"pcireg": {"vendor": "0x1022", "device": "0x15d0"}}, 0x15D0_1022),
])
def test_hostbridge_ids(factory: Any, config: dict[str, Any], ids: int) -> None:
    vm, bus = make_vm()
    bus.add((0, 0, 0), factory(vm=vm, slot=(0, 0, 0), config=config))
    assert cfg_read(vm, (0, 0, 0), 0x00, 4) == ids


@pytest.mark.parametrize("config", [{"vendor": "0x10000"}, {"devid": "nope"}])
def test_hostbridge_bad_ids(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        hostbridge.create(vm=None, slot=(0, 0, 0), config=config)


# ==== 5. INTx ====


def intx_machine(*slots_pins: tuple[int, int], reserve: tuple[int, ...] = (3, 4),
                 ) -> tuple[FakeVm, PciBus, list[Dev]]:
    vm, bus = make_vm()
    for irq in reserve:
        bus.intx.reserve(irq)
    devs = []
    for slot, pin in slots_pins:
        dev = Dev(f"d{slot}.{pin}", pin=pin)
        devs.append(dev)
        bus.add((0, slot, 0), dev)
    bus.assign_resources(enable_decoding=True)
    vm.irqs.clear()
    return vm, bus, devs


def test_request_intx_pins() -> None:
    dev = Dev("d")
    assert dev.interrupt_pin == 0
    for pin in (0, 5):
        with pytest.raises(DeviceError, match="INTA..INTD"):
            dev.request_intx(pin)
    dev.request_intx(4)
    assert dev.interrupt_pin == 4


def test_intline_starts_at_255_and_gets_the_routed_irq() -> None:
    vm, bus = make_vm()
    bus.intx.reserve(3)
    bus.intx.reserve(4)
    dev, plain = Dev("d", pin=2), Dev("p")
    bus.add((0, 3, 0), dev)
    bus.add((0, 4, 0), plain)
    assert cfg_read(vm, (0, 3, 0), 0x3C, 2) == 0x02FF
    bus.assign_resources(enable_decoding=True)
    assert cfg_read(vm, (0, 3, 0), 0x3C, 2) == 0x0205
    assert cfg_read(vm, (0, 4, 0), 0x3C, 2) == 0x00FF  # no pin: not routed
    assert vm.vmfd.level_triggered == [(5, True)]
    plain.set_intx(True)  # nowhere to go
    assert vm.irqs == []


@pytest.mark.parametrize("slot,pin", [(0, 1), (3, 1), (3, 4), (7, 2), (31, 3), (12, 4)])
def test_routing_formula(slot: int, pin: int) -> None:
    vm, bus, (dev,) = intx_machine((slot, pin))
    pirq = (4 + slot + pin) % 8
    assert pirq_for(slot, pin) == pirq
    irq = bus.intx.isa_irq(pirq)
    assert irq == 5 and cfg_read(vm, (0, slot, 0), 0x3C, 1) == 5
    assert bus.intx.read(pirq) == 5
    assert all(bus.intx.read(n) == 0x80 for n in range(8) if n != pirq)
    dev.set_intx(True)
    assert vm.irqs == [(16 + pirq, True), (5, True)]
    assert cfg_read(vm, (0, slot, 0), 0x06, 2) & 0x08  # interrupt status
    dev.set_intx(True)  # a level: nothing new
    dev.set_intx(False)
    assert vm.irqs == [(16 + pirq, True), (5, True), (16 + pirq, False), (5, False)]
    assert cfg_read(vm, (0, slot, 0), 0x06, 2) & 0x08 == 0


def test_each_pirq_gets_its_own_least_used_irq() -> None:
    # slots 0..7 with INTA cover all eight PIRQs
    vm, bus, devs = intx_machine(*((slot, 1) for slot in range(8)), (8, 1), (9, 2))
    irqs = [bus.intx.isa_irq(n) for n in range(8)]
    assert sorted(irqs) == [5, 6, 7, 9, 10, 11, 12, 14]  # type: ignore[type-var]
    assert 3 not in irqs and 4 not in irqs
    assert set(irqs) <= PERMITTED_IRQS
    # devices sharing a PIRQ share its IRQ
    assert cfg_read(vm, (0, 8, 0), 0x3C, 1) == cfg_read(vm, (0, 0, 0), 0x3C, 1)
    assert cfg_read(vm, (0, 9, 0), 0x3C, 1) == cfg_read(vm, (0, 2, 0), 0x3C, 1)
    triggered = sorted(irq for irq, _level in vm.vmfd.level_triggered)
    assert triggered == sorted(irqs)  # type: ignore[type-var]
    for slot, dev in enumerate(devs[:8]):
        dev.set_intx(True)
        assert vm.irqs[-2:] == [(16 + pirq_for(slot, 1), True), (irqs[pirq_for(slot, 1)], True)]


def test_reserved_irqs_are_never_chosen() -> None:
    _vm, bus, _devs = intx_machine(*((slot, 1 + slot % 4) for slot in range(20)))
    assert {bus.intx.isa_irq(n) for n in range(8)}.isdisjoint({3, 4})
    _vm, bus, _devs = intx_machine(*((slot, 1) for slot in range(8)), reserve=())
    assert {bus.intx.isa_irq(n) for n in range(8)} == {3, 4, 5, 6, 7, 9, 10, 11}


def test_no_irq_left_is_a_config_error() -> None:
    vm, bus = make_vm()
    for irq in PERMITTED_IRQS:
        bus.intx.reserve(irq)
    bus.add(BDF, Dev("d", pin=1))
    with pytest.raises(ConfigError, match="no ISA IRQ"):
        bus.assign_resources(enable_decoding=True)


def test_shared_pirq_stays_high_while_any_sharer_asserts() -> None:
    # slot 1 INTA and slot 9 INTA both use PIRQ 6; slot 6 INTD also does
    vm, bus, (a, b, c) = intx_machine((1, 1), (9, 1), (6, 4))
    assert pirq_for(1, 1) == pirq_for(9, 1) == pirq_for(6, 4) == 6
    irq = bus.intx.isa_irq(6)
    a.set_intx(True)
    b.set_intx(True)
    c.set_intx(True)
    assert vm.irqs == [(22, True), (irq, True)]
    a.set_intx(False)
    c.set_intx(False)
    assert vm.irqs == [(22, True), (irq, True)]
    b.set_intx(False)
    assert vm.irqs == [(22, True), (irq, True), (22, False), (irq, False)]
    c.set_intx(True)
    assert vm.irqs[-2:] == [(22, True), (irq, True)]


def test_intx_disable_masks_and_unmasking_reraises() -> None:
    vm, bus, (dev,) = intx_machine((3, 1))
    pirq, bdf = pirq_for(3, 1), (0, 3, 0)
    gsi, irq = 16 + pirq, bus.intx.isa_irq(pirq)
    dev.set_intx(True)
    cfg_write(vm, bdf, 0x05, 1, 0x04)  # INTx Disable (bit 10) through the high byte
    assert vm.irqs == [(gsi, True), (irq, True), (gsi, False), (irq, False)]
    assert cfg_read(vm, bdf, 0x06, 2) & 0x08  # the status bit still shows the level
    cfg_write(vm, bdf, 0x04, 2, 0x0407)  # still masked: nothing new
    assert len(vm.irqs) == 4
    cfg_write(vm, bdf, 0x04, 2, 0x0007)
    assert vm.irqs[4:] == [(gsi, True), (irq, True)]
    # a level that comes and goes while masked never reaches the lines
    dev.set_intx(False)
    vm.irqs.clear()
    cfg_write(vm, bdf, 0x04, 4, 0x0000_0407)
    dev.set_intx(True)
    dev.set_intx(False)
    cfg_write(vm, bdf, 0x04, 4, 0x0000_0007)
    assert vm.irqs == []
    # masked from the start, then unmasked with the level high
    cfg_write(vm, bdf, 0x04, 2, 0x0400)
    dev.set_intx(True)
    assert vm.irqs == []
    cfg_write(vm, bdf, 0x04, 2, 0x0000)
    assert vm.irqs == [(gsi, True), (irq, True)]


def test_masking_one_sharer_keeps_the_line_for_the_other() -> None:
    vm, _bus, (a, b) = intx_machine((1, 1), (9, 1))
    a.set_intx(True)
    b.set_intx(True)
    cfg_write(vm, (0, 1, 0), 0x04, 2, 0x0400)
    assert vm.irqs == [(22, True), (5, True)]
    cfg_write(vm, (0, 9, 0), 0x04, 2, 0x0400)
    assert vm.irqs[2:] == [(22, False), (5, False)]
    cfg_write(vm, (0, 1, 0), 0x04, 2, 0x0000)
    assert vm.irqs[4:] == [(22, True), (5, True)]


# ==== 7. random config-space traffic ====

READ_ONLY = [(0x00, 4), (0x06, 2), (0x08, 4), (0x0E, 1), (0x2C, 4), (0x34, 1), (0x3D, 1),
             (0x28, 4), (0x30, 4), (0x40, 2)]
INTERESTING = [0, 0xFFFF_FFFF, 0xFFFF_FFFE, 0x1, 0x3, 0x7, 0x0400, 0x0407, 0x2000, 0x2020,
               0xCE0, 0xCF8, 0xFFE0, 0x1_0000, 0xC000_0000, 0xC000_1000, 0xC010_0000,
               0xC020_0000, 0xDFFF_F000, ECAM_BASE, 0xF000_0000, 0xFFF0_0000]


class ConfigSpaceMachine(RuleBasedStateMachine):
    """Random guest config traffic against a model of where each BAR must decode.

    The model follows hvf's documented rules: a BAR decodes at its programmed address
    while its decode bit is on, unless that range lies outside the space or overlaps a
    range already decoding when the BAR was (re)mapped; then it stays undecoded (and is
    logged) until it is reprogrammed or decoding is toggled.
    """

    @initialize(enable=st.booleans())
    def build(self, enable: bool) -> None:
        self.dev = Dev("sm", STD_BARS, pin=1)
        self.dev.add_capability(0x09, b"\x00\x00", writable=b"\xFF\x00")
        self.vm, self.bus = machine_with((BDF, self.dev), enable=enable)
        self.bars = [b for b in self.dev.bars if b is not None]
        self.addr = {b.index: b.address for b in self.bars}
        self.command = 0x0007 if enable else 0
        self.read_only = {(o, s): cfg_read(self.vm, BDF, o, s) for o, s in READ_ONLY}
        assert self.read_only[(0x00, 4)] == 0x1234_1AF4

    # ---- model ----

    def _bit(self, bar: Any) -> int:
        return 1 if bar.kind == BAR_IO else 2

    def _model_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size or offset >= 256:
            return
        if 0x10 <= offset < 0x28:
            if size != 4:
                return
            index = (offset - 0x10) // 4
            for bar in self.bars:
                if bar.index == index:
                    mask = ~(bar.size - 1)
                    if bar.kind == BAR_MEM64:
                        high = self.addr[index] & ~0xFFFF_FFFF
                        self.addr[index] = high | (value & mask & 0xFFFF_FFFF)
                    else:
                        self.addr[index] = value & mask & 0xFFFF_FFFF
                elif bar.kind == BAR_MEM64 and bar.index + 1 == index:
                    low = self.addr[bar.index] & 0xFFFF_FFFF
                    self.addr[bar.index] = (low | value << 32) & ~(bar.size - 1)
            return
        for i in range(size):
            if offset + i in (4, 5):
                shift = 8 * (offset + i - 4)
                byte = (value >> (8 * i)) & 0xFF
                mask = (0x077F >> shift) & 0xFF
                self.command = (self.command & ~(mask << shift)) | ((byte & mask) << shift)

    # ---- rules ----

    offsets = st.one_of(st.integers(0, 0x47), st.sampled_from([0x04, 0x10, 0x14, 0x18, 0x1C, 0x20]),
                        st.integers(0x40, 0x1FF))
    widths = st.sampled_from([1, 2, 4, 4, 3, 8])
    values = st.one_of(st.integers(0, 0xFFFF_FFFF), st.sampled_from(INTERESTING))

    @rule(offset=offsets, size=widths, value=values, ecam=st.booleans())
    def write(self, offset: int, size: int, value: int, ecam: bool) -> None:
        value &= (1 << (8 * size)) - 1
        if ecam or offset >= 256 or size not in (1, 2, 4):
            ecam_write(self.vm, BDF, offset, size, value)
        else:
            outp(self.vm, 0xCF8, 4, conf1(BDF, offset))
            outp(self.vm, 0xCFC + (offset & 3), size, value)  # misaligned ones too
        self._model_write(offset, size, value)

    @rule(offset=offsets, size=widths, ecam=st.booleans())
    def read(self, offset: int, size: int, ecam: bool) -> None:
        if ecam or offset >= 256 or size not in (1, 2, 4):
            value = ecam_read(self.vm, BDF, offset, size)
        else:
            value = cfg_read(self.vm, BDF, offset, size)
        assert 0 <= value < 1 << (8 * size)
        if size not in (1, 2, 4) or offset % size or offset >= 260:
            assert value == (1 << (8 * size)) - 1
        elif offset >= 256:
            assert value == 0

    @rule(bits=st.sampled_from([0, 1, 2, 3, 7, 0x400, 0x403]))
    def command_write(self, bits: int) -> None:
        cfg_write(self.vm, BDF, 0x04, 2, bits)
        self._model_write(0x04, 2, bits)

    @rule(index=st.sampled_from([0, 1, 2]), value=st.sampled_from(INTERESTING))
    def move_bar(self, index: int, value: int) -> None:
        cfg_write(self.vm, BDF, 0x10 + 4 * index, 4, value)
        self._model_write(0x10 + 4 * index, 4, value)

    # ---- invariants ----

    @invariant()
    def read_only_registers_never_change(self) -> None:
        now = {(o, s): cfg_read(self.vm, BDF, o, s) for o, s in READ_ONLY}
        assert now == self.read_only

    @invariant()
    def command_matches_model(self) -> None:
        assert cfg_read(self.vm, BDF, 0x04, 2) == self.command

    @invariant()
    def bars_decode_where_programmed(self) -> None:
        """Decode on: mapped exactly at the programmed address, unless that range is
        outside the address space or overlaps another mapped range. Decode off: unmapped."""
        for bar in self.bars:
            space: PortBus | MmioBus
            if bar.kind == BAR_IO:
                space, places = self.vm.pio, list(self.vm.pio.table.values()).count(bar.range)
            else:
                space, places = self.vm.mmio, self.vm.mmio.entries.count(bar.range)
            addr = self.addr[bar.index]
            assert bar.address == addr
            if not self.command & self._bit(bar):
                assert places == 0 and not bar.range.mapped
            elif bar.range.mapped:
                assert bar.range.base == addr
                assert places == (bar.size if bar.kind == BAR_IO else 1)
                assert space.lookup(addr) is bar.range
                assert space.lookup(addr + bar.size - 1) is bar.range
            else:
                assert places == 0
                limit = 0x10000 if bar.kind == BAR_IO else 1 << 64
                outside = addr + bar.size > limit
                assert outside or space.overlapping(addr, bar.size) is not None

    @invariant()
    def bar_registers_keep_their_type_bits(self) -> None:
        for bar in self.bars:
            low = cfg_read(self.vm, BDF, 0x10 + 4 * bar.index, 4)
            addr = self.addr[bar.index]
            assert low == (addr & 0xFFFF_FFFF) | bar.low_bits
            if bar.kind == BAR_IO:
                assert low & 0x3 == 0x1
            elif bar.kind == BAR_MEM32:
                assert low & 0xF == 0x0
            else:
                assert low & 0xF == 0xC
                assert cfg_read(self.vm, BDF, 0x14 + 4 * bar.index, 4) == addr >> 32

    @invariant()
    def config_mechanism_still_works(self) -> None:
        assert self.vm.pio.lookup(0xCF8).owner == "pci config address"  # type: ignore[union-attr]
        assert ecam_read(self.vm, BDF, 0x00, 4) == 0x1234_1AF4


ConfigSpaceMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_config_space_state_machine = ConfigSpaceMachine.TestCase
