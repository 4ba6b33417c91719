# SPDX-License-Identifier: BSD-2-Clause
"""The port-I/O and MMIO registries (the "buses"): the core owns addresses.

A device registers a range with two callables, ``read(offset, size) -> int`` and
``write(offset, size, value)``, where ``offset`` is relative to the range's base (as in
crosvm's and Firecracker's buses), so a device never needs to know where it was put.
Ranges move at run time (BAR reprogramming) with :meth:`Range.move`.

Lookup is O(1) for ports (a dict keyed by port: a machine decodes a few hundred of the
64 Ki ports, and a 64 Ki-entry list would cost 512 KiB) and O(log n) for MMIO (bisection
over sorted bases); both tables are built when devices attach, never per access.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from hvf.errors import ResourceConflict

ReadFn = Callable[[int, int], int]
WriteFn = Callable[[int, int, int], None]

PORT_SPACE = 0x10000


def ignore_write(offset: int, size: int, value: int) -> None:
    """A write handler that drops the value (for read-only registers)."""


def read_zero(offset: int, size: int) -> int:
    """A read handler that returns zero (for write-only registers)."""
    return 0


class Range:
    """One registered range: base, length, owner and the handlers behind it."""

    __slots__ = ("bus", "base", "length", "owner", "read", "write", "mapped")

    def __init__(
        self, bus: _Bus, base: int, length: int, owner: str, read: ReadFn, write: WriteFn
    ) -> None:
        self.bus = bus
        self.base = base
        self.length = length
        self.owner = owner
        self.read = read
        self.write = write
        self.mapped = False

    @property
    def end(self) -> int:
        return self.base + self.length

    def move(self, new_base: int) -> None:
        """Move the range to ``new_base``; refused (and left in place) on overlap."""
        if new_base == self.base:
            return
        was_mapped = self.mapped
        if was_mapped:
            self.bus._remove(self)
        old_base, self.base = self.base, new_base
        if was_mapped:
            try:
                self.bus._insert(self)
            except ResourceConflict:
                self.base = old_base
                self.bus._insert(self)
                raise

    def unmap(self) -> None:
        """Stop decoding the range (e.g. the guest turned decoding off)."""
        if self.mapped:
            self.bus._remove(self)

    def map(self) -> None:
        """Decode the range again at its current base."""
        if not self.mapped:
            self.bus._insert(self)

    def __repr__(self) -> str:
        return f"<{self.bus.kind} {self.base:#x}+{self.length:#x} {self.owner}>"


class _Bus:
    kind = "range"

    def register(
        self,
        base: int,
        length: int,
        owner: str,
        read: ReadFn = read_zero,
        write: WriteFn = ignore_write,
        *,
        mapped: bool = True,
    ) -> Range:
        """Register ``[base, base+length)`` for ``owner``; overlap raises ResourceConflict.

        With ``mapped=False`` the range is created but does not decode until
        :meth:`Range.map` (a BAR whose decoding is off).
        """
        if length <= 0:
            raise ValueError(f"{owner}: {self.kind} range length must be positive")
        r = Range(self, base, length, owner, read, write)
        if mapped:
            self._insert(r)
        return r

    def _insert(self, r: Range) -> None:
        raise NotImplementedError

    def overlapping(self, base: int, length: int) -> Range | None:
        """A mapped range overlapping ``[base, base+length)``, or None."""
        raise NotImplementedError

    def _remove(self, r: Range) -> None:
        raise NotImplementedError

    def _conflict(self, new: Range, old: Range) -> ResourceConflict:
        return ResourceConflict(
            f"{self.kind} range {new.base:#x}-{new.end - 1:#x} of {new.owner} overlaps "
            f"{old.base:#x}-{old.end - 1:#x} of {old.owner}"
        )


class PortBus(_Bus):
    """I/O ports 0..0xFFFF: one table entry per decoded port."""

    kind = "I/O port"

    def __init__(self) -> None:
        self.table: dict[int, Range] = {}

    def _insert(self, r: Range) -> None:
        if r.base < 0 or r.end > PORT_SPACE:
            raise ResourceConflict(
                f"I/O port range {r.base:#x}+{r.length:#x} of {r.owner} is outside 0-0xffff"
            )
        old = self.overlapping(r.base, r.length)
        if old is not None:
            raise self._conflict(r, old)
        self.table.update(dict.fromkeys(range(r.base, r.end), r))
        r.mapped = True

    def _remove(self, r: Range) -> None:
        table = self.table
        for port in range(r.base, r.end):
            if table.get(port) is r:
                del table[port]
        r.mapped = False

    def lookup(self, port: int) -> Range | None:
        return self.table.get(port)

    def overlapping(self, base: int, length: int) -> Range | None:
        table = self.table
        for port in range(max(base, 0), min(base + length, PORT_SPACE)):
            r = table.get(port)
            if r is not None:
                return r
        return None

    def ranges(self) -> list[Range]:
        seen = {id(r): r for r in self.table.values()}
        return sorted(seen.values(), key=lambda r: r.base)


class MmioBus(_Bus):
    """Guest-physical MMIO ranges kept sorted by base for bisection."""

    kind = "MMIO"

    def __init__(self) -> None:
        self.bases: list[int] = []
        self.entries: list[Range] = []

    def _insert(self, r: Range) -> None:
        if r.base < 0 or r.end > 1 << 64:
            raise ResourceConflict(f"MMIO range {r.base:#x}+{r.length:#x} of {r.owner} is invalid")
        i = bisect.bisect_right(self.bases, r.base)
        if i > 0 and self.entries[i - 1].end > r.base:
            raise self._conflict(r, self.entries[i - 1])
        if i < len(self.entries) and self.entries[i].base < r.end:
            raise self._conflict(r, self.entries[i])
        self.bases.insert(i, r.base)
        self.entries.insert(i, r)
        r.mapped = True

    def _remove(self, r: Range) -> None:
        i = self.entries.index(r)
        del self.bases[i]
        del self.entries[i]
        r.mapped = False

    def overlapping(self, base: int, length: int) -> Range | None:
        i = bisect.bisect_right(self.bases, base)
        if i > 0 and self.entries[i - 1].end > base:
            return self.entries[i - 1]
        if i < len(self.entries) and self.entries[i].base < base + length:
            return self.entries[i]
        return None

    def lookup(self, addr: int) -> Range | None:
        i = bisect.bisect_right(self.bases, addr) - 1
        if i >= 0:
            r = self.entries[i]
            if addr < r.base + r.length:
                return r
        return None

    def ranges(self) -> list[Range]:
        return list(self.entries)
