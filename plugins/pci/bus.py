# SPDX-License-Identifier: BSD-2-Clause
"""The PCI root complex: configuration mechanism #1 (0xCF8/0xCFC), ECAM, BAR allocation.

Config accesses go: guest port access → :class:`PciBus` handler → the addressed
:class:`~hvf.plugins.pci.device.PciDevice`'s ``config_read``/``config_write``. BARs are
allocated largest first from bhyve's windows once every device exists (less
fragmentation), and decoding is turned on by hvf itself only when no firmware will do it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hvf.device import Device
from hvf.errors import ConfigError
from hvf.memory import HIGHMEM_BASE, GiB, MiB
from hvf.plugins.pci.config_space import BAR_IO, BAR_MEM64, COMMAND, HEADER_TYPE, INTERRUPT_LINE, Bar
from hvf.plugins.pci.device import PciDevice
from hvf.plugins.pci.intx import PIRQ_COUNT, PIRQ_WRITABLE, IntxRouter
from hvf.plugins.pci.rom import ROM_ADDRESS
from hvf.snapshot_api import Fields, check_fields, field_bytes, field_flags

if TYPE_CHECKING:
    from hvf.context import DeviceContext

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
ECAM_BASE = 0xE000_0000
ECAM_SIZE = 256 * MiB
#: The bits of CONFIG_ADDRESS that hold: enable, bus, device, function, dword register.
CONFIG_ADDRESS_MASK = 0x80FF_FFFC

IO_WINDOW = (0x2000, 0x10000)
MEM32_WINDOW = (0xC000_0000, 0xE000_0000)
MEM64_WINDOW_ALIGN = 32 * GiB
MEM64_WINDOW_SIZE = 32 * GiB
#: 64-bit BARs up to this size go in the 32-bit window, as bhyve places them.
MEM64_IN_MEM32_LIMIT = 128 * MiB

Bdf = tuple[int, int, int]


@attrs.frozen
class PciBusState:
    """What the root bus itself saves: mechanism #1's address latch and the PIRQ
    routing registers (which the bus's :class:`IntxRouter` holds)."""

    config_address: int
    pirq: bytes

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields) -> PciBusState:
        """Rebuild from :meth:`to_fields`; ``ValueError`` names a field the bus could not
        hold."""
        check_fields(fields, attrs.fields_dict(cls))
        config_address = field_flags(fields, "config_address", 32, CONFIG_ADDRESS_MASK)
        pirq = field_bytes(fields, "pirq", size=PIRQ_COUNT)
        if any(value & ~PIRQ_WRITABLE for value in pirq):
            raise ValueError(f"saved field 'pirq' has bits outside {PIRQ_WRITABLE:#x} set")
        return cls(config_address, pirq)


