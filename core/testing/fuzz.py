# SPDX-License-Identifier: BSD-2-Clause
"""Random guest I/O against device models, in-process: a fuzz harness for device authors.

A :class:`Target` builds a machine (a :class:`hvf.testing.fakes.FakeVm` with the devices
attached, each machine with its own guest RAM) and generates what a hostile guest, or
peer, does to it: port and MMIO reads and writes of any width at offsets inside and
around a device's ranges (:func:`window_access`), stores to guest RAM (descriptors for
DMA), calls of a device's host-side input (:class:`HostCall`). :func:`fuzz` applies them
as the vCPU loop does (``range.read(address - range.base, size)``, all ones where nothing
decodes) and every ``check_every`` actions checks that

* every device's saved state is plain data that restores into a second machine built
  the same way (the *twin*; ``restore_state`` runs the record's ``from_fields``
  validation), saves back equal, and leaves KVM's interrupt side as the original's (the
  lines high, the MSI vectors bound and their routes);
* the twin, driven with the next ``replay`` actions alongside, reads what the original
  reads (the target's ``volatile`` reads, a clock's, excepted) and, for a
  ``deterministic`` target, ends in the same state and interrupts: the record holds
  what the guest sees.

An exception out of a device, a read that is not an integer of the access's width or a
broken check ends the run with :class:`FuzzFailure`, naming the seed and the action, so
the same seed reproduces it. :func:`main` is a command line over a list of targets.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from hvf.device import Device
from hvf.iobus import MmioBus, PortBus
from hvf.memory import GuestMemory

if TYPE_CHECKING:
    from hvf.testing.fakes import FakeVmfd

__all__ = ["Access", "Action", "FuzzFailure", "FuzzMachine", "HostCall", "RamExpect", "RamWrite",
           "Report", "Target", "Window", "close_machine", "fuzz", "main", "plain_copy",
           "random_value", "window_access"]

SIZE_NAMES = {1: "b", 2: "w", 4: "l", 8: "q"}


class FuzzMachine(Protocol):
    """What the harness drives: a :class:`hvf.testing.fakes.FakeVm` will do (its record
    of KVM's interrupt side, ``irqs`` and ``vmfd``, is compared too; ``irqs`` and
    ``events`` are consumed as the run goes)."""

    pio: PortBus
    mmio: MmioBus
    memory: GuestMemory
    devices: list[Device]
    irqs: list[tuple[int, bool]]
    events: list[tuple[Any, ...]]
    vmfd: FakeVmfd

    def device(self, name: str) -> Device | None: ...


@attrs.frozen(slots=True)
class Access:
    """One guest port (``pio``) or MMIO (``mmio``) access; ``value`` None is a read."""

    space: str
    address: int
    size: int
    value: int | None = None

    def apply(self, vm: FuzzMachine) -> tuple[str, int | None]:
        """Do it as the vCPU loop would: (owner of the range hit, value read or None)."""
        bus: PortBus | MmioBus = vm.pio if self.space == "pio" else vm.mmio
        r = bus.lookup(self.address)
        if r is None:
            return "unhandled", None if self.value is not None else (1 << 8 * self.size) - 1
        if self.value is not None:
            r.write(self.address - r.base, self.size, self.value)
            return r.owner, None
        value = r.read(self.address - r.base, self.size)
        if type(value) is not int or not 0 <= value < 1 << 8 * self.size:
            raise AssertionError(f"{r.owner}: read returned {value!r}, not a "
                                 f"{self.size}-byte value")
        return r.owner, value

    def __str__(self) -> str:
        kind = SIZE_NAMES.get(self.size, str(self.size))
        where = f"port {self.address:#06x}" if self.space == "pio" else f"MMIO {self.address:#x}"
        if self.value is None:
            return f"in{kind} {where}"
        return f"out{kind} {where} <- {self.value:#x}"


@attrs.frozen(slots=True)
class RamWrite:
    """The guest's own store of ``data`` at ``address`` (guest RAM, no exit)."""

    address: int
    data: bytes

    def apply(self, vm: FuzzMachine) -> tuple[str, int | None]:
        vm.memory.write(self.address, self.data)
        return "ram", None

    def __str__(self) -> str:
        return f"store {self.data.hex()} at {self.address:#x}"


