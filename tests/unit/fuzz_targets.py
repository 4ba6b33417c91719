# SPDX-License-Identifier: BSD-2-Clause
"""hvf's built-in devices as fuzz targets (:mod:`hvf.testing.fuzz`), one each.

The machine is built as hvf builds one, through the plugins' own hooks, on a fake
machine with real buses, interrupt controller and guest RAM (a memfd mapping of its
own): host bridge, LPC bridge and what sits behind it (RTC, keyboard controller, reset
ports, ACPI PM, COM1-COM4, fw_cfg, the debug console, pc-testdev), the PCI UART (it and
COM1 with a file console, /dev/null, behind them),
virtio-rng (virtio-pci and MSI-X) and a function with the MSI capability. Each target
aims at one device's ranges, with the register sequences that reach deep into it
(selections and DMA descriptors for fw_cfg, mechanism #1 and ECAM for config space).

tests/unit/test_device_fuzz.py runs each for a bounded time; ``scripts/fuzz-devices``
runs this module for the long run (``--accesses 1000000``, ``--target``, ``--seed``).
"""

from __future__ import annotations

import functools
import random
import sys
from collections.abc import Iterator
from typing import Any

from hvf.cli import parse_args
from hvf.fields import decode_fields, encode_fields
from hvf.memory import GuestMemory, MiB
from hvf.pluginmanager import Plugins
from hvf.plugins import lpc, pci, uart, virtio
from hvf.plugins.lpc import fwcfg
from hvf.plugins.lpc.rtc import TIME_REGISTERS
from hvf.plugins.pci import PciDevice, pci_bus
from hvf.plugins.pci.msi import MsiCapability
from hvf.testing.fakes import FakeVm, conf1, ecam_addr
from hvf.testing.fuzz import (
    Access,
    Action,
    HostCall,
    RamExpect,
    RamWrite,
    Target,
    Window,
    close_machine,
    main,
    random_value,
    window_access,
)

RAM = 64 * MiB
ARGS = ("-s", "0,hostbridge", "-s", "2,uart,file=/dev/null", "-s", "3,virtio-rnd",
        "-s", "31,lpc", "-l", "com1,file=/dev/null", "-l", "pc-testdev", "-l", "fwcfg",
        "-l", "debugcon,/dev/null")
HOSTBRIDGE, PCI_UART, VIRTIO, MSI_FUNCTION, LPC = (0, 0, 0), (0, 2, 0), (0, 3, 0), (0, 5, 0), \
    (0, 31, 0)
FUNCTIONS = (HOSTBRIDGE, PCI_UART, VIRTIO, MSI_FUNCTION, LPC)
#: Where fw_cfg DMA descriptors and buffers are planted (with canaries around buffers).
DESCRIPTORS, BUFFERS = 1 * MiB, 2 * MiB


