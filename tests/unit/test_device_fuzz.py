# SPDX-License-Identifier: BSD-2-Clause
"""Every built-in device under random guest I/O, in-process (tests/unit/fuzz_targets.py):
a bounded run of each target (seeded, for volume), Hypothesis over whole-machine access
sequences (which it shrinks to the shortest that breaks), fw_cfg DMA at the edges of
guest RAM, the harness itself, and the bugs the fuzzer found. The long run is
``scripts/fuzz-devices``."""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import (
    MSI_FUNCTION,
    MsiFunction,
    dma_transfer,
    pm_timer_read,
    rtc_clock_read,
    build_machine,
    targets,
    through_snapshot,
)
from hvf.device import Device
from hvf.memory import HIGHMEM_BASE, LOWMEM_LIMIT, GuestMemory, MiB
from hvf.plugins.lpc import fwcfg
from hvf.plugins.pci import PciBus, msi
from hvf.testing.fakes import FakeVm, cfg_read, cfg_write, outp
from hvf.testing.fuzz import (
    Access,
    Action,
    FuzzFailure,
    Target,
    Window,
    close_machine,
    fuzz,
    main,
)

# ---- the bounded run: every device, a few seconds each ----

#: Accesses that reach each device in the suite (the long run: scripts/fuzz-devices).
SUITE_ACCESSES = 150_000
SUITE_SECONDS = 2.5


@functools.cache
def _targets() -> dict[str, Target]:
    return targets()


@pytest.mark.parametrize("name", sorted(targets_names := (
    "com", "pci-uart", "pci-config", "rtc", "kbc", "pm", "reset", "debugcon", "fwcfg",
    "pc-testdev", "virtio-pci", "machine")))
def test_device_holds_under_random_io(name: str) -> None:
    report = fuzz(_targets()[name], seed=14, accesses=SUITE_ACCESSES, check_every=500,
                  through=through_snapshot, seconds=SUITE_SECONDS)
    assert report.reached >= min(SUITE_ACCESSES, 2000), report
    assert report.checks >= 4


def test_every_built_in_device_has_a_target() -> None:
    assert set(_targets()) == set(targets_names)
    vm = build_machine()
    try:
        owners = {r.owner for r in [*vm.pio.ranges(), *vm.mmio.ranges()]}
    finally:
        close_machine(vm)
    covered = set().union(*(t.owners for t in _targets().values()))
    assert owners <= covered, owners - covered


# ---- Hypothesis: any sequence, shrunk to the shortest that breaks ----

#: The fixed ranges of the built-in devices (BARs move: the seeded targets find them).
FIXED_WINDOWS = (Window("pio", 0x3F8, 8), Window("pio", 0x60, 1), Window("pio", 0x64, 1),
                 Window("pio", 0x70, 2), Window("pio", 0x92, 1), Window("pio", 0xB2, 1),
                 Window("pio", 0xE0, 8), Window("pio", 0x402, 1), Window("pio", 0x510, 2),
                 Window("pio", 0x514, 8), Window("pio", 0x600, 16), Window("pio", 0xCF8, 1),
                 Window("pio", 0xCF9, 1), Window("pio", 0xCFC, 4), Window("pio", 0x2000, 24),
                 Window("mmio", 0xE000_0000, 0x40000), Window("mmio", 0xFF00_0000, 0x10000))


@st.composite
def _accesses(draw: st.DrawFn) -> list[Action]:
    window = draw(st.sampled_from(FIXED_WINDOWS))
    offset = draw(st.integers(-4, window.length + 3))
    size = draw(st.sampled_from((1, 2, 4)))
    value = draw(st.none() | st.integers(0, (1 << 8 * size) - 1))
    mask = 0xFFFF if window.space == "pio" else (1 << 64) - 1
    return [Access(window.space, (window.base + offset) & mask, size, value)]


@st.composite
def _dma_transfers(draw: st.DrawFn) -> list[Action]:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    return list(dma_transfer(rng, [0x00, 0x19, 0x20, 0x21, 0x4000, 0x8000]))


def _whole_machine(actions: list[Action]) -> Target:
    """A target that plays ``actions`` on the whole machine (clocks excepted)."""
    return Target("machine", build_machine, lambda rng, vm: iter(actions), frozenset(),
                  deterministic=False,
                  volatile=lambda vm, a: rtc_clock_read(vm, a) or pm_timer_read(vm, a))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_accesses() | _dma_transfers(), max_size=40))