@attrs.frozen(slots=True)
class HostCall:
    """Host-side input: ``device.<path>(*args)`` (``path`` may be dotted: ``port.push``)."""

    device: str
    path: str
    args: tuple[Any, ...] = ()

    def apply(self, vm: FuzzMachine) -> tuple[str, int | None]:
        target: Any = vm.device(self.device)
        for name in self.path.split("."):
            target = getattr(target, name)
        result = target(*self.args)
        return f"{self.device} {self.path}", result if type(result) is int else None

    def __str__(self) -> str:
        return f"host {self.device}.{self.path}{self.args!r}"


@attrs.frozen(slots=True)
class RamExpect:
    """The guest reads guest RAM at ``address`` and must find one of ``allowed`` there
    (a canary a DMA must not have touched, a status word)."""

    address: int
    allowed: tuple[bytes, ...]

    def apply(self, vm: FuzzMachine) -> tuple[str, int | None]:
        found = vm.memory.read(self.address, len(self.allowed[0]))
        if found not in self.allowed:
            raise AssertionError(f"guest RAM at {self.address:#x} holds {found.hex()}, not "
                                 f"{' or '.join(a.hex() for a in self.allowed)}")
        return "ram", None

    def __str__(self) -> str:
        return f"expect {'|'.join(a.hex() for a in self.allowed)} at {self.address:#x}"


Action = Access | RamWrite | RamExpect | HostCall


@attrs.frozen
class Window:
    """A span of guest addresses to aim accesses at."""

    space: str
    base: int
    length: int


def random_value(rng: random.Random, size: int) -> int:
    """A value of ``size`` bytes, biased towards the ones devices treat specially."""
    bits = 8 * size
    pick = rng.random()
    if pick < 0.5:
        return rng.getrandbits(bits)
    if pick < 0.65:
        return rng.getrandbits(8)
    if pick < 0.75:
        return 1 << rng.randrange(bits)
    if pick < 0.85:
        return (1 << bits) - 1
    return 0


def window_access(rng: random.Random, windows: Sequence[Window], *, margin: int = 4,
                  outside: float = 0.2, sizes: Sequence[int] = (1, 2, 4),
                  writes: float = 0.5) -> Access:
    """A read or write of a random width in one of ``windows``: at an offset inside it,
    or (a fraction ``outside`` of the time) up to ``margin`` bytes before or after it."""
    window = windows[rng.randrange(len(windows))]
    if rng.random() < outside:
        offset = rng.randrange(1, margin + 1)
        offset = window.length - 1 + offset if rng.random() < 0.5 else -offset
    else:
        offset = rng.randrange(window.length)
    address = (window.base + offset) & (0xFFFF if window.space == "pio" else (1 << 64) - 1)
    size = sizes[rng.randrange(len(sizes))]
    value = random_value(rng, size) if rng.random() < writes else None
    return Access(window.space, address, size, value)


def plain_copy(fields: Any, where: str = "state") -> Any:
    """A deep copy of saved ``fields``; ``TypeError`` for anything a snapshot cannot hold
    (only None, bool, int, float, str, bytes, lists and str-keyed dicts)."""
    if fields is None or type(fields) in (bool, int, float, str, bytes):
        return fields
    if type(fields) is list:
        return [plain_copy(v, f"{where}[{i}]") for i, v in enumerate(fields)]
    if type(fields) is dict:
        if not all(type(k) is str for k in fields):
            raise TypeError(f"{where}: a key is not a str")
        return {k: plain_copy(v, f"{where}.{k}") for k, v in fields.items()}
    raise TypeError(f"{where}: {type(fields).__name__} is not a plain value")


def _never(vm: FuzzMachine, action: Action) -> bool:
    return False


def close_machine(vm: FuzzMachine) -> None:
    """Close every device (last attached first), guest RAM, and a fake machine's event
    loop if a device made it."""
    for device in reversed(vm.devices):
        device.close()
    vm.memory.close()
    loop = getattr(vm, "_loop", None)
    if loop is not None:
        loop.close()


