# SPDX-License-Identifier: BSD-2-Clause
"""The RTC's clock as a guest sets it: what the device fuzzer found (each test failed
before its fix), Hypothesis over every date of the years 1-9999 in any mode and time
zone, and ``-u`` (the RTC in UTC; bhyve's default is local time)."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fuzz_targets import build_machine
from hvf.plugins.lpc.rtc import (
    B_24H,
    B_BINARY,
    B_SET,
    CENTURY,
    DAY,
    HOURS,
    MINUTES,
    MONTH,
    NS,
    REG_B,
    SECONDS,
    YEAR,
    Rtc,
)
from hvf.testing.fakes import FakeVm, inp, outp
from hvf.testing.fuzz import close_machine

def _cmos(vm: FakeVm, index: int, value: int | None = None) -> int:
    outp(vm, 0x70, 1, index)
    if value is None:
        return inp(vm, 0x71, 1)
    outp(vm, 0x71, 1, value)
    return value


@pytest.fixture
def time_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Switch the process's local time zone (``TZ``) for the test."""
    def switch(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()
    yield switch
    monkeypatch.undo()
    time.tzset()


def _rtc_machine(use_localtime: bool) -> tuple[FakeVm, Rtc]:
    vm = FakeVm()
    device = Rtc(use_localtime)
    vm.attach(device)
    return vm, device


def _set_clock(vm: FakeVm, registers: dict[int, int], mode: int = B_24H) -> None:
    _cmos(vm, REG_B, mode | B_SET)
    for index, value in registers.items():
        _cmos(vm, index, value)
    _cmos(vm, REG_B, mode)


@pytest.mark.parametrize("use_localtime", [True, False])
def test_rtc_refuses_a_date_past_year_9999(use_localtime: bool) -> None:
    """BCD 0xFF in the century and year registers is the year 16665: local time took it
    (mktime), and the century 166 then no longer fitted a CMOS byte, so freezing the
    clock again raised ValueError on the vCPU thread."""
    vm, device = _rtc_machine(use_localtime)
    _set_clock(vm, {CENTURY: 0xFF, YEAR: 0xFF, MONTH: 0x01, DAY: 0x01})
    assert device.state.offset == 0  # an impossible date: the clock is as it was
    _cmos(vm, REG_B, B_24H | B_SET)
    assert _cmos(vm, CENTURY) == int(str(time.gmtime().tm_year // 100), 16)


@pytest.mark.parametrize("registers", [{MONTH: 0x13}, {DAY: 0x31, MONTH: 0x02},
                                       {HOURS: 0x24}, {MINUTES: 0x60}, {DAY: 0x00}])
def test_rtc_impossible_dates_leave_the_clock_in_local_time_too(
        registers: dict[int, int]) -> None:
    """mktime carried month 13 or 31 February over into the next ones; timegm did too."""
    for use_localtime in (True, False):
        vm, device = _rtc_machine(use_localtime)
        _set_clock(vm, {CENTURY: 0x20, YEAR: 0x24, MONTH: 0x07, DAY: 0x15, HOURS: 0x10,
                        MINUTES: 0, SECONDS: 0})
        offset = device.state.offset
        _set_clock(vm, registers)
        assert device.state.offset == offset


def test_rtc_century_keeps_two_digits_past_year_9999() -> None:
    """A clock that ran (or was restored) past 9999 showed century 100 as BCD 0xA0."""
    vm, device = _rtc_machine(False)
    year_10000 = datetime.datetime(10000 - 1, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
    device.state.offset = (int(year_10000.timestamp()) + 1) * NS - time.time_ns() + NS // 2
    assert (_cmos(vm, CENTURY), _cmos(vm, YEAR), _cmos(vm, MONTH)) == (0x00, 0x00, 0x01)
    _cmos(vm, REG_B, B_24H | B_SET)
    assert _cmos(vm, CENTURY) == 0x00


def test_rtc_local_time_set_in_summer_reads_back_the_same_hour(
        time_zone: Callable[[str], None]) -> None:
    """mktime was told the date had no daylight saving: 10:00 set on 15 July in London
    read back as 11:00."""
    time_zone("Europe/London")
    vm, _device = _rtc_machine(True)
    _set_clock(vm, {CENTURY: 0x20, YEAR: 0x24, MONTH: 0x07, DAY: 0x15, HOURS: 0x10,
                    MINUTES: 0x30, SECONDS: 0})
    assert (_cmos(vm, HOURS), _cmos(vm, MINUTES)) == (0x10, 0x30)


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


@settings(max_examples=150, deadline=None)
@given(when=st.datetimes(min_value=datetime.datetime(1, 1, 2),
                         max_value=datetime.datetime(9999, 12, 30)),
       zone=st.sampled_from(("UTC", "Europe/London", "America/New_York", "Asia/Kolkata")),
       use_localtime=st.booleans(), binary=st.booleans(), hours24=st.booleans())
def test_rtc_reads_back_any_date_it_was_set_to(when: datetime.datetime, zone: str,
                                               use_localtime: bool, binary: bool,
                                               hours24: bool) -> None:
    saved_zone = os.environ.get("TZ")
    os.environ["TZ"] = zone  # the fixture cannot wrap each example; restored below
    time.tzset()
    try:
        when = when.replace(microsecond=0)
        if use_localtime:  # a time the clocks skip, or pass twice, names no one instant
            assume(datetime.datetime.fromtimestamp(when.timestamp()) == when)
        encode = (lambda v: v) if binary else _bcd
        decode = (lambda v: v) if binary else (lambda v: (v >> 4) * 10 + (v & 0xF))
        mode = (B_BINARY if binary else 0) | (B_24H if hours24 else 0)
        hour = encode(when.hour) if hours24 else \
            encode(when.hour % 12 or 12) | (0x80 if when.hour >= 12 else 0)
        fields = {CENTURY: when.year // 100, YEAR: when.year % 100, MONTH: when.month,
                  DAY: when.day, MINUTES: when.minute, SECONDS: when.second}
        vm, _device = _rtc_machine(use_localtime)
        _set_clock(vm, {**{i: encode(v) for i, v in fields.items()}, HOURS: hour}, mode)
        _cmos(vm, REG_B, mode | B_SET)  # freeze, then read what the clock says
        read = {index: decode(_cmos(vm, index)) for index in fields}
        hour = _cmos(vm, HOURS)
        hour = decode(hour) if hours24 else decode(hour & 0x7F) % 12 + (12 if hour & 0x80 else 0)
        got = datetime.datetime(read[CENTURY] * 100 + read[YEAR], read[MONTH], read[DAY], hour,
                                read[MINUTES], read[SECONDS])
        assert datetime.timedelta(0) <= got - when <= datetime.timedelta(seconds=2)
    finally:
        if saved_zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved_zone
        time.tzset()


# ---- -u: the RTC in UTC (bhyve's default is local time) ----


@pytest.mark.parametrize("flags, utc", [((), False), (("-u",), True)])
def test_u_keeps_the_rtc_in_utc(flags: tuple[str, ...], utc: bool,
                                time_zone: Callable[[str], None]) -> None:
    time_zone("Asia/Kolkata")  # UTC+05:30 all year
    vm = build_machine(*flags)
    try:
        assert vm.config.get_bool("rtc.use_localtime", default=True) is not utc
        clock = time.gmtime if utc else time.localtime
        before = clock()
        hour, minute = _cmos(vm, HOURS), _cmos(vm, MINUTES)
        after = clock()
        assert (hour, minute) in {(_bcd(t.tm_hour), _bcd(t.tm_min)) for t in (before, after)}
    finally:
        close_machine(vm)
