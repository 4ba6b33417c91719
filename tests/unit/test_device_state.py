# SPDX-License-Identifier: BSD-2-Clause
"""Device state records: strict ``from_fields``, exact round trips, versioned chunks.

Every record refuses each field a device could not have saved, by name; a chunk goes
through its device's upgrades from the version it was written with (the checked-in
``counter-v1`` snapshot holds version-1 RTC and pc-testdev chunks), and a chunk newer
than the device is refused naming it and both versions.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from hvf.errors import SnapshotError
from hvf.plugins.lpc import kbc, pctestdev, pm, rtc
from hvf.plugins.lpc.fwcfg import FwCfgState
from hvf.plugins.lpc.kbc import KbcState, KeyboardController
from hvf.plugins.lpc.pctestdev import PcTestdev, PcTestdevState
from hvf.plugins.lpc.pm import PmState, PowerManagement
from hvf.plugins.lpc.rtc import NS, Rtc, RtcState
from hvf.plugins.pci.bus import PciBus, PciBusState
from hvf.plugins.snapshot.statefile import read_state
from hvf.snapshot import restore_device
from hvf.snapshot_api import Chunk
from hypothesis import given
from hypothesis import strategies as st

from fakes import FakeVm, inp, mmio_read, outp

COUNTER_V1 = Path(__file__).parent.parent / "data" / "snapshots" / "counter-v1" / "state"


def _bus_state() -> PciBusState:
    return PciBusState(0, bytes([0x80] * 8))


RECORDS: dict[str, Any] = {
    "pm": PmState,
    "kbc": KbcState,
    "rtc": RtcState,
    "fwcfg": FwCfgState,
    "pc-testdev": PcTestdevState,
    "pci": _bus_state,
}


def _from_fields(record: Any, fields: dict[str, Any]) -> Any:
    return type(record).from_fields(fields)


# ---- good values round-trip ----


@pytest.mark.parametrize("name", RECORDS)
def test_reset_state_round_trips(name: str) -> None:
    record = RECORDS[name]()
    fields = record.to_fields()
    assert _from_fields(record, fields) == record
    assert _from_fields(record, fields).to_fields() == fields


def _pm_states() -> st.SearchStrategy[PmState]:
    def masked(mask: int) -> st.SearchStrategy[int]:
        return st.integers(0, 0xFFFF).map(lambda v: v & mask)

    return st.builds(PmState, status=masked(pm.STS_W1C), enable=masked(pm.EN_WRITABLE),
                     control=masked(pm.CNT_WRITABLE | pm.CNT_SCI_EN),
                     gpe_status=st.integers(0, 0xFF), gpe_enable=st.integers(0, 0xFF))


@st.composite
def _kbc_states(draw: st.DrawFn) -> KbcState:
    queue = bytearray(draw(st.binary(max_size=kbc.QUEUE_LIMIT)))
    status = draw(st.integers(0, 0xFF)) & (kbc.ST_USED & ~kbc.ST_OUTPUT_FULL)
    return KbcState(
        command_byte=draw(st.integers(0, 0xFF)),
        status=status | (kbc.ST_OUTPUT_FULL if queue else 0),
        output_port=draw(st.integers(0, 0xFF)),
        queue=queue,
        pending_command=draw(st.sampled_from([0, *sorted(kbc._WITH_ARGUMENT)])),
        kbd_pending=draw(st.sampled_from([0, *sorted(kbc._KBD_WITH_ARGUMENT)])),
        scancode_set=draw(st.sampled_from([1, 2, 3])),
    )


@st.composite
def _rtc_states(draw: st.DrawFn) -> RtcState:
    cmos = bytearray(draw(st.binary(min_size=rtc.CMOS_SIZE, max_size=rtc.CMOS_SIZE)))
    cmos[rtc.REG_A] &= 0x7F
    cmos[rtc.REG_C] = 0
    cmos[rtc.REG_D] = rtc.D_VALID
    bound = rtc.MAX_CLOCK_OFFSET * NS - 1
    return RtcState(cmos, draw(st.integers(0, 0x7F)), draw(st.integers(-bound, bound)))


@st.composite
def _pctestdev_states(draw: st.DrawFn) -> PcTestdevState:
    memory = bytearray(pctestdev.SCRATCH_MMIO_SIZE)
    writes = draw(st.dictionaries(st.integers(0, pctestdev.SCRATCH_MMIO_SIZE - 16),
                                  st.binary(min_size=1, max_size=16), max_size=8))
    for offset, data in writes.items():
        memory[offset : offset + len(data)] = data
    levels = draw(st.lists(st.integers(0, 1), min_size=pctestdev.IRQ_LINES,
                           max_size=pctestdev.IRQ_LINES))
    return PcTestdevState(draw(st.integers(0, 0xFFFF_FFFF)), bytearray(levels), memory)


STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "pm": _pm_states(),
    "kbc": _kbc_states(),
    "rtc": _rtc_states(),
    "fwcfg": st.builds(FwCfgState, selector=st.integers(0, 0xFFFF),
                       offset=st.integers(0, 0xFFFF_FFFF), dma_high=st.integers(0, 0xFFFF_FFFF)),
    "pc-testdev": _pctestdev_states(),
    "pci": st.builds(PciBusState,
                     config_address=st.integers(0, 0xFFFF_FFFF).map(lambda v: v & 0x80FF_FFFC),
                     pirq=st.lists(st.integers(0, 0xFF).map(lambda v: v & 0x8F), min_size=8,
                                   max_size=8).map(bytes)),
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_arbitrary_valid_records_round_trip(name: str) -> None:
    @given(STRATEGIES[name])
    def check(record: Any) -> None:
        assert _from_fields(record, record.to_fields()) == record

    check()


# ---- each bad field refused by name ----


def _cmos(**registers: int) -> bytes:
    cmos = RtcState().cmos
    for index, value in registers.items():
        cmos[getattr(rtc, index)] = value
    return bytes(cmos)


PAGE = b"\x01" * pctestdev.PAGE
BAD_PAGE = "'memory_pages' has a bad page"
BAD_FIELDS = [
    ("pm", "status", -1, "'status' is not an unsigned integer of 16 bits"),
    ("pm", "status", 0x0002, "'status' has bits outside 0x8731 set"),
    ("pm", "enable", pm.STS_WAK, "'enable' has bits outside"),
    ("pm", "control", pm.CNT_SLP_EN, "'control' has bits outside"),
    ("pm", "control", 1 << 16, "'control' is not an unsigned integer of 16 bits"),
    ("pm", "gpe_status", 0x100, "'gpe_status' is not an unsigned integer of 8 bits"),
    ("pm", "gpe_enable", True, "'gpe_enable' is not an unsigned integer of 8 bits"),
    ("kbc", "command_byte", 3.5, "'command_byte' is not an unsigned integer of 8 bits"),
    ("kbc", "status", kbc.ST_AUX_DATA | kbc.ST_UNLOCKED, "'status' has bits outside"),
    ("kbc", "status", kbc.ST_OUTPUT_FULL | kbc.ST_UNLOCKED, "'status' disagrees with the queue"),
    ("kbc", "output_port", 0x100, "'output_port' is not an unsigned integer of 8 bits"),
    ("kbc", "queue", b"x" * (kbc.QUEUE_LIMIT + 1), "'queue' is not a byte string of at most 64"),
    ("kbc", "queue", [1], "'queue' is not a byte string"),
    ("kbc", "pending_command", 0x20, "'pending_command' is not a command taking data"),
    ("kbc", "kbd_pending", 0xFF, "'kbd_pending' is not a keyboard command taking data"),
    ("kbc", "scancode_set", 4, "'scancode_set' is not 1, 2 or 3"),
    ("rtc", "cmos", 1 << 70, "'cmos' is not a byte string of 128 bytes"),
    ("rtc", "cmos", bytes(127), "'cmos' is not a byte string of 128 bytes"),
    ("rtc", "cmos", _cmos(REG_A=0xA6), "'cmos' holds impossible status registers"),
    ("rtc", "cmos", _cmos(REG_C=0x80), "'cmos' holds impossible status registers"),
    ("rtc", "cmos", _cmos(REG_D=0), "'cmos' holds impossible status registers"),
    ("rtc", "index", 0x80, "'index' is not an unsigned integer of 7 bits"),
    ("rtc", "offset", 1.5, "'offset' is not a clock offset in nanoseconds"),
    ("rtc", "offset", math.nan, "'offset' is not a clock offset"),
    ("rtc", "offset", True, "'offset' is not a clock offset"),
    ("rtc", "offset", -rtc.MAX_CLOCK_OFFSET * NS, "'offset' is not a clock offset"),
    ("fwcfg", "selector", 0x10000, "'selector' is not an unsigned integer of 16 bits"),
    ("fwcfg", "offset", -1, "'offset' is not an unsigned integer of 32 bits"),
    ("fwcfg", "dma_high", "0", "'dma_high' is not an unsigned integer of 32 bits"),
    ("pc-testdev", "scratch", 1 << 32, "'scratch' is not an unsigned integer of 32 bits"),
    ("pc-testdev", "irq_levels", bytes(23), "'irq_levels' is not a byte string of 24 bytes"),
    ("pc-testdev", "irq_levels", b"\x02" + bytes(23), "'irq_levels' holds a level other"),
    ("pc-testdev", "memory_pages", [PAGE], "'memory_pages' is not a mapping"),
    ("pc-testdev", "memory_pages", {"0x1": PAGE}, f"{BAD_PAGE} '0x1'"),
    ("pc-testdev", "memory_pages", {"4096": PAGE}, f"{BAD_PAGE} '4096'"),
    ("pc-testdev", "memory_pages", {"0x10000": PAGE}, f"{BAD_PAGE} '0x10000'"),
    ("pc-testdev", "memory_pages", {"0x1000": b"x"}, f"{BAD_PAGE} '0x1000'"),
    ("pc-testdev", "memory_pages", {"0x1000": PAGE + b"x"}, f"{BAD_PAGE} '0x1000'"),
    ("pci", "config_address", 0x8000_0001, "'config_address' has bits outside 0x80fffffc"),
    ("pci", "config_address", 1 << 32, "'config_address' is not an unsigned integer of 32"),
    ("pci", "pirq", bytes(7), "'pirq' is not a byte string of 8 bytes"),
    ("pci", "pirq", b"\x70" + bytes(7), "'pirq' has bits outside 0x8f set"),
]


@pytest.mark.parametrize(("name", "field", "value", "message"), BAD_FIELDS,
                         ids=[f"{n}-{f}-{i}" for i, (n, f, _v, _m) in enumerate(BAD_FIELDS)])
def test_bad_field_refused_by_name(name: str, field: str, value: object, message: str) -> None:
    record = RECORDS[name]()
    assert message.startswith(f"'{field}' ")
    with pytest.raises(ValueError, match="^saved field " + re.escape(message)):
        _from_fields(record, {**record.to_fields(), field: value})


@pytest.mark.parametrize("name", RECORDS)
def test_missing_and_unknown_fields_refused(name: str) -> None:
    record = RECORDS[name]()
    fields = record.to_fields()
    for missing in fields:
        with pytest.raises(ValueError, match=f"saved field '{missing}' is missing"):
            _from_fields(record, {k: v for k, v in fields.items() if k != missing})
    with pytest.raises(ValueError, match="saved field 'extra' is unknown"):
        _from_fields(record, {**fields, "extra": 0})


# ---- devices: save_state is the record's fields; restore applies side effects ----


def test_pm_restore_reevaluates_the_sci() -> None:
    vm = FakeVm()
    device = PowerManagement()
    vm.attach(device)
    pending = PmState(status=pm.STS_PWRBTN, enable=pm.STS_PWRBTN, control=pm.CNT_SCI_EN)
    device.restore_state(pending.to_fields(), PowerManagement.state_version)
    assert device.state == pending and device.sci.level
    assert vm.irqs == [(pm.SCI_IRQ, True)]
    assert inp(vm, pm.PM1A_EVT, 2) == pm.STS_PWRBTN
    device.restore_state(PmState(status=pm.STS_PWRBTN).to_fields(), 1)  # ACPI off
    assert vm.irqs == [(pm.SCI_IRQ, True), (pm.SCI_IRQ, False)]
    assert device.save_state() == PmState(status=pm.STS_PWRBTN).to_fields()


def test_kbc_restored_queue_is_read_by_the_guest() -> None:
    vm = FakeVm()
    device = KeyboardController()
    vm.attach(device)
    state = KbcState(status=kbc.ST_UNLOCKED | kbc.ST_OUTPUT_FULL, queue=bytearray(b"\xfa\xaa"))
    device.restore_state(state.to_fields(), 1)
    assert inp(vm, 0x64, 1) & kbc.ST_OUTPUT_FULL
    assert [inp(vm, 0x60, 1), inp(vm, 0x60, 1)] == [0xFA, 0xAA]
    assert not inp(vm, 0x64, 1) & kbc.ST_OUTPUT_FULL
    assert device.save_state()["queue"] == b""


def test_pctestdev_restore_drives_the_saved_lines() -> None:
    vm = FakeVm()
    device = PcTestdev()
    vm.attach(device)
    state = PcTestdevState(scratch=0x1234)
    state.irq_levels[5] = 1
    state.memory[0x2000:0x2004] = b"\x78\x56\x34\x12"
    device.restore_state(state.to_fields(), PcTestdev.state_version)
    assert vm.irqs == [(5, True)]
    assert mmio_read(vm, pctestdev.SCRATCH_MMIO_BASE + 0x2000, 4) == 0x12345678
    assert inp(vm, pctestdev.SCRATCH_PORT, 4) == 0x1234
    assert list(device.save_state()["memory_pages"]) == ["0x2000"]


def test_pci_bus_restore_programs_the_pirq_router() -> None:
    vm = FakeVm()
    bus = PciBus()
    vm.attach(bus)
    bus.restore_state(PciBusState(0x8000_0810, bytes([11, 0x80, 10, 0x80, 5, 0x80, 0x80, 9]))
                      .to_fields(), 1)
    assert bus.config_address == 0x8000_0810
    assert [bus.intx.isa_irq(n) for n in range(8)] == [11, None, 10, None, 5, None, None, 9]
    assert bus.save_state()["pirq"] == bytes([11, 0x80, 10, 0x80, 5, 0x80, 0x80, 9])


def _rtc(vm: FakeVm | None = None) -> Rtc:
    device = Rtc(use_localtime=False)
    (vm or FakeVm()).attach(device)
    return device


def _set_year(vm: FakeVm, century: int, year: int) -> None:
    outp(vm, 0x70, 1, rtc.REG_B)
    outp(vm, 0x71, 1, rtc.B_24H | rtc.B_SET)
    for register, value in ((rtc.CENTURY, century), (rtc.YEAR, year)):
        outp(vm, 0x70, 1, register)
        outp(vm, 0x71, 1, value)
    outp(vm, 0x70, 1, rtc.REG_B)
    outp(vm, 0x71, 1, rtc.B_24H)


def _read_year(vm: FakeVm) -> tuple[int, int]:
    values = []
    for register in (rtc.CENTURY, rtc.YEAR):
        outp(vm, 0x70, 1, register)
        values.append(inp(vm, 0x71, 1))
    return values[0], values[1]


def test_rtc_clock_survives_save_and_restore_exactly() -> None:
    vm = FakeVm()
    device = _rtc(vm)
    _set_year(vm, 0x99, 0x99)  # 9999: further from now than the 3000 years v1 allowed
    fields = device.save_state()
    assert type(fields["offset"]) is int and fields["offset"] > 3000 * 366 * 86400 * NS
    vm2 = FakeVm()
    restored = _rtc(vm2)
    restore_device(restored, Chunk("device.rtc", "hvf.plugins.lpc.rtc", 2, fields))
    assert restored.state == device.state
    assert _read_year(vm2) == (0x99, 0x99)


# ---- versions: upgraded from the chunk's own, newer ones refused by name ----


def test_a_newer_chunk_is_refused_naming_the_device_and_both_versions() -> None:
    device = _rtc()
    chunk = Chunk("device.rtc", "hvf.plugins.lpc.rtc", 3, device.save_state())
    with pytest.raises(SnapshotError, match=r"'device\.rtc' was saved by a newer hvf "
                                            r"\(state version 3; this hvf reads up to 2\)"):
        restore_device(device, chunk)


def test_a_v1_rtc_chunk_goes_through_the_upgrade() -> None:
    device = _rtc()
    v1 = {"cmos": bytes(device.state.cmos), "index": 0x0B, "offset": -1.25}
    restore_device(device, Chunk("device.rtc", "hvf.plugins.lpc.rtc", 1, v1))
    assert device.state.offset == -1_250_000_000 and device.state.index == 0x0B
    restore_device(device, Chunk("device.rtc", "hvf.plugins.lpc.rtc", 1, {**v1, "offset": 86400}))
    assert device.state.offset == 86400 * NS
    assert device.save_state()["offset"] == 86400 * NS


@pytest.mark.parametrize("offset", [math.nan, math.inf, "0", None, 1e12, True])
def test_a_bad_v1_rtc_offset_is_refused_by_the_upgrade(offset: object) -> None:
    device = _rtc()
    before = device.save_state()
    v1 = {"cmos": bytes(device.state.cmos), "index": 0, "offset": offset}
    with pytest.raises(SnapshotError, match=r"device\.rtc: malformed saved state \(saved field "
                                            r"'offset' is not a clock offset in seconds"):
        restore_device(device, Chunk("device.rtc", "hvf.plugins.lpc.rtc", 1, v1))
    assert device.save_state() == before


def test_a_v1_pctestdev_chunk_goes_through_the_upgrade() -> None:
    vm = FakeVm()
    device = PcTestdev()
    vm.attach(device)
    memory = bytearray(pctestdev.SCRATCH_MMIO_SIZE)
    memory[0x3000] = 7
    v1 = {"scratch": 5, "irq_levels": bytes(pctestdev.IRQ_LINES), "memory": bytes(memory)}
    restore_device(device, Chunk("device.pc-testdev", "hvf.plugins.lpc.pctestdev", 1, v1))
    assert device.state == PcTestdevState(5, bytearray(pctestdev.IRQ_LINES), memory)
    with pytest.raises(SnapshotError, match="'memory' is not a byte string of 65536 bytes"):
        restore_device(device, Chunk("device.pc-testdev", "hvf.plugins.lpc.pctestdev", 1,
                                     {**v1, "memory": bytes(10)}))


def _v1_chunks() -> dict[str, Chunk]:
    return {c.name: c for c in read_state(COUNTER_V1).chunks}


def test_counter_v1_rtc_chunk_is_version_1_and_upgrades() -> None:
    chunk = _v1_chunks()["device.rtc"]
    assert chunk.version == 1 and chunk.fields["offset"] == 0.0
    assert type(chunk.fields["offset"]) is float
    device = _rtc()
    device.state.offset = 12345
    restore_device(device, chunk)
    assert device.state == RtcState(bytearray(chunk.fields["cmos"]), chunk.fields["index"], 0)
    assert type(device.state.offset) is int
    assert device.save_state() == {**chunk.fields, "offset": 0}


def test_counter_v1_device_chunks_restore() -> None:
    """Every chunk of an LPC device or the PCI bus in counter-v1 restores, through the
    upgrades where its version is older, and saves back at the current version."""
    chunks = _v1_chunks()
    assert chunks["device.pc-testdev"].version == 1
    vm = FakeVm()
    devices = [PciBus(), _rtc(vm), KeyboardController(), PcTestdev()]
    for device in devices:
        if device.name != "rtc":
            vm.attach(device)
        restore_device(device, chunks[f"device.{device.name}"])
    for device in devices:
        chunk = chunks[f"device.{device.name}"]
        if chunk.version == device.state_version:
            assert device.save_state() == chunk.fields, device.name
    testdev = devices[3]
    assert isinstance(testdev, PcTestdev)
    assert testdev.state.memory == chunks["device.pc-testdev"].fields["memory"]