@attrs.frozen
class Target:
    """What to fuzz: ``build()`` makes a machine (each call a new one, with its own guest
    RAM); ``actions(rng, vm)`` yields actions against it (the run ends when they do);
    accesses to ranges whose owner is in ``owners`` count as reaching the device."""

    name: str
    build: Callable[[], FuzzMachine]
    actions: Callable[[random.Random, FuzzMachine], Iterator[Action]]
    owners: frozenset[str]
    #: Whether the same actions from the same state always lead to the same state.
    deterministic: bool = True
    #: Reads the twin need not repeat (a clock's), asked before the action is applied.
    volatile: Callable[[FuzzMachine, Action], bool] = _never
    close: Callable[[FuzzMachine], None] = close_machine


@attrs.define
class Report:
    """What one run did: actions by the owner they reached, and how long it took."""

    target: str
    seed: int
    actions: int = 0
    reached: int = 0
    counts: Counter[str] = attrs.field(factory=Counter)
    checks: int = 0
    seconds: float = 0.0


class FuzzFailure(AssertionError):
    """A device raised, read a bad value, or broke a state check."""

    def __init__(self, report: Report, action: Action | None, recent: Sequence[Action],
                 error: BaseException) -> None:
        self.report = report
        self.action = action
        self.error = error
        history = "\n".join(f"    {a}" for a in recent)
        super().__init__(
            f"{report.target}: seed {report.seed}, action #{report.actions}"
            f" ({action if action is not None else 'state check'}): "
            f"{type(error).__name__}: {error}\n  last actions:\n{history}")


def _deliver(vm: FuzzMachine) -> None:
    """What KVM does with a bound irqfd's eventfd as soon as it is written: take the
    count (the message is delivered), so none is left to look pending after a mask."""
    for fd in vm.vmfd.irqfds:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass


def _states(vm: FuzzMachine) -> dict[str, Any]:
    return {d.name: d.save_state() for d in vm.devices}


def _restore_twin(vm: FuzzMachine, twin: FuzzMachine, through: Callable[[Any], Any]) -> None:
    """Every device's state into the twin's, checked to save back equal and to drive
    KVM's interrupt side as the original's does; then the twin's RAM made the
    original's (the pages the original ever wrote)."""
    saved = _states(vm)
    for device in twin.devices:
        fields = saved[device.name]
        plain_copy(fields, device.name)
        device.restore_state(through(fields), device.state_version)
        again = device.save_state()
        if again != fields:
            raise AssertionError(f"{device.name}: restored state saves back different "
                                 f"({'; '.join(_differences(fields, again))})")
    mine, theirs = _interrupts(vm), _interrupts(twin)
    if mine != theirs:
        raise AssertionError("the restored twin drives interrupts differently from the "
                             f"original ({'; '.join(_differences(mine, theirs))})")
    view, twin_view = vm.memory.view, twin.memory.view
    for start, end in vm.memory.data_extents():
        twin_view[start:end] = view[start:end]


def fuzz(target: Target, *, seed: int, accesses: int, check_every: int = 1000,
         replay: int = 64, through: Callable[[Any], Any] = copy.deepcopy,
         seconds: float | None = None) -> Report:
    """Drive ``target`` until ``accesses`` actions have reached its device (or
    ``seconds`` have passed, or its actions end), checking state as the module says;
    ``through`` carries saved fields to the twin (a snapshot encoding and decoding,
    say). Raises :class:`FuzzFailure`."""
    report = Report(target.name, seed)
    vm, twin = target.build(), target.build()
    if vm.memory is twin.memory:
        raise ValueError(f"{target.name}: each machine built needs its own guest RAM")
    recent: deque[Action] = deque(maxlen=12)
    action: Action | None = None
    start = time.monotonic()
    deadline = None if seconds is None else start + seconds
    counts, owners = report.counts, target.owners
    replaying, next_check = 0, check_every
    try:
        for action in target.actions(random.Random(seed), vm):
            recent.append(action)
            if replaying:
                volatile = target.volatile(vm, action)
            owner, value = action.apply(vm)
            if vm.vmfd.irqfds:
                _deliver(vm)
            if replaying:
                _, twin_value = action.apply(twin)
                if twin.vmfd.irqfds:
                    _deliver(twin)
                if twin_value != value and not volatile:
                    raise AssertionError(f"the restored twin read {twin_value!r}, the "
                                         f"original {value!r}")
                replaying -= 1
                if not replaying and target.deterministic:
                    _compare(vm, twin)
            counts[owner] += 1
            report.actions += 1
            if owner in owners:
                report.reached += 1
            if report.actions >= next_check:
                action = None
                _restore_twin(vm, twin, through)
                report.checks += 1
                replaying, next_check = replay, next_check + check_every
                if deadline is not None and time.monotonic() > deadline:
                    break
            if report.reached >= accesses:
                break
        action = None
        _restore_twin(vm, twin, through)
        report.checks += 1
    except Exception as e:
        raise FuzzFailure(report, action, list(recent), e) from e
    finally:
        report.seconds = time.monotonic() - start
        target.close(vm)
        target.close(twin)
    return report


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two saved states differ: field paths, and a byte field's first offset."""
    if type(a) is dict and type(b) is dict:
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)]
    if type(a) is bytes and type(b) is bytes and len(a) == len(b) and a != b:
        first = next(i for i in range(len(a)) if a[i] != b[i])
        return [f"{where}[{first:#x}] {a[first]:#04x} vs {b[first]:#04x}"]
    return [] if a == b else [f"{where} {a!r} vs {b!r}"[:200]]


