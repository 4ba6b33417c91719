# SPDX-License-Identifier: BSD-2-Clause
"""The PCI function base class that built-in and third-party PCI devices subclass.

A subclass sets its identity in ``__init__`` (:meth:`PciDevice.set_identity`), declares
BARs with :meth:`PciDevice.add_bar` (each with its own ``read``/``write`` handlers, called
with the offset inside the BAR), an expansion ROM with :meth:`PciDevice.set_rom`, capabilities with :meth:`PciDevice.add_capability` and
an interrupt pin with :meth:`PciDevice.request_intx`. The bus assigns BAR addresses, and
moves the BARs' handlers whenever the guest reprograms a BAR or toggles decoding.

Config space follows real hardware rather than bhyve where they differ: identity
registers, BAR low bits and the interrupt pin are read-only (bhyve stores raw writes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING


from hvf.device import Device
from hvf.errors import DeviceError, ResourceConflict
from hvf.iobus import MmioBus, PortBus, ReadFn, WriteFn, ignore_write
from hvf.plugins.pci.config_space import (
    BAR0, BAR_IO, BAR_MEM64, BAR_ROM, CACHE_LINE_SIZE, CAPABILITIES_POINTER, CLASS_PROG,
    COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEMORY,
    COMMAND_WRITABLE, CONFIG_SPACE_SIZE, DEVICE_ID, FIRST_CAPABILITY, HEADER_TYPE,
    IDENTITY_REGISTERS, INTERRUPT_LINE, INTERRUPT_PIN, LATENCY_TIMER, MIN_BAR_SIZE,
    REVISION_ID, STATUS, STATUS_CAPABILITIES, STATUS_INTERRUPT, SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID, VENDOR_ID, Bar, PciFunctionState,
)
from hvf.plugins.pci.rom import ROM_ADDRESS, ROM_ENABLE, rom_image, rom_register
from hvf.snapshot_api import Fields

if TYPE_CHECKING:
    from hvf.plugins.pci.bus import PciBus


class PciDevice(Device):
    """One PCI function with a 256-byte type-0 configuration space."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.cfg = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)  # guest-writable bits, per byte
        self.bars: list[Bar | None] = [None] * 6
        self.rom: Bar | None = None
        self.bus: PciBus | None = None
        self.address: tuple[int, int, int] = (0, 0, 0)
        self.intx_level = False
        self.intx_asserted = False  # what the interrupt router has been told
        self._intx_route: Callable[[PciDevice, bool], None] | None = None
        self._capabilities: dict[int, int] = {}  # offset -> length
        self._capability_writers: dict[int, Callable[[int, int], None]] = {}
        self._capability_restorers: list[Callable[[], None]] = []
        for offset, mask in ((CACHE_LINE_SIZE, 0xFF), (LATENCY_TIMER, 0xFF), (INTERRUPT_LINE, 0xFF)):
            self.wmask[offset] = mask
        self.cfg[INTERRUPT_LINE] = 0xFF

    # ---- declaring the device (before it attaches) ----

    def set_identity(
        self,
        vendor: int,
        device: int,
        class_code: int,
        *,
        revision: int = 0,
        subsystem_vendor: int = 0,
        subsystem: int = 0,
        header_type: int = 0,
    ) -> None:
        """Vendor/device IDs and the 24-bit class code (class, subclass, prog-if)."""
        self.write_raw(VENDOR_ID, 2, vendor)
        self.write_raw(DEVICE_ID, 2, device)
        self.write_raw(REVISION_ID, 1, revision)
        self.write_raw(CLASS_PROG, 3, class_code)
        self.write_raw(HEADER_TYPE, 1, header_type)
        self.write_raw(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self.write_raw(SUBSYSTEM_ID, 2, subsystem)

    def add_bar(
        self,
        index: int,
        kind: str,
        size: int,
        read: ReadFn,
        write: WriteFn,
        *,
        prefetchable: bool = False,
    ) -> Bar:
        """Declare BAR ``index``; ``size`` is rounded up to a power of two."""
        if kind not in MIN_BAR_SIZE:
            raise DeviceError(f"{self.name}: unknown BAR kind '{kind}'")
        last = index + 1 if kind == BAR_MEM64 else index
        if not 0 <= index <= last <= 5 or any(
            self.bars[i] or self._is_upper_half(i) for i in range(index, last + 1)
        ):
            raise DeviceError(f"{self.name}: BAR {index} is out of range or already used")
        size = max(MIN_BAR_SIZE[kind], 1 << (max(size, 1) - 1).bit_length())
        bar = Bar(index, kind, size, read, write, prefetchable)
        self.bars[index] = bar
        self.write_raw(BAR0 + 4 * index, 4, bar.low_bits)
        return bar

    def set_rom(self, image: bytes) -> Bar:
        """Serve ``image`` (padded to a power of two of at least 2 KiB) read-only through
        the expansion ROM BAR; a type 0 header only (a bridge's ROM is elsewhere)."""
        if self.rom is not None or self.cfg[HEADER_TYPE] & 0x7F:
            raise DeviceError(f"{self.name}: an expansion ROM is already set or has no "
                              "register in this header type")
        image = rom_image(image)

        def read(offset: int, size: int) -> int:
            return int.from_bytes(image[offset : offset + size], "little")

        self.rom = Bar(6, BAR_ROM, len(image), read, ignore_write)
        return self.rom

    def _is_upper_half(self, index: int) -> bool:
        """Whether BAR register ``index`` holds the upper half of a 64-bit BAR."""
        lower = self.bars[index - 1] if index > 0 else None
        return lower is not None and lower.kind == BAR_MEM64

    def add_capability(
        self,
        cap_id: int,
        body: bytes,
        *,
        writable: bytes = b"",
        on_write: Callable[[int, int], None] | None = None,
        on_restore: Callable[[], None] | None = None,
    ) -> int:
        """Append a capability (ID, next pointer, then ``body``); returns its offset.

        ``writable`` gives per-byte guest-writable masks for ``body``; ``on_write``,
        when given, is called as ``on_write(offset, size)`` (offset from the
        capability's start) after each guest write that touches the capability;
        ``on_restore`` after :meth:`restore_state` has loaded config space, to bring
        what the capability drives (interrupt vectors) in line with its registers.
        """
        last = max(self._capabilities, default=0)
        start = (last + self._capabilities[last] + 3) & ~3 if last else FIRST_CAPABILITY
        end = start + 2 + len(body)
        if end > CONFIG_SPACE_SIZE:
            raise DeviceError(f"{self.name}: capability {cap_id:#x} does not fit in config space")
        self.cfg[start] = cap_id
        self.cfg[start + 1] = 0
        self.cfg[start + 2 : end] = body
        self.wmask[start + 2 : start + 2 + len(writable)] = writable
        if last:
            self.cfg[last + 1] = start
        else:
            self.cfg[CAPABILITIES_POINTER] = start
            self.cfg[STATUS] |= STATUS_CAPABILITIES
        self._capabilities[start] = 2 + len(body)
        if on_write is not None:
            self._capability_writers[start] = on_write
        if on_restore is not None:
            self._capability_restorers.append(on_restore)
        return start

    def request_intx(self, pin: int = 1) -> None:
        """Use legacy interrupt pin INTA (1) .. INTD (4)."""
        if not 1 <= pin <= 4:
            raise DeviceError(f"{self.name}: interrupt pin {pin} is not INTA..INTD")
        self.cfg[INTERRUPT_PIN] = pin

    # ---- raw config-space helpers ----

    def read_raw(self, offset: int, size: int) -> int:
        return int.from_bytes(self.cfg[offset : offset + size], "little")

    def write_raw(self, offset: int, size: int, value: int) -> None:
        self.cfg[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @property
    def command(self) -> int:
        return self.read_raw(COMMAND, 2)

    @property
    def interrupt_pin(self) -> int:
        return self.cfg[INTERRUPT_PIN]

    # ---- guest config accesses (the bus calls these) ----

    def config_read(self, offset: int, size: int) -> int:
        """A guest read of config space; subclasses may override for live registers."""
        return self.read_raw(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A guest write of config space: BARs, command, then the writable mask."""
        if BAR0 <= offset < BAR0 + 24:
            if size == 4 and offset % 4 == 0:
                self._write_bar((offset - BAR0) // 4, value)
            return
        if ROM_ADDRESS <= offset < ROM_ADDRESS + 4:
            if self.rom is not None and size == 4 and offset == ROM_ADDRESS:
                self.write_raw(ROM_ADDRESS, 4, rom_register(value, self.rom.size))
                self._set_bar_address(self.rom, value & ~ROM_ENABLE & ~(self.rom.size - 1))
            return
        old_command = self.command
        for i in range(size):
            mask = self.wmask[offset + i]
            if offset + i in (COMMAND, COMMAND + 1):
                mask = (COMMAND_WRITABLE >> (8 * (offset + i - COMMAND))) & 0xFF
            if mask:
                byte = (value >> (8 * i)) & 0xFF
                self.cfg[offset + i] = (self.cfg[offset + i] & ~mask) | (byte & mask)
        if offset < COMMAND + 2 and offset + size > COMMAND:
            self._command_changed(old_command, self.command)
        for start, on_write in self._capability_writers.items():
            if offset < start + self._capabilities[start] and start < offset + size:
                on_write(offset - start, size)

    # ---- BARs ----

    def _write_bar(self, index: int, value: int) -> None:
        bar = self.bars[index]
        if bar is None:
            if self._is_upper_half(index):
                lower = self.bars[index - 1]
                assert lower is not None
                new = (lower.address & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
                new &= ~(lower.size - 1)
                self.write_raw(BAR0 + 4 * index, 4, new >> 32)
                self._set_bar_address(lower, new)
            return
        if bar.kind == BAR_IO:
            new = value & ~(bar.size - 1) & 0xFFFFFFFF  # above 0xffff: not decoded
        else:
            new = (bar.address & ~0xFFFFFFFF) | (value & 0xFFFFFFFF & ~(bar.size - 1))
        self.write_raw(BAR0 + 4 * index, 4, (new & 0xFFFFFFFF) | bar.low_bits)
        self._set_bar_address(bar, new)

    def _set_bar_address(self, bar: Bar, address: int) -> None:
        bar.address = address
        r = bar.range
        if r is None:
            return
        decoding = self._decodes(bar)
        self._unmap_bar(bar)
        r.base = address
        if decoding:
            self._map_bar(bar)

    def _map_bar(self, bar: Bar, *, quiet: bool = False) -> None:
        """Decode ``bar`` at its address; an address that clashes is left undecoded
        (and retried by :meth:`decode_pending_bars` when ranges move)."""
        assert bar.range is not None
        bar.range.base = bar.address
        was_mapped = bar.range.mapped
        try:
            bar.range.map()
            if not was_mapped:
                self.bar_decoding_changed(bar)
        except ResourceConflict as e:
            sizing = bar.address + bar.size > (0x10000 if bar.kind == BAR_IO else 1 << 64) or (
                bar.address | (bar.size - 1)) & 0xFFFFFFFF == 0xFFFFFFFF
            if self.bus is not None and not quiet and not sizing:
                what = "the ROM" if bar.kind == BAR_ROM else f"BAR {bar.index}"
                self.bus.ctx.log(f"{self.name}: {what} not decoded: {e}")

    def _unmap_bar(self, bar: Bar) -> None:
        assert bar.range is not None
        if bar.range.mapped:
            bar.range.unmap()
            self.bar_decoding_changed(bar)

    def bar_decoding_changed(self, bar: Bar) -> None:
        """``bar`` started decoding at ``bar.address`` (``bar.range.mapped``) or
        stopped; a device with state tied to guest addresses (ioeventfds) rebinds it."""

    def _all_bars(self) -> list[Bar]:
        """The BARs and the expansion ROM."""
        return [bar for bar in (*self.bars, self.rom) if bar is not None]

    def _decodes(self, bar: Bar) -> bool:
        """Whether ``bar``'s space is on in the command register (and, for the ROM,
        the ROM's own enable bit is set)."""
        if bar.kind == BAR_ROM and not self.cfg[ROM_ADDRESS] & ROM_ENABLE:
            return False
        return bool(self.command & bar.decode_bit)

    def decode_pending_bars(self) -> None:
        """Map BARs whose decoding is on but whose address clashed when last tried."""
        for bar in self._all_bars():
            if bar.range is not None and not bar.range.mapped and self._decodes(bar):
                self._map_bar(bar, quiet=True)

    def _command_changed(self, old: int, new: int) -> None:
        for bit in (COMMAND_IO, COMMAND_MEMORY):
            if (old ^ new) & bit:
                for bar in self._all_bars():
                    if bar.decode_bit == bit and bar.range is not None:
                        if self._decodes(bar):
                            self._map_bar(bar)
                        else:
                            self._unmap_bar(bar)
        if (old ^ new) & COMMAND_INTX_DISABLE:
            self._update_intx()

    def register_bars(self, pio: PortBus, mmio: MmioBus) -> None:
        """Create (undecoded) ranges for every BAR and the ROM on the buses; the bus
        maps them as decoding allows. The ROM keeps the address its register holds."""
        for bar in self._all_bars():
            bus = pio if bar.kind == BAR_IO else mmio
            bar.range = bus.register(bar.address, bar.size, f"{self.name} {bar.label}",
                                     bar.read, bar.write, mapped=False)
            if bar.kind != BAR_ROM:
                self.write_raw(BAR0 + 4 * bar.index, 4,
                               (bar.address & 0xFFFFFFFF) | bar.low_bits)
            if bar.kind == BAR_MEM64:
                self.write_raw(BAR0 + 4 * bar.index + 4, 4, bar.address >> 32)
            if self._decodes(bar):
                self._map_bar(bar)

    def enable_decoding(self) -> None:
        """Turn on I/O and memory decoding and bus mastering (no firmware to do it)."""
        bits = COMMAND_BUS_MASTER
        for bar in self.bars:
            if bar is not None:
                bits |= bar.decode_bit
        old = self.command
        self.write_raw(COMMAND, 2, old | bits)
        self._command_changed(old, self.command)

    # ---- INTx ----

    def connect_intx(self, route: Callable[[PciDevice, bool], None]) -> None:
        self._intx_route = route

    def set_intx(self, level: bool) -> None:
        """Drive this function's INTx line (level-triggered)."""
        self.intx_level = level
        self._update_intx()

    def _update_intx(self) -> None:
        active = self.intx_level and not self.command & COMMAND_INTX_DISABLE
        if self.intx_level:
            self.cfg[STATUS] |= STATUS_INTERRUPT
        else:
            self.cfg[STATUS] &= ~STATUS_INTERRUPT
        if active != self.intx_asserted and self._intx_route is not None:
            self.intx_asserted = active
            self._intx_route(self, active)

    # ---- state ----

    def save_state(self) -> Fields:
        return PciFunctionState(bytes(self.cfg), [b.address if b else 0 for b in self.bars],
                                self.intx_level).to_fields()

    def restore_state(self, fields: Fields, version: int) -> None:
        """Load saved config space and BARs; the snapshot is untrusted, so its identity
        registers must be this device's and every BAR address one the BAR can hold."""
        try:
            state = PciFunctionState.from_fields(fields)
        except ValueError as e:
            raise DeviceError(f"{self.name}: {e}") from None
        config, addresses, level = state.config, state.bar_addresses, state.intx_level
        for offset, size in IDENTITY_REGISTERS:
            saved, own = (int.from_bytes(c[offset:offset + size], "little")
                          for c in (config, self.cfg))
            if saved != own:
                raise DeviceError(f"{self.name}: saved config space is another device's "
                                  f"(register {offset:#04x} is {saved:#x}, not {own:#x})")
        for bar, address in zip(self.bars, addresses):
            if (bar is None and address != 0) or (
                    bar is not None and not self._bar_can_hold(bar, address)):
                raise DeviceError(f"{self.name}: saved BAR address {address!r} is invalid")
        rom = int.from_bytes(config[ROM_ADDRESS : ROM_ADDRESS + 4], "little")
        if rom != (0 if self.rom is None else rom_register(rom, self.rom.size)):
            raise DeviceError(f"{self.name}: saved expansion ROM register {rom:#x} is "
                              "invalid for this device")
        old_command = self.command
        self.cfg[:] = config
        for bar, address in zip(self.bars, addresses):
            if bar is not None:
                if bar.range is not None:
                    self._unmap_bar(bar)
                bar.address = address
                self.write_raw(BAR0 + 4 * bar.index, 4, (address & 0xFFFFFFFF) | bar.low_bits)
                if bar.kind == BAR_MEM64:
                    self.write_raw(BAR0 + 4 * bar.index + 4, 4, address >> 32)
        if self.rom is not None:
            if self.rom.range is not None:
                self._unmap_bar(self.rom)
            self.rom.address = rom & ~ROM_ENABLE
        new_command = self.command
        self.write_raw(COMMAND, 2, 0)
        self._command_changed(old_command, 0)
        self.write_raw(COMMAND, 2, new_command)
        self._command_changed(0, new_command)
        self.set_intx(level)
        for restored in self._capability_restorers:
            restored()

    @staticmethod
    def _bar_can_hold(bar: Bar, address: int) -> bool:
        """Whether a guest could have programmed ``bar`` to ``address``."""
        limit = 1 << (64 if bar.kind == BAR_MEM64 else 32)
        return 0 <= address < limit and address % bar.size == 0
