# SPDX-License-Identifier: BSD-2-Clause
"""The MC146818 RTC and CMOS RAM at ports 0x70/0x71, as firmware and OSes expect.

Time registers read the host clock (UTC, or local time with ``rtc.use_localtime``,
bhyve's default), in BCD or binary and 12- or 24-hour form as register B selects; a
guest that sets the clock keeps its offset from the host's. CMOS bytes 0x10-0x3F and
0x5B-0x5D carry the memory sizes PC firmware reads. Update, alarm and periodic
interrupts are not generated (register C reads 0); register A never shows an update in
progress, so a guest polling UIP proceeds at once.
"""

from __future__ import annotations

import calendar
import time
from typing import TYPE_CHECKING, Any

from hvf.device import Device
from hvf.memory import MiB
from hvf.snapshot_api import field_bytes, field_int

if TYPE_CHECKING:
    from hvf.vm import Machine

INDEX_PORT = 0x70
CMOS_SIZE = 128
#: A restored clock may differ from the host's by less than this many seconds (3000 years).
MAX_CLOCK_OFFSET = 3000 * 366 * 86400
NMI_DISABLE = 0x80

SECONDS, MINUTES, HOURS = 0x00, 0x02, 0x04
WEEKDAY, DAY, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
B_24H = 0x02
B_BINARY = 0x04
B_SET = 0x80
D_VALID = 0x80
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)


class Rtc(Device):
    def __init__(self, use_localtime: bool) -> None:
        super().__init__("rtc")
        self.cmos = bytearray(CMOS_SIZE)
        self.index = 0
        self.offset = 0.0  # guest clock minus host clock, seconds
        self.use_localtime = use_localtime
        self.cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate
        self.cmos[REG_B] = B_24H
        self.cmos[REG_D] = D_VALID

    def attach(self, vm: Machine) -> None:
        self._store_memory_sizes(vm.memory.lowmem_size, vm.memory.highmem_size)
        vm.pio.register(INDEX_PORT, 2, "rtc", self._read, self._write)

    def _store_memory_sizes(self, low: int, high: int) -> None:
        self.cmos[0x15:0x17] = (640).to_bytes(2, "little")  # base memory, KiB
        ext_kib = min(max(low - MiB, 0) // 1024, 0xFFFF)  # above 1 MiB, up to 64 MiB
        self.cmos[0x17:0x19] = self.cmos[0x30:0x32] = ext_kib.to_bytes(2, "little")
        ext2 = min(max(low - 16 * MiB, 0) // (64 * 1024), 0xFFFF)  # above 16 MiB, 64 KiB units
        self.cmos[0x34:0x36] = ext2.to_bytes(2, "little")
        self.cmos[0x5B:0x5E] = min(high // (64 * 1024), 0xFFFFFF).to_bytes(3, "little")

    # ---- ports ----

    def _read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only on a PC (firmware probes it)
        return self.read_register(self.index)

    def _write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F  # bit 7 masks NMI; nothing to mask here
        else:
            self.write_register(self.index, value & 0xFF)

    # ---- registers ----

    def _now(self) -> time.struct_time:
        t = time.time() + self.offset
        return time.localtime(t) if self.use_localtime else time.gmtime(t)

    def _encode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_BINARY else (value // 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_BINARY else (value >> 4) * 10 + (value & 0xF)

    def read_register(self, index: int) -> int:
        if index in TIME_REGISTERS and not self.cmos[REG_B] & B_SET:
            now = self._now()
            if index == HOURS:
                hour = now.tm_hour
                if not self.cmos[REG_B] & B_24H:
                    pm = hour >= 12
                    return self._encode(hour % 12 or 12) | (0x80 if pm else 0)
                return self._encode(hour)
            values = {
                SECONDS: min(now.tm_sec, 59), MINUTES: now.tm_min, WEEKDAY: (now.tm_wday + 1) % 7 + 1,
                DAY: now.tm_mday, MONTH: now.tm_mon, YEAR: now.tm_year % 100,
                CENTURY: now.tm_year // 100,
            }
            return self._encode(values[index])
        if index == REG_C:
            return 0
        return self.cmos[index]

    def write_register(self, index: int, value: int) -> None:
        if index in (REG_C, REG_D):
            return  # read-only
        if index == REG_B and self.cmos[REG_B] & B_SET and not value & B_SET:
            self._set_clock_from_registers()
        if index == REG_B and value & B_SET and not self.cmos[REG_B] & B_SET:
            for reg in TIME_REGISTERS:  # freeze the current time for the guest to edit
                self.cmos[reg] = self.read_register(reg)
        if index == REG_A:
            value &= 0x7F  # UIP is read-only
        self.cmos[index] = value

    def _set_clock_from_registers(self) -> None:
        c = self.cmos
        hour_byte = c[HOURS]
        hour = self._decode(hour_byte & 0x7F)
        if not c[REG_B] & B_24H:
            hour = hour % 12 + (12 if hour_byte & 0x80 else 0)
        year = self._decode(c[CENTURY]) * 100 + self._decode(c[YEAR])
        try:
            fields = (year, self._decode(c[MONTH]), self._decode(c[DAY]), hour,
                      self._decode(c[MINUTES]), self._decode(c[SECONDS]), 0, 0, 0)
            target = time.mktime(fields) if self.use_localtime else calendar.timegm(fields)
        except (OverflowError, ValueError):
            return  # an impossible date: keep the clock as it was
        self.offset = target - time.time()

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        return {"cmos": bytes(self.cmos), "index": self.index, "offset": self.offset}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        cmos = field_bytes(fields, "cmos", size=CMOS_SIZE)
        index = field_int(fields, "index", 7)
        offset = fields.get("offset")
        if type(offset) not in (int, float) or not abs(offset) < MAX_CLOCK_OFFSET:
            raise ValueError("rtc: the saved clock offset is not a number of seconds "
                             "within 3000 years")
        self.cmos[:] = cmos
        self.index = index
        self.offset = float(offset)
