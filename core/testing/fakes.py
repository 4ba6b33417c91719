# SPDX-License-Identifier: BSD-2-Clause
"""A fake machine that gives devices their contexts as :class:`hvf.vm.Machine` does, with
no KVM, and the guest's side of any machine's buses (this fake or a real machine): port
and MMIO accesses through the registered handlers, called exactly as the vCPU loop calls
them (``range.read(port - range.base, size)``), configuration mechanism #1 at
0xCF8/0xCFC-0xCFF and the ECAM window."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Protocol

from hvf.config import Config
from hvf.context import attach_device
from hvf.device import Device
from hvf.eventloop import EventLoop
from hvf.interrupts import InterruptController
from hvf.iobus import MmioBus, PortBus
from hvf.memory import GuestMemory, MiB
from hvf.plugins.pci import ECAM_BASE
from hvf.registry import Registry

__all__ = ["Buses", "FakeKvm", "FakeVm", "FakeVmfd", "cfg_read", "cfg_write", "conf1", "ecam_addr",
           "ecam_read", "ecam_write", "inp", "mmio_read", "mmio_write", "outp"]

# ---- a machine without KVM ----


class FakeVmfd:
    """KVM's interrupt side (what :class:`hvf.interrupts.InterruptController` drives),
    recorded: line levels in ``irqs``, and everything in order in ``events``."""

    def __init__(self, events: list[tuple[Any, ...]], irqs: list[tuple[int, bool]]) -> None:
        self.events = events
        self.irqs = irqs
        self.level_triggered: list[Any] = []
        self.routes: list[tuple[int, int, int, int, int]] = []
        self.irqfds: dict[int, int] = {}  # eventfd -> GSI
        self.msis: list[tuple[int, int]] = []
        self.ioeventfds: dict[int, tuple[int, int]] = {}  # eventfd -> (address, length)

    def set_level_triggered(self, irq: int, level: bool = True) -> None:
        self.level_triggered.append((irq, level))
        self.events.append(("level", irq))

    def irq_line(self, irq: int, level: int) -> None:
        self.irqs.append((irq, bool(level)))
        self.events.append(("irq", irq, bool(level)))

    def set_gsi_routing(self, routes: list[tuple[int, int, int, int, int]]) -> None:
        self.routes = list(routes)

    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None,
              deassign: bool = False) -> None:
        if deassign:
            del self.irqfds[fd]
        else:
            self.irqfds[fd] = gsi

    def signal_msi(self, address: int, data: int) -> int:
        self.msis.append((address, data))
        return 1

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        if deassign:
            del self.ioeventfds[fd]
        else:
            assert fd not in self.ioeventfds
            self.ioeventfds[fd] = (addr, length)


class FakeKvm:
    """``KVM_CHECK_EXTENSION``, answered from ``capabilities`` (none by default)."""

    def __init__(self, capabilities: Mapping[int, int] | None = None) -> None:
        self.capabilities = dict(capabilities or {})

    def check_extension(self, cap: int) -> int:
        return self.capabilities.get(cap, 0)


class FakeVm:
    """What a machine provides devices (:class:`hvf.context.MachineServices`): real buses,
    guest memory and interrupt controller (KVM's side recorded by :class:`FakeVmfd`), an
    unstarted event loop and the configuration; guest-error lines, exit requests and
    memory slots are recorded. No console backends unless a test registers some in
    ``plugins.console_backends``."""

    vmfd_type = FakeVmfd

    def __init__(self, config: dict[str, str] | None = None, memory: GuestMemory | None = None,
                 lpc_devices: Any = (), *, ncpus: int = 1,
                 capabilities: Mapping[int, int] | None = None) -> None:
        self.pio = PortBus()
        self.mmio = MmioBus()
        self.memory = memory if memory is not None else _memory()
        self.devices: list[Device] = []
        self.logged: list[str] = []
        self.exits: list[tuple[int, str]] = []
        self.memory_slots: list[tuple[int, int, int, bool]] = []  # (base, size, host, ro)
        self.events: list[tuple[Any, ...]] = []  # set_irq and set_level_triggered, in order
        self.irqs: list[tuple[int, bool]] = []
        self.vmfd = self.vmfd_type(self.events, self.irqs)
        self.kvm = FakeKvm(capabilities)
        self.interrupts = InterruptController(self.vmfd)
        self._loop: EventLoop | None = None
        self.config = Config(config or {})
        self.ncpus = ncpus
        self.restoring = False
        self.plugins = types.SimpleNamespace(lpc_devices=list(lpc_devices), pci_devices={},
                                             console_backends=Registry("console backend"))

    @property
    def loop(self) -> EventLoop:
        """The I/O thread's loop, not started: a test runs what it would run."""
        if self._loop is None:
            self._loop = EventLoop()
        return self._loop

    def attach(self, device: Device, *, config: str | None = None) -> None:
        """Attach ``device`` with its context, as :meth:`hvf.vm.Machine.attach` does."""
        attach_device(self, device, config)

    def device(self, name: str) -> Device | None:
        return next((d for d in self.devices if d.name == name), None)

    def unhandled_log(self, message: str) -> None:
        self.logged.append(message)

    def request_exit(self, status: int, message: str = "") -> None:
        self.exits.append((status, message))

    def add_memory_slot(self, guest_base: int, size: int, host_addr: int,
                        readonly: bool) -> int:
        self.memory_slots.append((guest_base, size, host_addr, readonly))
        return len(self.memory.regions) + len(self.memory_slots) - 1


_MEMORY: list[GuestMemory] = []


def _memory() -> GuestMemory:
    # One 64 MiB memfd shared by every fake machine: nothing here touches guest RAM.
    if not _MEMORY:
        _MEMORY.append(GuestMemory(64 * MiB))
    return _MEMORY[0]


# ---- the guest's side ----


class Buses(Protocol):
    """What the accessors below use: a :class:`FakeVm` or an :class:`hvf.vm.Machine`."""

    pio: PortBus
    mmio: MmioBus


def inp(vm: Buses, port: int, size: int) -> int:
    """The guest's ``in`` of ``size`` bytes from ``port``."""
    r = vm.pio.lookup(port)
    assert r is not None, f"nothing at port {port:#x}"
    return r.read(port - r.base, size) & ((1 << (8 * size)) - 1)


def outp(vm: Buses, port: int, size: int, value: int) -> None:
    """The guest's ``out`` of ``size`` bytes of ``value`` to ``port``."""
    r = vm.pio.lookup(port)
    assert r is not None, f"nothing at port {port:#x}"
    r.write(port - r.base, size, value)


def mmio_read(vm: Buses, addr: int, size: int) -> int:
    """The guest's read of ``size`` bytes at the MMIO address ``addr``."""
    r = vm.mmio.lookup(addr)
    assert r is not None, f"nothing at {addr:#x}"
    return r.read(addr - r.base, size) & ((1 << (8 * size)) - 1)


def mmio_write(vm: Buses, addr: int, size: int, value: int) -> None:
    """The guest's write of ``size`` bytes of ``value`` at the MMIO address ``addr``."""
    r = vm.mmio.lookup(addr)
    assert r is not None, f"nothing at {addr:#x}"
    r.write(addr - r.base, size, value)


def conf1(bdf: tuple[int, int, int], offset: int, enable: bool = True) -> int:
    """The value of the configuration address register (0xCF8) for ``bdf``, ``offset``."""
    b, s, f = bdf
    return (0x8000_0000 if enable else 0) | b << 16 | s << 11 | f << 8 | (offset & 0xFC)


def cfg_read(vm: Buses, bdf: tuple[int, int, int], offset: int, size: int) -> int:
    """Read ``size`` bytes of ``bdf``'s configuration space through 0xCF8/0xCFC."""
    outp(vm, 0xCF8, 4, conf1(bdf, offset))
    return inp(vm, 0xCFC + (offset & 3), size)


def cfg_write(vm: Buses, bdf: tuple[int, int, int], offset: int, size: int, value: int) -> None:
    """Write ``size`` bytes of ``bdf``'s configuration space through 0xCF8/0xCFC."""
    outp(vm, 0xCF8, 4, conf1(bdf, offset))
    outp(vm, 0xCFC + (offset & 3), size, value)


def ecam_addr(bdf: tuple[int, int, int], offset: int) -> int:
    """Where ``offset`` of ``bdf``'s configuration space is in the ECAM window."""
    b, s, f = bdf
    return ECAM_BASE + (b << 20 | s << 15 | f << 12 | offset)


def ecam_read(vm: Buses, bdf: tuple[int, int, int], offset: int, size: int) -> int:
    """Read ``size`` bytes of ``bdf``'s configuration space through ECAM."""
    return mmio_read(vm, ecam_addr(bdf, offset), size)


def ecam_write(vm: Buses, bdf: tuple[int, int, int], offset: int, size: int, value: int) -> None:
    """Write ``size`` bytes of ``bdf``'s configuration space through ECAM."""
    mmio_write(vm, ecam_addr(bdf, offset), size, value)