class MsiFunction(PciDevice):
    """A function with the MSI capability (no built-in device has one of its own)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.set_identity(0x1AF4, 0x10FF, 0xFF0000)

    def attach(self, ctx: Any) -> None:
        self.msi = MsiCapability(self, ctx.interrupts)

    def close(self) -> None:
        self.msi.close()


@functools.cache
def _plugins() -> Plugins:
    """The plugins of the built-in devices (and no other, however broken, installed)."""
    plugins = Plugins(load_entry_points=False)
    for name, module in (("pci", pci), ("lpc", lpc), ("uart", uart), ("virtio", virtio)):
        plugins.pm.register(module, name=name)
    return plugins


def build_machine(*extra: str) -> FakeVm:
    """The machine of :data:`ARGS` (and ``extra`` options), built by the plugins' hooks
    as ``hvf`` builds it."""
    plugins = _plugins()
    vm = FakeVm(memory=GuestMemory(RAM), ncpus=2)
    vm.config = parse_args([*ARGS, *extra, "fuzz"], plugins)
    vm.plugins = plugins  # type: ignore[assignment]
    vm.hook = plugins.hook  # type: ignore[attr-defined]
    plugins.hook.hvf_machine_build(vm=vm)
    pci_bus(vm).add(MSI_FUNCTION, MsiFunction("msi@pci.0.5.0"))
    plugins.hook.hvf_machine_ready(vm=vm)
    plugins.hook.hvf_firmware_setup(vm=vm)
    return vm


def through_snapshot(fields: dict[str, Any]) -> dict[str, Any]:
    """Saved fields as a snapshot carries them: encoded and decoded again."""
    return decode_fields(encode_fields(fields))


def _owners(prefix: str) -> frozenset[str]:
    vm = build_machine()
    try:
        ranges = [*vm.pio.ranges(), *vm.mmio.ranges()]
        return frozenset(r.owner for r in ranges if r.owner.startswith(prefix))
    finally:
        close_machine(vm)


def _bar(vm: Any, bdf: tuple[int, int, int], index: int) -> int:
    bar = pci_bus(vm).functions[bdf].bars[index]
    assert bar is not None
    return bar.address


# ---- action generators ----


def _spans(*windows: Window):  # type: ignore[no-untyped-def]
    def actions(rng: random.Random, vm: Any) -> Iterator[Action]:
        while True:
            yield window_access(rng, windows)
    return actions


def _uart_input(device: str):  # type: ignore[no-untyped-def]
    def host(rng: random.Random) -> HostCall:
        if rng.random() < 0.7:
            return HostCall(device, "port.push", (rng.randbytes(rng.randrange(1, 20)),))
        return HostCall(device, "port.idle" if rng.random() < 0.7 else "port.room")
    return host


def com_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    windows = [Window("pio", base, 8) for base in (0x3F8, 0x2F8, 0x3E8, 0x2E8)]
    inputs = [_uart_input(name) for name in ("com1", "com2", "com3", "com4")]
    while True:
        if rng.random() < 0.05:
            yield rng.choice(inputs)(rng)
        else:
            yield window_access(rng, windows)


def pci_uart_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    windows = [Window("pio", _bar(vm, PCI_UART, 0), 8)]
    host = _uart_input("uart@pci.0.2.0")
    while True:
        yield host(rng) if rng.random() < 0.05 else window_access(rng, windows)


def _config_offset(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.5:
        return rng.randrange(0x40)
    if pick < 0.85:
        return rng.randrange(0x40, 0x100)
    return rng.randrange(0x1004)


def pci_config_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    bdfs = [*FUNCTIONS, (0, 7, 0), (0, 31, 1), (1, 0, 0), (255, 31, 7)]
    raw = [Window("pio", 0xCF8, 1), Window("pio", 0xCFC, 4)]
    while True:
        bdf = bdfs[rng.randrange(len(bdfs))] if rng.random() < 0.9 else (
            rng.randrange(256), rng.randrange(32), rng.randrange(8))
        offset, size = _config_offset(rng), rng.choice((1, 2, 4))
        value = random_value(rng, size) if rng.random() < 0.5 else None
        pick = rng.random()
        if pick < 0.45:
            yield Access("pio", 0xCF8, 4, conf1(bdf, offset, rng.random() < 0.95))
            yield Access("pio", 0xCFC + rng.randrange(4), size, value)
        elif pick < 0.85:
            yield Access("mmio", ecam_addr(bdf, offset), rng.choice((1, 2, 4, 8)), value)
        elif pick < 0.93:
            yield window_access(rng, raw)
        elif pick < 0.95:  # the function signals its MSI message (pending while masked)
            yield HostCall("msi@pci.0.5.0", "msi.trigger")
        else:  # whatever decodes where the BARs are now
            bar = rng.choice([b for d in pci_bus(vm).functions.values() for b in d.bars if b])
            yield window_access(rng, [Window("pio" if bar.kind == "io" else "mmio",
                                             bar.address, bar.size)])


def rtc_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    registers = (*TIME_REGISTERS, 0x0A, 0x0B, 0x0C, 0x0D)
    while True:
        if rng.random() < 0.4:
            index = rng.choice(registers) if rng.random() < 0.6 else rng.getrandbits(8)
            yield Access("pio", 0x70, 1, index)
        yield window_access(rng, [Window("pio", 0x70, 2)], margin=2)


KBC_COMMANDS = (0x20, 0x60, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAD, 0xAE, 0xC0, 0xD0, 0xD1, 0xD2,
                0xD3, 0xD4, 0xFE)
KBD_COMMANDS = (0xED, 0xEE, 0xF0, 0xF2, 0xF3, 0xF4, 0xF5, 0xFF)


def kbc_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    windows = [Window("pio", 0x60, 1), Window("pio", 0x64, 1)]
    while True:
        pick = rng.random()
        if pick < 0.2:
            yield Access("pio", 0x64, 1, rng.choice(KBC_COMMANDS))
        elif pick < 0.35:
            yield Access("pio", 0x60, 1, rng.choice(KBD_COMMANDS))
        else:
            yield window_access(rng, windows)


def pm_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    windows = [Window("pio", 0xB2, 1), Window("pio", 0x600, 0x10)]
    while True:
        pick = rng.random()
        if pick < 0.05:
            yield Access("pio", 0xB2, 1, rng.choice((0xA0, 0xA1)))
        elif pick < 0.07:
            yield HostCall("pm", "press_power_button")
        else:
            yield window_access(rng, windows)


def pm_timer_read(vm: Any, action: Action) -> bool:
    """A read of the PM timer (an access goes to the range of its first port)."""
    return isinstance(action, Access) and action.space == "pio" and \
        0x608 <= action.address < 0x60C


def rtc_clock_read(vm: Any, action: Action) -> bool:
    """A read of a time register: the twin reads the clock a moment later."""
    return isinstance(action, Access) and action.address == 0x71 and action.value is None \
        and vm.device("rtc").state.index in TIME_REGISTERS


# fw_cfg: selection, byte reads, and DMA with descriptors the guest chose.

def _dma_address(rng: random.Random, length: int, *, planted: float) -> tuple[int, bool]:
    """A guest-physical address for a DMA buffer or descriptor, and whether it is in the
    area where buffers are planted (with canaries around them); ``planted`` is how often
    it is."""
    if rng.random() < planted:
        return BUFFERS + rng.randrange(0x10000), True
    pick = rng.random()
    if pick < 0.3:  # across the end of RAM
        return (RAM - length + rng.randrange(-8, 9)) % (1 << 64), False
    if pick < 0.5:
        return rng.getrandbits(32), False
    if pick < 0.7:
        return rng.getrandbits(64), False
    if pick < 0.85:  # the end of the address space: gpa + length wraps past 2^64
        return (1 << 64) - rng.randrange(1, 64), False
    return rng.randrange(BUFFERS + 0x20000, RAM), False


def _dma_length(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.4:
        return rng.randrange(64)
    if pick < 0.75:
        return rng.randrange(0x1000)
    if pick < 0.95:
        return rng.randrange(0x10000)
    return rng.getrandbits(32) if rng.random() < 0.5 else 0xFFFF_FFFF


def dma_transfer(rng: random.Random, keys: list[int]) -> Iterator[Action]:
    control = rng.getrandbits(5)
    if control & fwcfg.DMA_CTL_SELECT:
        control |= rng.choice(keys) << 16
    length = _dma_length(rng)
    buffer, planted = _dma_address(rng, length, planted=0.5)
    canary = rng.randbytes(16)
    guarded = planted and length <= 0x10000
    if guarded:
        yield RamWrite(buffer - 16, canary)
        yield RamWrite(buffer + length, canary)
    if rng.random() < 0.8:
        desc = DESCRIPTORS + rng.randrange(0, 0x10000, rng.choice((1, 4, 16)))
        yield RamWrite(desc, fwcfg.DMA_ACCESS.pack(control, length, buffer))
    else:
        desc = _dma_address(rng, fwcfg.DMA_ACCESS.size, planted=0)[0]
    high = rng.random() < 0.9  # else the high half latched before (if any) stays
    if high:
        yield Access("pio", 0x514, 4, int.from_bytes((desc >> 32).to_bytes(4, "big"), "little"))
    yield Access("pio", 0x518, 4,
                 int.from_bytes((desc & 0xFFFF_FFFF).to_bytes(4, "big"), "little"))
    if guarded:
        yield RamExpect(buffer - 16, (canary,))
        yield RamExpect(buffer + length, (canary,))
    if high and DESCRIPTORS <= desc < DESCRIPTORS + 0x10000:  # the status, stored last
        yield RamExpect(desc, (bytes(4), fwcfg.DMA_CTL_ERROR.to_bytes(4, "big")))


def fwcfg_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    device = fwcfg.find(vm)
    assert device is not None
    files = [device.file_selector(name) for name in device.file_names()]
    keys = [0x00, 0x01, 0x02, 0x03, 0x05, 0x0E, 0x0F, 0x19, *files, files[-1] + 1, 0x4000,
            0x4019, 0x8000, 0xFFFF]
    windows = [Window("pio", 0x510, 2), Window("pio", 0x514, 8)]
    while True:
        pick = rng.random()
        if pick < 0.2:
            key = rng.choice(keys) if rng.random() < 0.9 else rng.getrandbits(16)
            yield Access("pio", 0x510, 2, key)
        elif pick < 0.55:
            for _ in range(rng.randrange(1, 64)):
                yield Access("pio", 0x511, 1)
        elif pick < 0.75:
            yield window_access(rng, windows)
        else:
            yield from dma_transfer(rng, keys)


def pctestdev_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    ports = [Window("pio", 0xE0, 8), Window("pio", 0xF4, 4), Window("pio", 0x2000, 24)]
    memory = [Window("mmio", 0xFF00_0000, 0x10000)]
    while True:
        if rng.random() < 0.8:
            yield window_access(rng, ports)
        else:
            yield window_access(rng, memory, margin=8, sizes=(1, 2, 4, 8))


def virtio_actions(rng: random.Random, vm: Any) -> Iterator[Action]:
    base = _bar(vm, VIRTIO, 4)
    windows = [Window("mmio", base + offset, length) for offset, length in
               ((0, 0x38), (0x1000, 4), (0x2000, 0x10), (0x3000, 8), (0x4000, 0x20),
                (0x6000, 8))]
    while True:
        pick = rng.random()
        if pick < 0.02:
            yield HostCall("virtio-rnd@pci.0.3.0", "_doorbell", (0,))
        elif pick < 0.04:
            yield HostCall("virtio-rnd@pci.0.3.0", "msix.trigger", (rng.randrange(2),))
        else:
            yield window_access(rng, windows, sizes=(1, 2, 4, 8))


def _everything(generators: list[Any]):  # type: ignore[no-untyped-def]
    """Every device's actions at once: each step from one generator picked at random."""
    def actions(rng: random.Random, vm: Any) -> Iterator[Action]:
        running = [generator(rng, vm) for generator in generators]
        while True:
            yield next(rng.choice(running))
    return actions