class PciBus(Device):
    """All PCI root buses of the machine, their config mechanisms and windows."""

    def __init__(self) -> None:
        super().__init__("pci")
        self.functions: dict[Bdf, PciDevice] = {}
        self.config_address = 0
        self.ctx: DeviceContext
        self.intx: IntxRouter
        self.windows: dict[str, tuple[int, int]] = {}

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.intx = IntxRouter(ctx.interrupts)
        ctx.pio.register(CONFIG_ADDRESS, 1, "pci config address",
                         self._address_read, self._address_write)
        ctx.pio.register(CONFIG_DATA, 4, "pci config data", self._data_read, self._data_write)
        ctx.mmio.register(ECAM_BASE, ECAM_SIZE, "pci ecam", self._ecam_read, self._ecam_write)

    def add(self, bdf: Bdf, device: PciDevice) -> None:
        """Put ``device`` at bus:slot:function ``bdf`` and attach it to the machine, its
        configuration at ``pci.B.S.F``."""
        if bdf in self.functions:
            raise ConfigError(f"pci slot {bdf[0]}:{bdf[1]}:{bdf[2]} already occupied!")
        device.bus = self
        device.address = bdf
        self.functions[bdf] = device
        self.ctx.attach(device, config="pci.{}.{}.{}".format(*bdf))

    # ---- configuration mechanism #1 ----

    def _address_read(self, offset: int, size: int) -> int:
        return self.config_address if size == 4 else (1 << (8 * size)) - 1

    def _address_write(self, offset: int, size: int, value: int) -> None:
        if size == 4:
            self.config_address = value & CONFIG_ADDRESS_MASK

    def _data_read(self, offset: int, size: int) -> int:
        addr = self.config_address
        if not addr & 0x8000_0000:
            return (1 << (8 * size)) - 1
        return self.config_read(
            (addr >> 16) & 0xFF, (addr >> 11) & 0x1F, (addr >> 8) & 0x7, (addr & 0xFC) + offset, size
        )

    def _data_write(self, offset: int, size: int, value: int) -> None:
        addr = self.config_address
        if addr & 0x8000_0000:
            self.config_write(
                (addr >> 16) & 0xFF, (addr >> 11) & 0x1F, (addr >> 8) & 0x7,
                (addr & 0xFC) + offset, size, value,
            )

    # ---- ECAM (memory-mapped configuration) ----

    def _ecam_read(self, offset: int, size: int) -> int:
        return self.config_read(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7,
                                offset & 0xFFF, size)

    def _ecam_write(self, offset: int, size: int, value: int) -> None:
        self.config_write(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7,
                          offset & 0xFFF, size, value)

    # ---- common config access ----

    def config_read(self, bus: int, slot: int, func: int, offset: int, size: int) -> int:
        """Absent functions, bad widths and misaligned accesses read as all ones."""
        all_ones = (1 << (8 * size)) - 1
        device = self.functions.get((bus, slot, func))
        if device is None or size not in (1, 2, 4) or offset % size:
            return all_ones
        if offset >= 256:
            return 0 if offset < 260 else all_ones  # no extended capabilities
        value = device.config_read(offset, size)
        if offset <= HEADER_TYPE < offset + size:
            bit = 0x80 << (8 * (HEADER_TYPE - offset))
            value = (value | bit) if self._multifunction(bus, slot) else (value & ~bit)
        return value

    def config_write(self, bus: int, slot: int, func: int, offset: int, size: int, value: int) -> None:
        device = self.functions.get((bus, slot, func))
        if device is None or size not in (1, 2, 4) or offset % size or offset >= 256:
            return
        device.config_write(offset, size, value)
        if offset < ROM_ADDRESS + 4 and offset + size > COMMAND:  # ranges may have moved
            for other in self.functions.values():
                other.decode_pending_bars()

    def _multifunction(self, bus: int, slot: int) -> bool:
        return sum(1 for (b, s, _f) in self.functions if b == bus and s == slot) > 1

    # ---- state ----

    def save_state(self) -> dict[str, object]:
        return PciBusState(self.config_address, bytes(self.intx.pirq)).to_fields()

    def restore_state(self, fields: dict[str, object], version: int) -> None:
        state = PciBusState.from_fields(fields)
        self.config_address = state.config_address
        for index, value in enumerate(state.pirq):
            self.intx.write(index, value)

    # ---- BAR allocation and INTx routing, once every device exists ----

    def assign_resources(self, *, enable_decoding: bool) -> None:
        """Allocate every BAR (largest first) and route every INTx pin."""
        top = HIGHMEM_BASE + self.ctx.memory.highmem_size
        mem64_base = -(-top // MEM64_WINDOW_ALIGN) * MEM64_WINDOW_ALIGN
        cursors = {
            "io": list(IO_WINDOW),
            "mem32": list(MEM32_WINDOW),
            "mem64": [mem64_base, mem64_base + MEM64_WINDOW_SIZE],
        }
        bars: list[tuple[PciDevice, Bar]] = [
            (dev, bar) for dev in self.functions.values() for bar in dev.bars if bar is not None
        ]
        bars.sort(key=lambda db: (-db[1].size, db[0].address, db[1].index))
        for device, bar in bars:
            window = self._window_for(bar)
            cursor = cursors[window]
            space = self.ctx.pio if bar.kind == BAR_IO else self.ctx.mmio
            base = -(-cursor[0] // bar.size) * bar.size
            while (taken := space.overlapping(base, bar.size)) is not None:
                base = -(-taken.end // bar.size) * bar.size  # skip fixed legacy ranges
            if base + bar.size > cursor[1]:
                raise ConfigError(
                    f"{device.name}: no room for BAR {bar.index} ({bar.size:#x} bytes) "
                    f"in the PCI {window} window"
                )
            bar.address = base
            cursor[0] = base + bar.size
        self.windows = {
            "io": (IO_WINDOW[0], cursors["io"][0]),
            "mem32": (MEM32_WINDOW[0], cursors["mem32"][0]),
            "mem64": (mem64_base, cursors["mem64"][0]),
        }
        for device in self.functions.values():
            device.register_bars(self.ctx.pio, self.ctx.mmio)
            if enable_decoding:
                device.enable_decoding()
            if device.interrupt_pin:
                line = self.intx.connect(device)
                device.cfg[INTERRUPT_LINE] = line

    @staticmethod
    def _window_for(bar: Bar) -> str:
        if bar.kind == BAR_IO:
            return "io"
        if bar.kind == BAR_MEM64 and bar.size > MEM64_IN_MEM32_LIMIT:
            return "mem64"
        return "mem32"
