# SPDX-License-Identifier: BSD-2-Clause
"""bhyve's ``pc-testdev``: debug exit, a scratch register, IRQ lines, scratch memory.

- I/O 0xF4-0xF7: writing v ends hvf with status (v << 1) | 1; reads return 0.
- I/O 0xE0-0xE3: a 32-bit scratch register (any width at any byte offset).
- I/O 0xE4-0xE7: QEMU's page-flush port. A 32-bit write of a guest-physical address
  makes QEMU drop and rebuild the host mapping of that page (an mprotect, which KVM
  sees as an invalidation); hvf keeps the mapping, so the write is accepted and has no
  effect. Reads return 0.
- I/O 0x2000 + n: a non-zero byte raises interrupt line n, zero lowers it.
- MMIO 0xFF000000, 64 KiB: scratch memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from hvf.device import Device
from hvf.iobus import ignore_write, read_zero
from hvf.snapshot_api import Fields, check_fields, field_bytes, field_int

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.interrupts import LineSource
    from hvf.vm import Machine

DEBUG_EXIT_PORT = 0xF4
SCRATCH_PORT = 0xE0
FLUSH_PAGE_PORT = 0xE4
IRQ_PORT_BASE = 0x2000
IRQ_LINES = 24  # the in-kernel IOAPIC's pins
SCRATCH_MMIO_BASE = 0xFF00_0000
SCRATCH_MMIO_SIZE = 64 * 1024
PAGE = 4096


#: Saved page keys (hex offsets, as :func:`_sparse_memory` writes them) to offsets.
_PAGE_KEYS = {f"{offset:#x}": offset for offset in range(0, SCRATCH_MMIO_SIZE, PAGE)}


def _sparse_memory(memory: bytes | bytearray) -> dict[str, bytes]:
    """The non-zero 4 KiB pages of the scratch memory, keyed by hex offset."""
    return {
        key: bytes(memory[offset : offset + PAGE])
        for key, offset in _PAGE_KEYS.items()
        if any(memory[offset : offset + PAGE])
    }


def _upgrade_v1(fields: Fields) -> Fields:
    """Version 1 saved the whole 64 KiB scratch memory; version 2 only non-zero pages."""
    memory = field_bytes(fields, "memory", size=SCRATCH_MMIO_SIZE)
    upgraded = {name: value for name, value in fields.items() if name != "memory"}
    upgraded["memory_pages"] = _sparse_memory(memory)
    return upgraded


@attrs.define
class PcTestdevState:
    """The scratch register, the level written to each IRQ port (0 or 1), and the
    scratch memory."""

    scratch: int = 0
    irq_levels: bytearray = attrs.field(factory=lambda: bytearray(IRQ_LINES))
    memory: bytearray = attrs.field(factory=lambda: bytearray(SCRATCH_MMIO_SIZE))

    def to_fields(self) -> Fields:
        return {"scratch": self.scratch, "irq_levels": bytes(self.irq_levels),
                "memory_pages": _sparse_memory(self.memory)}

    @classmethod
    def from_fields(cls, fields: Fields) -> PcTestdevState:
        """Rebuild from :meth:`to_fields`; ``ValueError`` names a field the device
        could not hold."""
        check_fields(fields, ("scratch", "irq_levels", "memory_pages"))
        irq_levels = field_bytes(fields, "irq_levels", size=IRQ_LINES)
        if max(irq_levels) > 1:
            raise ValueError("saved field 'irq_levels' holds a level other than 0 and 1")
        pages = fields["memory_pages"]
        if not isinstance(pages, dict):
            raise ValueError("saved field 'memory_pages' is not a mapping")
        memory = bytearray(SCRATCH_MMIO_SIZE)
        for key, page in pages.items():
            offset = _PAGE_KEYS.get(key)
            if offset is None or not isinstance(page, bytes) or len(page) != PAGE:
                raise ValueError(f"saved field 'memory_pages' has a bad page {str(key)[:20]!r}")
            memory[offset : offset + PAGE] = page
        return cls(field_int(fields, "scratch", 32), bytearray(irq_levels), memory)


class PcTestdev(Device):
    """Test-kernel helper ports (``-l pc-testdev``); the guest-visible state lives in
    :attr:`state` (a :class:`PcTestdevState`)."""

    state_version = 2
    state_upgrades = {1: _upgrade_v1}

    def __init__(self) -> None:
        super().__init__("pc-testdev")
        self.state = PcTestdevState()
        self._lines: list[LineSource | None] = [None] * IRQ_LINES

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        ctx.pio.register(DEBUG_EXIT_PORT, 4, "pc-testdev debug exit", read_zero, self._debug_exit)
        ctx.pio.register(SCRATCH_PORT, 4, "pc-testdev scratch", self._scratch_read,
                         self._scratch_write)
        ctx.pio.register(FLUSH_PAGE_PORT, 4, "pc-testdev flush page", read_zero, ignore_write)
        ctx.pio.register(IRQ_PORT_BASE, IRQ_LINES, "pc-testdev irq lines",
                         self._irq_read, self._irq_write)
        ctx.mmio.register(SCRATCH_MMIO_BASE, SCRATCH_MMIO_SIZE, "pc-testdev memory",
                          self._mem_read, self._mem_write)

    def _debug_exit(self, offset: int, size: int, value: int) -> None:
        value <<= 8 * offset
        self.ctx.request_exit(((value << 1) | 1) & 0xFF, f"guest wrote {value:#x} to debug exit")

    def _scratch_read(self, offset: int, size: int) -> int:
        return (self.state.scratch >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def _scratch_write(self, offset: int, size: int, value: int) -> None:
        if size == 4 and not offset:  # the whole register (the masks cost a microsecond)
            self.state.scratch = value
            return
        size = min(size, 4 - offset)
        mask = ((1 << (8 * size)) - 1) << (8 * offset)
        self.state.scratch = (self.state.scratch & ~mask) | ((value << (8 * offset)) & mask)

    def _irq_read(self, offset: int, size: int) -> int:
        return self.state.irq_levels[offset]

    def _irq_write(self, offset: int, size: int, value: int) -> None:
        level = 1 if value & 0xFF else 0
        levels = self.state.irq_levels
        if levels[offset] != level:
            levels[offset] = level
            self._line(offset).set(bool(level))

    def _mem_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.state.memory[offset : offset + size], "little")

    def _mem_write(self, offset: int, size: int, value: int) -> None:
        size = min(size, SCRATCH_MMIO_SIZE - offset)
        self.state.memory[offset : offset + size] = value.to_bytes(8, "little")[:size]

    def save_state(self) -> dict[str, Any]:
        return self.state.to_fields()

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        self.state = PcTestdevState.from_fields(fields)
        for gsi, level in enumerate(self.state.irq_levels):
            if level or self._lines[gsi] is not None:
                self._line(gsi).set(bool(level))

    def _line(self, gsi: int) -> LineSource:
        """This device's input on ``gsi`` (made on first use)."""
        if self._lines[gsi] is None:
            self._lines[gsi] = self.ctx.interrupts.line(gsi).source(self.name)
        source = self._lines[gsi]
        assert source is not None
        return source


def create(*, vm: Machine, config: Any) -> PcTestdev | None:
    return PcTestdev() if config.get_bool("lpc.pc-testdev") else None
