# SPDX-License-Identifier: BSD-2-Clause
"""The MC146818 RTC and CMOS RAM at ports 0x70/0x71, as firmware and OSes expect.

Time registers read the host clock (UTC, or local time with ``rtc.use_localtime``,
bhyve's default; ``-u`` turns it off), in BCD or binary and 12- or 24-hour form as
register B selects; a guest that sets the clock keeps its offset from the host's. The
guest can set any real date and time of the years 1-9999 (the century register holds
two digits); a set to an impossible one (month 13, 25 o'clock, 30 February) leaves the
clock as it was. In local time a date is read with the daylight saving in force on it.
CMOS bytes 0x10-0x3F and 0x5B-0x5D carry the memory sizes PC firmware reads. Update,
alarm and periodic interrupts are not generated (register C reads 0); register A never
shows an update in progress, so a guest polling UIP proceeds at once.

The state (:class:`RtcState`) keeps the guest's clock as its offset from the host's in
integer nanoseconds (state version 2: exact, with no NaN or infinity to guard
against); version 1 kept float seconds, which a restore converts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import attrs

from hvf.device import Device
from hvf.memory import MiB
from hvf.snapshot_api import Fields, check_fields, field_bytes, field_int

if TYPE_CHECKING:
    from hvf.context import DeviceContext

INDEX_PORT = 0x70
CMOS_SIZE = 128
NS = 1_000_000_000
#: A saved clock differs from the host's by less than this many seconds: 10000 years,
#: more than lies between any two dates of the years 1-9999 a guest can set.
MAX_CLOCK_OFFSET = 10_000 * 366 * 86400
NMI_DISABLE = 0x80

SECONDS, MINUTES, HOURS = 0x00, 0x02, 0x04
WEEKDAY, DAY, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
B_24H = 0x02
B_BINARY = 0x04
B_SET = 0x80
D_VALID = 0x80
A_UIP = 0x80
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)


def _power_on_cmos() -> bytearray:
    cmos = bytearray(CMOS_SIZE)
    cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate
    cmos[REG_B] = B_24H
    cmos[REG_D] = D_VALID
    return cmos


@attrs.define
class RtcState:
    """CMOS RAM (the registers included), the index latch, and the guest's clock.

    ``offset`` is the guest clock minus the host clock in nanoseconds. Registers C and
    D are read-only (0 and VRT) and A never holds UIP; the time registers hold what
    the guest wrote while register B's SET bit freezes the clock.
    """

    cmos: bytearray = attrs.field(factory=_power_on_cmos)
    index: int = 0
    offset: int = 0

    def to_fields(self) -> Fields:
        return {"cmos": bytes(self.cmos), "index": self.index, "offset": self.offset}

    @classmethod
    def from_fields(cls, fields: Fields) -> RtcState:
        """Rebuild from :meth:`to_fields`; ``ValueError`` names a field no RTC holds."""
        check_fields(fields, attrs.fields_dict(cls))
        cmos = field_bytes(fields, "cmos", size=CMOS_SIZE)
        if cmos[REG_A] & A_UIP or cmos[REG_C] or cmos[REG_D] != D_VALID:
            raise ValueError("saved field 'cmos' holds impossible status registers A, C or D")
        offset = fields["offset"]
        if type(offset) is not int or not abs(offset) < MAX_CLOCK_OFFSET * NS:
            raise ValueError("saved field 'offset' is not a clock offset in nanoseconds "
                             "within 10000 years")
        return cls(bytearray(cmos), field_int(fields, "index", 7), offset)


def _upgrade_v1(fields: Fields) -> Fields:
    """Version 1 kept the clock offset in float seconds; version 2 in integer ns."""
    offset = fields.get("offset")
    if type(offset) not in (int, float) or not abs(offset) < MAX_CLOCK_OFFSET:
        raise ValueError("saved field 'offset' is not a clock offset in seconds "
                         "within 10000 years")
    return {**fields, "offset": round(offset * NS)}


class Rtc(Device):
    """The MC146818; its CMOS and clock offset live in :attr:`state` (:class:`RtcState`)."""

    state_version = 2
    state_upgrades = {1: _upgrade_v1}

    def __init__(self, use_localtime: bool) -> None:
        super().__init__("rtc")
        self.state = RtcState()
        self.use_localtime = use_localtime

    def attach(self, ctx: DeviceContext) -> None:
        self._store_memory_sizes(ctx.memory.lowmem_size, ctx.memory.highmem_size)
        ctx.pio.register(INDEX_PORT, 2, "rtc", self._read, self._write)

    def _store_memory_sizes(self, low: int, high: int) -> None:
        cmos = self.state.cmos
        cmos[0x15:0x17] = (640).to_bytes(2, "little")  # base memory, KiB
        ext_kib = min(max(low - MiB, 0) // 1024, 0xFFFF)  # above 1 MiB, up to 64 MiB
        cmos[0x17:0x19] = cmos[0x30:0x32] = ext_kib.to_bytes(2, "little")
        ext2 = min(max(low - 16 * MiB, 0) // (64 * 1024), 0xFFFF)  # above 16 MiB, 64 KiB units
        cmos[0x34:0x36] = ext2.to_bytes(2, "little")
        cmos[0x5B:0x5E] = min(high // (64 * 1024), 0xFFFFFF).to_bytes(3, "little")

    # ---- ports ----

    def _read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only on a PC (firmware probes it)
        return self.read_register(self.state.index)

    def _write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.state.index = value & 0x7F  # bit 7 masks NMI; nothing to mask here
        else:
            self.write_register(self.state.index, value & 0xFF)

    # ---- registers ----

    def _now(self) -> time.struct_time:
        t = (time.time_ns() + self.state.offset) // NS
        return time.localtime(t) if self.use_localtime else time.gmtime(t)

    def _encode(self, value: int) -> int:
        return value if self.state.cmos[REG_B] & B_BINARY else (value // 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        return value if self.state.cmos[REG_B] & B_BINARY else (value >> 4) * 10 + (value & 0xF)

    def read_register(self, index: int) -> int:
        cmos = self.state.cmos
        if index in TIME_REGISTERS and not cmos[REG_B] & B_SET:
            now = self._now()
            if index == HOURS:
                hour = now.tm_hour
                if not cmos[REG_B] & B_24H:
                    pm = hour >= 12
                    return self._encode(hour % 12 or 12) | (0x80 if pm else 0)
                return self._encode(hour)
            values = {
                SECONDS: min(now.tm_sec, 59), MINUTES: now.tm_min, WEEKDAY: (now.tm_wday + 1) % 7 + 1,
                DAY: now.tm_mday, MONTH: now.tm_mon, YEAR: now.tm_year % 100,
                CENTURY: now.tm_year // 100 % 100,
            }
            return self._encode(values[index])
        if index == REG_C:
            return 0
        return cmos[index]

    def write_register(self, index: int, value: int) -> None:
        if index in (REG_C, REG_D):
            return  # read-only
        cmos = self.state.cmos
        if index == REG_B and cmos[REG_B] & B_SET and not value & B_SET:
            self._set_clock_from_registers()
        if index == REG_B and value & B_SET and not cmos[REG_B] & B_SET:
            for reg in TIME_REGISTERS:  # freeze the current time for the guest to edit
                cmos[reg] = self.read_register(reg)
        if index == REG_A:
            value &= ~A_UIP  # UIP is read-only
        cmos[index] = value

    def _set_clock_from_registers(self) -> None:
        import datetime  # only when the guest sets the clock: datetime costs 0.3 MB resident

        c = self.state.cmos
        hour_byte = c[HOURS]
        hour = self._decode(hour_byte & 0x7F)
        if not c[REG_B] & B_24H:
            hour = hour % 12 + (12 if hour_byte & 0x80 else 0)
        year = self._decode(c[CENTURY]) * 100 + self._decode(c[YEAR])
        try:
            # A naive datetime is local time, with the daylight saving of its own date.
            when = datetime.datetime(year, self._decode(c[MONTH]), self._decode(c[DAY]), hour,
                                     self._decode(c[MINUTES]), self._decode(c[SECONDS]),
                                     tzinfo=None if self.use_localtime else datetime.UTC)
            target = int(when.timestamp())
        except (OverflowError, OSError, ValueError):
            return  # an impossible date: keep the clock as it was
        self.state.offset = target * NS - time.time_ns()

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        return self.state.to_fields()

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        self.state = RtcState.from_fields(fields)