def test_any_access_sequence_keeps_every_device_whole(groups: list[list[Action]]) -> None:
    actions = [action for group in groups for action in group]
    fuzz(_whole_machine(actions), seed=0, accesses=1, check_every=7, replay=7,
         through=through_snapshot)


# ---- fw_cfg DMA at the edges of guest RAM, with RAM above 4 GiB ----

HIGH_RAM = LOWMEM_LIMIT + 2 * MiB
EDGES = (LOWMEM_LIMIT, HIGHMEM_BASE, HIGHMEM_BASE + 2 * MiB)


@functools.cache
def _highmem_fwcfg() -> tuple[FakeVm, fwcfg.FwCfg]:
    vm = FakeVm(memory=GuestMemory(HIGH_RAM))
    device = fwcfg.FwCfg()
    vm.attach(device)
    return vm, device


@settings(max_examples=200, deadline=None)
@given(edge=st.sampled_from(EDGES), delta=st.integers(-80, 80), length=st.integers(0, 96),
       control=st.sampled_from((fwcfg.DMA_CTL_READ, fwcfg.DMA_CTL_SKIP, fwcfg.DMA_CTL_WRITE)))
def test_fwcfg_dma_never_reaches_outside_guest_ram(edge: int, delta: int, length: int,
                                                    control: int) -> None:
    """A buffer around the end of low RAM, the start of high RAM and its end: the
    transfer succeeds exactly when the buffer lies in RAM, and writes nothing else."""
    vm, _device = _highmem_fwcfg()
    memory = vm.memory
    buffer = edge + delta
    desc = 0x1000
    around = [(a, 16) for a in (buffer - 16, buffer + length) if memory.contains(a, 16)]
    for address, size in around:
        memory.write(address, b"\xa5" * size)
    memory.write(desc, fwcfg.DMA_ACCESS.pack(control | fwcfg.DMA_CTL_SELECT, length, buffer))
    outp(vm, 0x514, 4, 0)
    outp(vm, 0x518, 4, int.from_bytes(desc.to_bytes(4, "big"), "little"))
    status = int.from_bytes(memory.read(desc, 4), "big")
    fits = memory.contains(buffer, length) or length == 0
    if control == fwcfg.DMA_CTL_WRITE:
        assert status == (0 if length == 0 else fwcfg.DMA_CTL_ERROR)
    elif control == fwcfg.DMA_CTL_READ:
        assert status == (0 if fits else fwcfg.DMA_CTL_ERROR)
        if fits and length:
            assert memory.read(buffer, length) == b"QEMU".ljust(length, b"\0")[:length]
    else:
        assert status == 0
    for address, size in around:
        assert memory.read(address, size) == b"\xa5" * size


# ---- the harness itself ----


class _Flaky(Device):
    """Raises on a write of 0x42; keeps a register it does not save."""

    def __init__(self) -> None:
        super().__init__("flaky")
        self.register = 0

    def attach(self, ctx: Any) -> None:
        ctx.pio.register(0x300, 2, self.name, self._read, self._write)

    def _read(self, offset: int, size: int) -> int:
        return self.register if offset == 1 else 0

    def _write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and value == 0x42:
            raise KeyError("boom")
        self.register = value & 0xFF


def _flaky_target(values: tuple[int, ...]) -> Target:
    def build() -> FakeVm:
        vm = FakeVm(memory=GuestMemory(MiB))
        vm.attach(_Flaky())
        return vm

    def actions(rng: random.Random, vm: Any) -> Iterator[Action]:
        for value in values:
            yield Access("pio", 0x301, 1, value)
            yield Access("pio", 0x301, 1)
            yield Access("pio", 0x300, 1, value)
    return Target("flaky", build, actions, frozenset({"flaky"}))


def test_an_escaping_exception_names_the_seed_and_the_action() -> None:
    with pytest.raises(FuzzFailure, match=r"flaky: seed 3, action #5 \(outb port 0x0300 <- "
                                          r"0x42\): KeyError: 'boom'"):
        fuzz(_flaky_target((1, 0x42)), seed=3, accesses=100, check_every=100)


