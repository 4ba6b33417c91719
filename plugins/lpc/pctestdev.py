# SPDX-License-Identifier: BSD-2-Clause
"""bhyve's ``pc-testdev``: debug exit, a scratch register, IRQ lines, scratch memory.

- I/O 0xF4-0xF7: writing v ends hvf with status (v << 1) | 1; reads return 0.
- I/O 0xE0-0xE3: a 32-bit scratch register (any width at any byte offset).
- I/O 0x2000 + n: a non-zero byte raises interrupt line n, zero lowers it.
- MMIO 0xFF000000, 64 KiB: scratch memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf.device import Device
from hvf.iobus import read_zero
from hvf.snapshot_api import field_bytes, field_int

if TYPE_CHECKING:
    from hvf.interrupts import LineSource
    from hvf.vm import Machine

DEBUG_EXIT_PORT = 0xF4
SCRATCH_PORT = 0xE0
IRQ_PORT_BASE = 0x2000
IRQ_LINES = 24  # the in-kernel IOAPIC's pins
SCRATCH_MMIO_BASE = 0xFF00_0000
SCRATCH_MMIO_SIZE = 64 * 1024
PAGE = 4096


def _sparse_memory(memory: bytes) -> dict[str, bytes]:
    """The non-zero 4 KiB pages of the scratch memory, keyed by hex offset."""
    return {
        f"{offset:#x}": memory[offset : offset + PAGE]
        for offset in range(0, len(memory), PAGE)
        if any(memory[offset : offset + PAGE])
    }


def _upgrade_v1(fields: dict[str, Any]) -> dict[str, Any]:
    """Version 1 saved the whole 64 KiB scratch memory; version 2 only non-zero pages."""
    fields = dict(fields)
    fields["memory_pages"] = _sparse_memory(bytes(fields.pop("memory")))
    return fields


class PcTestdev(Device):
    """Test-kernel helper ports (``-l pc-testdev``)."""

    state_version = 2
    state_upgrades = {1: _upgrade_v1}

    def __init__(self) -> None:
        super().__init__("pc-testdev")
        self.scratch = 0
        self.irq_levels = bytearray(IRQ_LINES)
        self._lines: list[LineSource | None] = [None] * IRQ_LINES
        self.memory = bytearray(SCRATCH_MMIO_SIZE)

    def attach(self, vm: Machine) -> None:
        self.vm = vm
        vm.pio.register(DEBUG_EXIT_PORT, 4, "pc-testdev debug exit", read_zero, self._debug_exit)
        vm.pio.register(SCRATCH_PORT, 4, "pc-testdev scratch", self._scratch_read, self._scratch_write)
        vm.pio.register(IRQ_PORT_BASE, IRQ_LINES, "pc-testdev irq lines",
                        self._irq_read, self._irq_write)
        vm.mmio.register(SCRATCH_MMIO_BASE, SCRATCH_MMIO_SIZE, "pc-testdev memory",
                         self._mem_read, self._mem_write)

    def _debug_exit(self, offset: int, size: int, value: int) -> None:
        value <<= 8 * offset
        self.vm.request_exit(((value << 1) | 1) & 0xFF, f"guest wrote {value:#x} to debug exit")

    def _scratch_read(self, offset: int, size: int) -> int:
        return (self.scratch >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def _scratch_write(self, offset: int, size: int, value: int) -> None:
        size = min(size, 4 - offset)
        mask = ((1 << (8 * size)) - 1) << (8 * offset)
        self.scratch = (self.scratch & ~mask) | ((value << (8 * offset)) & mask)

    def _irq_read(self, offset: int, size: int) -> int:
        return self.irq_levels[offset]

    def _irq_write(self, offset: int, size: int, value: int) -> None:
        level = 1 if value & 0xFF else 0
        if self.irq_levels[offset] != level:
            self.irq_levels[offset] = level
            self._line(offset).set(bool(level))

    def _mem_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.memory[offset : offset + size], "little")

    def _mem_write(self, offset: int, size: int, value: int) -> None:
        size = min(size, SCRATCH_MMIO_SIZE - offset)
        self.memory[offset : offset + size] = value.to_bytes(8, "little")[:size]

    def save_state(self) -> dict[str, Any]:
        return {"scratch": self.scratch, "irq_levels": bytes(self.irq_levels),
                "memory_pages": _sparse_memory(bytes(self.memory))}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        self.scratch = field_int(fields, "scratch", 32)
        self.irq_levels[:] = field_bytes(fields, "irq_levels", size=IRQ_LINES)
        pages = fields.get("memory_pages")
        if not isinstance(pages, dict):
            raise ValueError("saved field 'memory_pages' is not a mapping")
        self.memory[:] = bytes(SCRATCH_MMIO_SIZE)
        for key, page in pages.items():
            offset = int(key, 16)
            if offset % PAGE or not 0 <= offset < SCRATCH_MMIO_SIZE or not isinstance(
                    page, bytes) or len(page) > PAGE:
                raise ValueError(f"pc-testdev: bad scratch page {key}")
            self.memory[offset : offset + len(page)] = page
        for line, level in enumerate(self.irq_levels):
            self._line(line).set(bool(level))

    def _line(self, gsi: int) -> LineSource:
        """This device's input on ``gsi`` (made on first use)."""
        if self._lines[gsi] is None:
            self._lines[gsi] = self.vm.interrupts.line(gsi).source(self.name)
        source = self._lines[gsi]
        assert source is not None
        return source


def create(*, vm: Machine, config: Any) -> PcTestdev | None:
    return PcTestdev() if config.get_bool("lpc.pc-testdev") else None
