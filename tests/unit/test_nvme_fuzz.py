# SPDX-License-Identifier: BSD-2-Clause
"""Hostile guests against the NVMe controller: random register writes, random
commands on the admin and I/O queues, random PRP lists. The controller must answer
every command with a status, never raise, never touch the image outside what a valid
command names, and keep working."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeVm
from hvf.dma import GuestDma
from hvf.memory import GuestMemory, MiB
from hvf.plugins.nvme import factory, spec
from hvf.plugins.nvme.prp import PrpError, prp_views
from hvf.plugins.nvme.testing import NvmeDriver
from hvf.plugins.pci.bus import PciBus

BDF = (0, 5, 0)
SIZE = MiB
BLOCKS = SIZE // 512
RAM = 64 * MiB
ORIGINAL = bytes((i * 13 + 5) & 0xFF for i in range(4093)) * (SIZE // 4093 + 1)
ORIGINAL = ORIGINAL[:SIZE]
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


class Errors(logging.Handler):
    """Records every error logged while the controller runs (a worker's exception)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Fuzzed:
    """One controller for a whole test; :meth:`fresh` brings it back between examples."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.memory = GuestMemory(RAM)
        self.vm = FakeVm(memory=self.memory)
        bus = PciBus()
        self.vm.attach(bus)
        self.dev = factory.create(vm=self.vm, slot=BDF, config={"path": str(path)})
        bus.add(BDF, self.dev)
        bus.assign_resources(enable_decoding=True)
        self.vm.loop.start()
        self.driver = NvmeDriver(self.vm, self.memory, BDF)
        self.data = self.driver.alloc(4 * MiB)  # buffers the commands point into
        self.mark = self.driver._next
        self.errors = Errors()
        logging.getLogger("hvf").addHandler(self.errors)

    def fresh(self) -> None:
        with open(self.path, "r+b") as f:
            f.write(ORIGINAL)
        self.driver._next = self.mark
        self.driver.enable()
        self.driver.create_queue_pair(1, 64)

    def close(self) -> None:
        logging.getLogger("hvf").removeHandler(self.errors)
        self.vm.loop.stop()
        self.dev.close()
        self.memory.close()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    path = tmp_path_factory.mktemp("nvme") / "disk.img"
    path.write_bytes(ORIGINAL)
    f = Fuzzed(path)
    yield f
    f.close()


# ---- registers ----

_OFFSETS = st.one_of(
    st.sampled_from([spec.REG_CAP, spec.REG_VS, spec.REG_INTMS, spec.REG_INTMC, spec.REG_CC,
                     spec.REG_CSTS, spec.REG_NSSR, spec.REG_AQA, spec.REG_ASQ, spec.REG_ASQ + 4,
                     spec.REG_ACQ, spec.REG_ACQ + 4, 0x38]),
    st.integers(0x1000, 0x1000 + 8 * 18).map(lambda o: o & ~3),
    st.integers(0x2000, 0x2000 + 17 * 16), st.integers(0, 0x3FFF))
_VALUES = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(
    [0, 1, spec.CC_EN | 6 << 16 | 4 << 20, 1 << 14, 2 << 14, 0x000F_000F, RAM - 4096,
     RAM, 1 << 40, 0xFFFF_FFFF]))


@FUZZ
@given(writes=st.lists(st.tuples(_OFFSETS, st.sampled_from([1, 2, 4, 8]), _VALUES,
                                 st.booleans()), min_size=1, max_size=40))
def test_register_writes(fuzzed: Fuzzed, writes: list[tuple[int, int, int, bool]]) -> None:
    fuzzed.fresh()
    d = fuzzed.driver
    for offset, size, value, read in writes:
        if read:
            d.read(offset, size)
        else:
            d.write(offset, value & ((1 << 8 * size) - 1), size)
    csts = d.read(spec.REG_CSTS)
    assert csts & ~0xF == 0
    fuzzed.fresh()  # a reset always brings it back
    buf = d.alloc(4096)
    assert d.admin(spec.ADMIN_IDENTIFY, prp1=buf, cdw=(1,)).status == 0
    assert not fuzzed.errors.records


# ---- commands ----

_ADMIN = [spec.ADMIN_DELETE_SQ, spec.ADMIN_CREATE_SQ, spec.ADMIN_GET_LOG_PAGE,
          spec.ADMIN_DELETE_CQ, spec.ADMIN_CREATE_CQ, spec.ADMIN_IDENTIFY, spec.ADMIN_ABORT,
          spec.ADMIN_SET_FEATURES, spec.ADMIN_GET_FEATURES, spec.ADMIN_FIRMWARE_COMMIT,
          spec.ADMIN_FIRMWARE_DOWNLOAD, 0x80, 0x81, 0xC0, 0xFF]
_IO = [spec.IO_FLUSH, spec.IO_WRITE, spec.IO_READ, spec.IO_WRITE_ZEROES, spec.IO_DSM, 0x04,
       0x05, 0x0C, 0x7F, 0x80, 0xFF]
_STATUSES = {
    spec.SUCCESS, spec.INVALID_OPCODE, spec.INVALID_FIELD, spec.DATA_TRANSFER_ERROR,
    spec.INVALID_NAMESPACE, spec.COMMAND_SEQUENCE_ERROR, spec.INVALID_PRP_OFFSET,
    spec.NAMESPACE_WRITE_PROTECTED, spec.LBA_OUT_OF_RANGE, spec.COMPLETION_QUEUE_INVALID,
    spec.INVALID_QUEUE_IDENTIFIER, spec.INVALID_QUEUE_SIZE, spec.INVALID_FIRMWARE_SLOT,
    spec.INVALID_INTERRUPT_VECTOR, spec.INVALID_LOG_PAGE, spec.INVALID_QUEUE_DELETION,
    spec.FEATURE_NOT_SAVEABLE, spec.ABORTED_SQ_DELETION,
}
_DWORD = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(
    [0, 1, 7, 255, 0xFFFF, 0x1_0000, BLOCKS - 1, BLOCKS, 0x00FF_0000, 0xFFFF_FFFF]))


@st.composite
def _pointer(draw: st.DrawFn, base: int) -> int:
    """Mostly pages of the data area (its first pages hold a valid PRP list), else
    offsets in it, and addresses that are not RAM."""
    return draw(st.one_of(
        st.integers(0, 1023).map(lambda p: base + p * 4096),
        st.integers(0, 1023).map(lambda p: base + p * 4096),
        st.integers(0, 4 * MiB - 1).map(lambda o: base + (o & ~3)),
        st.integers(0, 4 * MiB - 1).map(lambda o: base + o),
        st.sampled_from([0, RAM - 8, RAM, 0xFFFF_FFFF_FFFF_F000, 1 << 45]),
        st.integers(0, 2**64 - 1)))


@st.composite
def _command(draw: st.DrawFn, base: int) -> tuple[int, int, int, int, int, int, list[int]]:
    qid = draw(st.sampled_from([0, 1, 1]))
    known = st.sampled_from(_ADMIN if qid == 0 else _IO)
    opcode = draw(st.one_of(known, known, known, st.integers(0, 255)))
    if qid == 0 and opcode in (spec.ADMIN_ASYNC_EVENT, spec.ADMIN_DOORBELL_BUFFER_CONFIG):
        opcode = spec.ADMIN_IDENTIFY  # held, or rewiring the doorbells: tested elsewhere
    cdw = draw(st.lists(_DWORD, min_size=6, max_size=6))
    if draw(st.booleans()):  # plausible values: an LBA, a block count, a small CNS or FID
        cdw[0] = draw(st.integers(0, BLOCKS + 8) if qid else st.sampled_from([0, 1, 2, 3, 7]))
        cdw[1] = draw(st.sampled_from([0, 0, 0, 1, cdw[1]]))
        cdw[2] = draw(st.integers(0, 300)) | draw(st.sampled_from([0, 0, spec.RW_FUA,
                                                                   spec.WZ_DEAC]))
    if qid == 0 and opcode in (spec.ADMIN_DELETE_SQ, spec.ADMIN_DELETE_CQ):
        cdw[0] = draw(st.integers(2, 20))  # keep the queues the test submits on
    nsid = draw(st.sampled_from([0, 1, 1, 1, 1, 2, spec.NSID_ALL]))
    flags = draw(st.sampled_from([0] * 8 + [1, 0x40, 0xFF]))
    return (qid, opcode, flags, nsid, draw(_pointer(base)), draw(_pointer(base)), cdw)


def _write_range(opcode: int, nsid: int, flags: int, cdw: list[int]) -> range:
    """The bytes a Write or Write Zeroes may change (empty if it is invalid)."""
    lba, blocks = cdw[0] | cdw[1] << 32, (cdw[2] & 0xFFFF) + 1
    if opcode in (spec.IO_WRITE, spec.IO_WRITE_ZEROES) and nsid == 1 and not flags:
        if lba + blocks <= BLOCKS:
            return range(lba * 512, (lba + blocks) * 512)
    return range(0)


@FUZZ
@given(data=st.data())
def test_hostile_commands(fuzzed: Fuzzed, data: st.DataObject) -> None:
    fuzzed.fresh()
    d = fuzzed.driver
    commands = data.draw(st.lists(_command(fuzzed.data), min_size=1, max_size=12))
    fuzzed.memory.write(fuzzed.data, os.urandom(64 * 1024))
    pages = [fuzzed.data + 4096 * p for p in range(16, 528)]  # a list in the first page
    fuzzed.memory.write(fuzzed.data, struct.pack("<512Q", *pages))
    writable = bytearray(SIZE)  # 1 where a valid write may have put other bytes
    for qid, opcode, flags, nsid, prp1, prp2, cdw in commands:
        cid = d.submit(qid, opcode, nsid=nsid, prp1=prp1, prp2=prp2, cdw=tuple(cdw),
                       flags=flags)
        (entry,) = d.wait(qid)
        assert entry.cid == cid and entry.sqid == qid
        assert entry.status in _STATUSES, (opcode, hex(entry.status))
        if qid == 1 and entry.status == 0:
            span = _write_range(opcode, nsid, flags, cdw)
            writable[span.start : span.stop] = b"\1" * len(span)
    assert fuzzed.dev.io_in_flight == 0
    content = fuzzed.path.read_bytes()
    assert len(content) == SIZE
    for i in range(0, SIZE, 4096):  # unchanged, written by a valid write, or zeroed
        chunk, was = content[i : i + 4096], ORIGINAL[i : i + 4096]
        if chunk != was:
            assert all(a == b or writable[i + k] or a == 0
                       for k, (a, b) in enumerate(zip(chunk, was)))
    buf = d.alloc(4096)
    assert d.admin(spec.ADMIN_IDENTIFY, prp1=buf, cdw=(1,)).status == 0
    assert d.command(1, spec.IO_READ, prp1=buf, cdw=(0, 0, 7)).status == 0
    assert fuzzed.memory.read(buf, 4096) == fuzzed.path.read_bytes()[:4096]
    assert not fuzzed.errors.records


# ---- PRP lists ----

PRP_RAM = 2 * MiB
#: Every dword of the PRP tests' RAM holds its own address.
PRP_CONTENT = struct.pack(f"<{PRP_RAM // 4}I", *range(0, PRP_RAM, 4))


def _reference(memory: bytes, prp1: int, prp2: int, length: int) -> bytes | None:
    """What the PRPs name, the long way round; None when they are invalid."""
    first = min(length, 4096 - prp1 % 4096)
    pages = [(prp1, first)]
    rest = length - first
    if rest and rest <= 4096:
        if prp2 % 4096:
            return None
        pages.append((prp2, rest))
    elif rest:
        wanted, pointer = -(-rest // 4096), prp2
        while wanted:
            slots = (4096 - pointer % 4096) // 8
            count = min(slots, wanted)
            if pointer + 8 * count > len(memory):
                return None
            entries = struct.unpack_from(f"<{count}Q", memory, pointer)
            if wanted > slots:
                *entries, pointer = entries
                if pointer % 4096:
                    return None
            for entry in entries:
                if entry % 4096:
                    return None
                pages.append((entry, min(4096, rest)))
                rest -= min(4096, rest)
            wanted -= len(entries)
    if any(address + size > len(memory) for address, size in pages):
        return None
    return b"".join(memory[address : address + size] for address, size in pages)


@settings(max_examples=300, deadline=None)
@given(prp1=st.integers(0, PRP_RAM + 8192).map(lambda a: a & ~3),
       prp2=st.one_of(st.integers(0, PRP_RAM).map(lambda a: a & ~7),
                      st.integers(0, PRP_RAM // 4096).map(lambda p: p * 4096)),
       length=st.integers(1, 2 * MiB),
       entries=st.lists(st.one_of(st.integers(0, PRP_RAM // 4096).map(lambda p: p * 4096),
                                  st.integers(0, 2**64 - 1)), max_size=600))
def test_prp_lists_match_a_reference(prp1: int, prp2: int, length: int,
                                     entries: list[int]) -> None:
    _check_prps(prp1, prp2, length, entries)


@st.composite
def _page_runs(draw: st.DrawFn) -> tuple[int, int, int, list[int]]:
    """PRPs naming one run of pages (what a large buffer gives: the one-view path),
    the first page touching the run or not, the run maybe leaving guest RAM or broken
    by a last entry of any value."""
    start = draw(st.integers(0, PRP_RAM // 4096 + 2))
    pages = draw(st.integers(1, 520))
    entries = [(start + i) * 4096 for i in range(pages)]
    if draw(st.booleans()):
        entries[draw(st.integers(0, pages - 1))] = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.integers(0, 1023)) * 4
    touching = draw(st.booleans())
    prp1 = ((start - 1) * 4096 if touching and start else draw(
        st.integers(0, PRP_RAM // 4096)) * 4096) + offset
    length = draw(st.integers(4096 - offset + 1, 4096 - offset + pages * 4096))
    prp2 = draw(st.one_of(st.integers(0, PRP_RAM // 8 - 1).map(lambda e: e * 8),
                          st.integers(0, PRP_RAM // 4096 - 1).map(lambda p: p * 4096)))
    return prp1, prp2, length, entries


@settings(max_examples=300, deadline=None)
@given(_page_runs())
def test_prp_runs_of_pages_match_a_reference(prps: tuple[int, int, int, list[int]]) -> None:
    _check_prps(*prps)


def _check_prps(prp1: int, prp2: int, length: int, entries: list[int]) -> None:
    raw = bytearray(PRP_CONTENT)
    table = struct.pack(f"<{len(entries)}Q", *entries)
    if prp2 + len(table) <= PRP_RAM:
        raw[prp2 : prp2 + len(table)] = table
    expected = _reference(bytes(raw), prp1, prp2, length)
    memory = GuestMemory(PRP_RAM)
    try:
        memory.write(0, bytes(raw))
        try:
            views = prp_views(GuestDma(memory), prp1, prp2, length)
        except PrpError as e:
            assert e.status in (spec.INVALID_PRP_OFFSET, spec.DATA_TRANSFER_ERROR)
            assert expected is None
            return
        assert b"".join(bytes(v) for v in views) == expected
    finally:
        memory.close()