def test_state_a_record_leaves_out_is_caught_by_the_restored_twin() -> None:
    with pytest.raises(FuzzFailure, match=r"action #1 \(inb port 0x0301\): AssertionError: the restored twin read 0, the original 5"):
        fuzz(_flaky_target((5, 6, 7, 8)), seed=0, accesses=100, check_every=1, replay=5)


def test_the_script_prints_counts_per_device_and_failures_to_rerun(
        capsys: pytest.CaptureFixture[str]) -> None:
    broken = {"kbc": _targets()["kbc"], "flaky": _flaky_target((0x42,))}
    assert main(broken, ["--accesses", "3000", "--seed", "9"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^kbc: 3000 accesses reached it, \d+ actions in .* s \(\d+k/s\), \d+ state "
                     r"checks$", out, re.MULTILINE), out
    assert re.search(r"^ +\d+  kbc command$", out, re.MULTILINE), out
    assert "FAIL flaky: seed 9, action #2" in out
    assert "reproduce: --target flaky --seed 9 --accesses 3000 --check-every 1000" in out
    assert out.splitlines()[-1] == "seed 9: 1 passed, 1 failed"


# ---- what the fuzzer found in the UART and PCI code (each failed before its fix) ----


@pytest.mark.parametrize("port, size, value", [(0x3FB, 2, 0x0003), (0x3F9, 4, 0x0003_0002),
                                               (0x3FB, 2, 0x1B03)])
def test_com_irq_follows_out2_and_loopback_through_a_wide_write(port: int, size: int,
                                                                value: int) -> None:
    """A write reaching MCR from LCR (or IER) below it turned OUT2 off, or loopback on,
    without the IRQ line hearing of it: IRQ 4 stayed high with the chip's output gated
    off, so COM3, sharing it, could raise no more edges."""
    vm = build_machine()
    try:
        outp(vm, 0x3FC, 1, 0x08)  # MCR: OUT2
        outp(vm, 0x3F9, 1, 0x02)  # IER: THR empty, pending at once
        assert vm.irqs[-1] == (4, True)
        outp(vm, port, size, value)  # LCR 8N1 and MCR without OUT2 (or with loopback)
        assert vm.irqs[-1] == (4, False)
    finally:
        close_machine(vm)


class _MsiMachine:
    """A fake machine with the PCI bus and one MSI function."""

    def __init__(self) -> None:
        self.vm = FakeVm()
        bus = PciBus()
        self.vm.attach(bus)
        self.function = MsiFunction("msi")
        bus.add(MSI_FUNCTION, self.function)
        self.cap = cfg_read(self.vm, MSI_FUNCTION, 0x34, 1)

    def write(self, register: int, size: int, value: int) -> None:
        cfg_write(self.vm, MSI_FUNCTION, self.cap + register, size, value)


def test_msi_pending_bit_survives_a_restore() -> None:
    """The pending bit came back in config space, but the vector had no trigger waiting:
    the first write to the capability cleared it and the interrupt was lost."""
    original, restored = _MsiMachine(), _MsiMachine()
    original.write(msi.ADDRESS_LO, 4, 0xFEE0_0000)
    original.write(msi.DATA, 2, 0x41)
    original.write(msi.MASK, 4, 1)
    original.write(msi.CONTROL, 2, msi.CONTROL_ENABLE)
    original.function.msi.trigger()
    restored.function.restore_state(through_snapshot(original.function.save_state()), 1)
    vector = restored.function.msi.vector
    assert vector.pending
    restored.write(msi.MASK, 4, 0)  # unmask: the waiting message goes out
    assert restored.vm.vmfd.irqfds == {vector.fd: vector.gsi}
    assert os.eventfd_read(vector.fd) == 1
    assert cfg_read(restored.vm, MSI_FUNCTION, restored.cap + msi.PENDING, 4) == 0


def test_an_enabled_msi_is_bound_straight_after_a_restore() -> None:
    """Restored enabled and unmasked, the vector stayed unbound until the guest wrote the
    capability: the device's interrupts piled up as pending."""
    original, restored = _MsiMachine(), _MsiMachine()
    original.write(msi.ADDRESS_LO, 4, 0xFEE0_0000)
    original.write(msi.CONTROL, 2, msi.CONTROL_ENABLE)
    restored.function.restore_state(through_snapshot(original.function.save_state()), 1)
    vector = restored.function.msi.vector
    assert restored.vm.vmfd.irqfds == {vector.fd: vector.gsi} and not vector.masked