def _clock_read(vm: Any, action: Action) -> bool:
    return rtc_clock_read(vm, action) or pm_timer_read(vm, action)


def targets() -> dict[str, Target]:
    """The built-in devices, one target each, and ``machine``: all of them at once."""
    def target(name: str, actions: Any, owners: frozenset[str] | str, **kw: Any) -> Target:
        owners = _owners(owners) if isinstance(owners, str) else owners
        return Target(name, build_machine, actions, owners, **kw)

    devices = {t.name: t for t in (
        target("com", com_actions, frozenset({"com1", "com2", "com3", "com4"})),
        target("pci-uart", pci_uart_actions, frozenset({"uart@pci.0.2.0 BAR0"})),
        target("pci-config", pci_config_actions,
               frozenset({"pci config address", "pci config data", "pci ecam"})),
        target("rtc", rtc_actions, frozenset({"rtc"}), deterministic=False,
               volatile=rtc_clock_read),
        target("kbc", kbc_actions, frozenset({"kbc data", "kbc command"})),
        target("pm", pm_actions, "acpi ", volatile=pm_timer_read),
        target("reset", _spans(Window("pio", 0xCF9, 1), Window("pio", 0x92, 1)),
               frozenset({"reset control", "system control port a"})),
        target("debugcon", _spans(Window("pio", 0x402, 1)), frozenset({"debugcon"})),
        target("fwcfg", fwcfg_actions, frozenset({"fwcfg"})),
        target("pc-testdev", pctestdev_actions, "pc-testdev"),
        target("virtio-pci", virtio_actions, "virtio-rnd@pci.0.3.0"),
    )}
    everything = target("machine", _everything([t.actions for t in devices.values()]),
                        frozenset().union(*(t.owners for t in devices.values())),
                        deterministic=False, volatile=_clock_read)
    return {**devices, everything.name: everything}


if __name__ == "__main__":
    sys.exit(main(targets(), prog="scripts/fuzz-devices", through=through_snapshot))