#: Each machine's line levels as last told KVM, folded from its records (consumed).
_LEVELS: weakref.WeakKeyDictionary[FuzzMachine, dict[int, bool]] = weakref.WeakKeyDictionary()


def _interrupts(vm: FuzzMachine) -> dict[str, Any]:
    """What KVM was last told that the guest can see: the lines that are high, and the
    MSI vectors bound (irqfds) with the routes they deliver through."""
    levels = _LEVELS.setdefault(vm, {})
    for irq, level in vm.irqs:
        levels[irq] = level
    vm.irqs.clear()  # a device that pulses its line would grow them without end
    vm.events.clear()
    bound = set(vm.vmfd.irqfds.values())
    return {"high lines": sorted(irq for irq, level in levels.items() if level),
            "bound MSI routes": sorted(r for r in vm.vmfd.routes if r[0] in bound)}


def _compare(vm: FuzzMachine, twin: FuzzMachine) -> None:
    mine, theirs = _states(vm), _states(twin)
    mine["interrupts"], theirs["interrupts"] = _interrupts(vm), _interrupts(twin)
    for name, fields in mine.items():
        if theirs[name] != fields:
            raise AssertionError(f"{name}: the restored twin ended in another state after "
                                 f"the same actions ({'; '.join(_differences(fields, theirs[name]))})")


def _format(report: Report) -> str:
    rate = report.actions / report.seconds / 1000 if report.seconds else 0.0
    lines = [f"{report.target}: {report.reached} accesses reached it, {report.actions} "
             f"actions in {report.seconds:.1f} s ({rate:.0f}k/s), {report.checks} state "
             f"checks"]
    lines += [f"    {count:>10}  {owner}" for owner, count in report.counts.most_common()]
    return "\n".join(lines)


def main(targets: Mapping[str, Target], argv: Sequence[str] | None = None, *,
         prog: str | None = None, through: Callable[[Any], Any] = copy.deepcopy) -> int:
    """Fuzz ``targets`` from the command line; prints each one's counts, and each
    failure with the seed that reproduces it. Exit status 1 if any failed."""
    parser = argparse.ArgumentParser(prog=prog, description="Fuzz device models with "
                                     "random guest I/O, in-process.")
    parser.add_argument("--accesses", type=int, default=1_000_000,
                        help="accesses that must reach each device (default 1000000)")
    parser.add_argument("--seed", type=int, help="random seed (default: a new one)")
    parser.add_argument("--target", action="append", choices=sorted(targets),
                        help="fuzz only this device (repeatable)")
    parser.add_argument("--check-every", type=int, default=1000,
                        help="actions between state checks (default 1000)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    failed = 0
    for name in args.target or targets:
        try:
            report = fuzz(targets[name], seed=seed, accesses=args.accesses,
                          check_every=args.check_every, through=through)
        except FuzzFailure as e:
            failed += 1
            print(f"FAIL {e}\n  reproduce: --target {name} --seed {seed} --accesses "
                  f"{args.accesses} --check-every {args.check_every}", flush=True)
            continue
        print(_format(report), flush=True)
    print(f"seed {seed}: {len(args.target or targets) - failed} passed, {failed} failed")
    return 1 if failed else 0

