# SPDX-License-Identifier: BSD-2-Clause
"""The NVMe controller driven from the guest's side on a fake machine: real guest RAM
(a memfd), a real image file, the I/O thread running, the block back end's workers."""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fakes import FakeVm, cfg_read, cfg_write
from hvf.cli import main
from hvf.errors import ConfigError, ImageError
from hvf.memory import GuestMemory, MiB
from hvf.plugins.nvme import factory, identify, options, spec
from hvf.plugins.nvme.controller import MSIX_TABLE
from hvf.plugins.nvme.spec import Command
from hvf.plugins.nvme.testing import NvmeDriver
from hvf.plugins.pci.bus import PciBus

BDF = (0, 5, 0)
SIZE = 4 * MiB
BLOCKS = SIZE // 512


class Rig:
    """A controller on a fake machine, its driver enabled, I/O queue pair 1 created."""

    def __init__(self, path: Path, *, queue: int = 64, **config: str) -> None:
        self.memory = GuestMemory(64 * MiB)
        self.vm = FakeVm(memory=self.memory)
        bus = PciBus()
        self.vm.attach(bus)
        self.dev = factory.create(vm=self.vm, slot=BDF, config={"path": str(path), **config})
        bus.add(BDF, self.dev)
        bus.assign_resources(enable_decoding=True)
        self.vm.loop.start()
        self.driver = NvmeDriver(self.vm, self.memory, BDF,
                                 vector_fd=lambda v: self.dev.msix.vectors[v].fd)
        self.driver.enable()
        if queue:
            self.driver.create_queue_pair(1, queue)

    def admin(self, opcode: int, **fields: object) -> spec.Command | object:
        return self.driver.admin(opcode, **fields)

    def io(self, opcode: int, **fields: object) -> int:
        """One I/O command on queue 1: its status."""
        return self.driver.command(1, opcode, **fields).status

    def transfer(self, opcode: int, lba: int, gpa: int, length: int, cdw12: int = 0) -> int:
        prp1, prp2 = self.driver.prps(gpa, length)
        return self.io(opcode, prp1=prp1, prp2=prp2,
                       cdw=(lba & 0xFFFF_FFFF, lba >> 32, cdw12 | (length // 512 - 1)))

    def identify(self, cns: int, nsid: int = 0) -> tuple[int, bytes]:
        buf = self.driver.alloc(4096)
        entry = self.driver.admin(spec.ADMIN_IDENTIFY, nsid=nsid, prp1=buf, cdw=(cns,))
        return entry.status, self.memory.read(buf, 4096)

    def close(self) -> None:
        self.vm.loop.stop()
        self.dev.close()
        self.memory.close()


@contextmanager
def rig(path: Path, **config: object) -> Iterator[Rig]:
    r = Rig(path, **config)  # type: ignore[arg-type]
    try:
        yield r
    finally:
        r.close()


@functools.cache
def pattern(size: int, seed: int = 0) -> bytes:
    block = bytes((i * 7 + seed) & 0xFF for i in range(4093))  # no period of a power of 2
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(SIZE))
    return path


def test_pci_function_and_registers(image: Path) -> None:
    with rig(image, queue=0, qsz="256", maxq="4") as r:
        vm = r.vm
        assert cfg_read(vm, BDF, 0, 4) == identify.DEVICE_ID << 16 | identify.VENDOR_ID
        assert cfg_read(vm, BDF, 0x08, 4) >> 8 == 0x010802
        assert cfg_read(vm, BDF, 0x10, 4) & 0x7 == 0x4  # memory, 64-bit
        assert cfg_read(vm, BDF, 0x3D, 1) == 1  # INTA
        cap = r.driver.read(spec.REG_CAP, 8)
        assert cap & 0xFFFF == 255 and cap >> 16 & 1 and cap >> 24 & 0xFF == 60
        assert cap >> 37 & 1 and cap >> 32 & 0xF == 0 and cap >> 48 & 0xFF == 0
        assert r.driver.read(spec.REG_CAP + 4) == cap >> 32
        assert r.driver.read(spec.REG_VS) == 0x10400
        msix = next(p for p in _capabilities(vm) if cfg_read(vm, BDF, p, 1) == 0x11)
        assert cfg_read(vm, BDF, msix + 2, 2) & 0x7FF == 4  # maxq + 1 vectors
        assert cfg_read(vm, BDF, msix + 4, 4) == MSIX_TABLE  # BAR 0
        r.driver.write(spec.REG_AQA, 0xFFFF_FFFF)
        assert r.driver.read(spec.REG_AQA) == 0x0FFF_0FFF
        r.driver.write(spec.REG_CC, 0x123, size=2)  # not a dword: ignored
        assert r.driver.read(spec.REG_CC) & 0xFFF != 0x123


def _capabilities(vm: FakeVm) -> Iterator[int]:
    pointer = cfg_read(vm, BDF, 0x34, 1)
    while pointer:
        yield pointer
        pointer = cfg_read(vm, BDF, pointer + 1, 1)


def test_identify(image: Path) -> None:
    with rig(image, ser="DISK-7", eui64="0x0123456789abcdef", sectsz="4096") as r:
        status, data = r.identify(spec.CNS_CONTROLLER)
        assert status == 0
        assert data[4:24] == b"DISK-7".ljust(20) and data[24:32] == b"hvf-NVMe"
        assert data[77] == identify.MDTS and struct.unpack_from("<I", data, 80)[0] == 0x10400
        assert data[512] == 0x66 and data[513] == 0x44
        assert struct.unpack_from("<I", data, 516)[0] == 1  # one namespace
        oncs = struct.unpack_from("<H", data, 520)[0]
        assert oncs & identify.ONCS_DSM and oncs & identify.ONCS_WRITE_ZEROES
        assert data[525] == identify.VWC_PRESENT_AND_FLUSH_ALL
        assert struct.unpack_from("<H", data, 256)[0] & identify.OACS_DOORBELL_BUFFER
        status, data = r.identify(spec.CNS_NAMESPACE, nsid=1)
        assert status == 0
        assert struct.unpack_from("<QQQ", data, 0) == (SIZE // 4096,) * 3
        assert data[128 + 2] == 12  # LBA format 0: 4096-byte blocks
        assert data[120:128] == bytes.fromhex("0123456789abcdef")
        status, data = r.identify(spec.CNS_ACTIVE_NAMESPACES)
        assert (status, struct.unpack_from("<II", data)) == (0, (1, 0))
        assert r.identify(spec.CNS_ACTIVE_NAMESPACES, nsid=1)[1] == bytes(4096)
        status, data = r.identify(spec.CNS_DESCRIPTORS, nsid=1)
        assert data[:12] == bytes([1, 8, 0, 0]) + bytes.fromhex("0123456789abcdef")
        assert r.identify(spec.CNS_NAMESPACE, nsid=2)[0] == spec.INVALID_NAMESPACE
        assert r.identify(spec.CNS_NAMESPACE, nsid=spec.NSID_ALL)[0] == spec.INVALID_NAMESPACE
        assert r.identify(0x13)[0] == spec.INVALID_FIELD


def test_read_only_namespace_and_dsm_disabled(image: Path) -> None:
    with rig(image, ro="true") as r:
        _, data = r.identify(spec.CNS_CONTROLLER)
        assert not struct.unpack_from("<H", data, 520)[0] & identify.ONCS_DSM
        assert r.identify(spec.CNS_NAMESPACE, nsid=1)[1][99] == identify.NSATTR_WRITE_PROTECTED
        buf = r.driver.alloc(4096)
        assert r.transfer(spec.IO_WRITE, 0, buf, 4096) == spec.NAMESPACE_WRITE_PROTECTED
        assert r.io(spec.IO_WRITE_ZEROES, cdw=(0, 0, 7)) == spec.NAMESPACE_WRITE_PROTECTED
        assert r.io(spec.IO_DSM, prp1=buf, cdw=(0, spec.DSM_DEALLOCATE)) == spec.INVALID_OPCODE
        assert r.transfer(spec.IO_READ, 0, buf, 4096) == 0
        assert r.io(spec.IO_FLUSH) == 0
    assert image.read_bytes() == pattern(SIZE)
    with pytest.raises(ConfigError, match="dsm=enable needs a writable image"):
        factory.create(vm=FakeVm(), slot=BDF, config={"path": str(image), "ro": "true",
                                                      "dsm": "enable"})


def test_read_write_flush_through_prp_lists(image: Path) -> None:
    with rig(image) as r:
        mem, size = r.memory, 1 * MiB
        out = r.driver.alloc(size)
        mem.write(out, pattern(size, 3))
        assert r.transfer(spec.IO_WRITE, 16, out, size) == 0
        assert r.io(spec.IO_FLUSH) == 0
        assert r.io(spec.IO_FLUSH, nsid=spec.NSID_ALL) == 0
        assert image.read_bytes()[16 * 512 : 16 * 512 + size] == pattern(size, 3)
        back = r.driver.alloc(size + 4096) + 0x204  # PRP1 at an offset in its page
        assert r.transfer(spec.IO_READ, 16, back, size) == 0
        assert mem.read(back, size) == pattern(size, 3)
        two = r.driver.alloc(8192) + 0x800  # PRP1 and PRP2 (no list)
        assert r.transfer(spec.IO_READ, 0, two, 4096) == 0
        assert mem.read(two, 4096) == pattern(SIZE)[:4096]
        stats = r.dev.stats()
        assert stats["block_flushes"] == 2 and stats["block_bytes_written"] == size


def test_largest_transfer_chains_prp_lists(image: Path) -> None:
    with rig(image) as r:
        size = identify.MAX_TRANSFER
        buf = r.driver.alloc(size + 4096) + 0x100  # 513 pages: the list chains
        assert r.transfer(spec.IO_READ, 0, buf, size) == 0
        assert r.memory.read(buf, size) == pattern(SIZE)[:size]
        assert r.transfer(spec.IO_READ, 0, buf, size + 512) == spec.INVALID_FIELD  # > MDTS


def test_fua_and_write_cache_off_flush(image: Path) -> None:
    with rig(image) as r:
        buf = r.driver.alloc(4096)
        assert r.transfer(spec.IO_WRITE, 0, buf, 4096, cdw12=spec.RW_FUA) == 0
        assert r.dev.stats()["block_flushes"] == 1
        assert r.admin(spec.ADMIN_SET_FEATURES, cdw=(spec.FEAT_VOLATILE_WRITE_CACHE, 0)).status == 0
        assert r.transfer(spec.IO_WRITE, 8, buf, 4096) == 0
        assert r.dev.stats()["block_flushes"] == 2
    with rig(image, direct="true") as r:  # O_SYNC: no volatile cache to flush
        assert r.identify(spec.CNS_CONTROLLER)[1][525] == 0
        entry = r.admin(spec.ADMIN_SET_FEATURES, cdw=(spec.FEAT_VOLATILE_WRITE_CACHE, 1))
        assert entry.status == spec.INVALID_FIELD


def test_dsm_deallocate_punches_holes_and_write_zeroes(image: Path) -> None:
    with rig(image) as r:
        before = os.stat(image).st_blocks
        ranges = r.driver.alloc(4096)
        r.memory.write(ranges, struct.pack("<IIQIIQ", 0, 2048, 0, 0, 0, 4096))
        assert r.io(spec.IO_DSM, prp1=ranges, cdw=(1, spec.DSM_DEALLOCATE)) == 0
        if os.stat(image).st_blocks >= before:
            pytest.skip("the file system cannot punch holes")
        with image.open("rb") as f:
            assert os.lseek(f.fileno(), 0, os.SEEK_DATA) >= MiB
        assert r.io(spec.IO_DSM, prp1=ranges, cdw=(0, 0)) == 0  # hints only
        r.memory.write(ranges, struct.pack("<IIQ", 0, 8, BLOCKS - 4))
        assert r.io(spec.IO_DSM, prp1=ranges, cdw=(0, spec.DSM_DEALLOCATE)) == spec.LBA_OUT_OF_RANGE
        assert r.io(spec.IO_WRITE_ZEROES, cdw=(4096, 0, 15)) == 0
        assert r.io(spec.IO_WRITE_ZEROES, cdw=(6000, 0, spec.WZ_DEAC | 7)) == 0
        content = image.read_bytes()
        assert content[:MiB] == bytes(MiB) and len(content) == SIZE
        assert content[4096 * 512 : 4112 * 512] == bytes(16 * 512)
        assert content[6000 * 512 : 6008 * 512] == bytes(8 * 512)
        assert content[MiB : 4096 * 512] == pattern(SIZE)[MiB : 4096 * 512]
    with rig(image, dsm="disable") as r:
        buf = r.driver.alloc(4096)
        assert r.io(spec.IO_DSM, prp1=buf, cdw=(0, spec.DSM_DEALLOCATE)) == spec.INVALID_OPCODE


OUTSIDE = 1 << 45


@pytest.mark.parametrize("case, status", [
    ("unknown opcode", spec.INVALID_OPCODE),
    ("fused", spec.INVALID_FIELD),
    ("namespace 2", spec.INVALID_NAMESPACE),
    ("broadcast read", spec.INVALID_NAMESPACE),
    ("past the end", spec.LBA_OUT_OF_RANGE),
    ("straddles the end", spec.LBA_OUT_OF_RANGE),
    ("huge lba", spec.LBA_OUT_OF_RANGE),
    ("beyond mdts", spec.INVALID_FIELD),
    ("prp1 not dword aligned", spec.INVALID_PRP_OFFSET),
    ("prp2 with an offset", spec.INVALID_PRP_OFFSET),
    ("prp1 outside ram", spec.DATA_TRANSFER_ERROR),
    ("prp list outside ram", spec.DATA_TRANSFER_ERROR),
    ("prp list entry with an offset", spec.INVALID_PRP_OFFSET),
    ("write zeroes past the end", spec.LBA_OUT_OF_RANGE),
])
def test_hostile_io_commands(image: Path, case: str, status: int) -> None:
    with rig(image) as r:
        buf = r.driver.alloc(3 * 4096)
        bad_list = r.driver.alloc(4096)
        r.memory.write(bad_list, struct.pack("<QQ", buf + 4096, buf + 0x2010))
        read = (spec.IO_READ, {"prp1": buf})
        commands = {
            "unknown opcode": (0x7F, {}),
            "fused": (spec.IO_READ, {"prp1": buf, "flags": 1}),
            "namespace 2": (spec.IO_READ, {"prp1": buf, "nsid": 2}),
            "broadcast read": (spec.IO_READ, {"prp1": buf, "nsid": spec.NSID_ALL}),
            "past the end": (*read, (BLOCKS, 0, 0)),
            "straddles the end": (*read, (BLOCKS - 1, 0, 1)),
            "huge lba": (*read, (0xFFFF_FFFF, 0xFFFF_FFFF, 0)),
            "beyond mdts": (*read, (0, 0, 0xFFFF)),
            "prp1 not dword aligned": (spec.IO_READ, {"prp1": buf + 2}),
            "prp2 with an offset": (spec.IO_READ, {"prp1": buf, "prp2": buf + 4097},
                                    (0, 0, 15)),
            "prp1 outside ram": (spec.IO_READ, {"prp1": OUTSIDE}),
            "prp list outside ram": (spec.IO_READ, {"prp1": buf, "prp2": OUTSIDE}, (0, 0, 23)),
            "prp list entry with an offset": (spec.IO_READ, {"prp1": buf, "prp2": bad_list},
                                              (0, 0, 23)),
            "write zeroes past the end": (spec.IO_WRITE_ZEROES, {}, (BLOCKS - 2, 0, 3)),
        }
        opcode, fields, *cdw = commands[case]
        entry = r.driver.command(1, opcode, cdw=cdw[0] if cdw else (0, 0, 0), **fields)
        assert entry.status == status
        assert r.dev.io_in_flight == 0
        assert r.transfer(spec.IO_READ, 0, buf, 4096) == 0  # and it carries on
    assert image.read_bytes() == pattern(SIZE)


def test_queue_management_errors(image: Path) -> None:
    with rig(image, maxq="2", qsz="128") as r:
        d, ring = r.driver, r.driver.alloc(64 * 64)

        def create_cq(qid: int, size: int, flags: int = 1, prp1: int = ring) -> int:
            return d.admin(spec.ADMIN_CREATE_CQ, prp1=prp1,
                           cdw=((size - 1) << 16 | qid, flags)).status

        def create_sq(qid: int, cqid: int, size: int = 16, prp1: int = ring) -> int:
            return d.admin(spec.ADMIN_CREATE_SQ, prp1=prp1,
                           cdw=((size - 1) << 16 | qid, cqid << 16 | 1)).status

        assert create_cq(0, 16) == spec.INVALID_QUEUE_IDENTIFIER
        assert create_cq(1, 16) == spec.INVALID_QUEUE_IDENTIFIER  # exists
        assert create_cq(3, 16) == spec.INVALID_QUEUE_IDENTIFIER  # maxq 2
        assert create_cq(2, 1) == spec.INVALID_QUEUE_SIZE
        assert create_cq(2, 129) == spec.INVALID_QUEUE_SIZE
        assert create_cq(2, 16, flags=0) == spec.INVALID_FIELD  # not contiguous
        assert create_cq(2, 16, flags=3 | 3 << 16) == spec.INVALID_INTERRUPT_VECTOR
        assert create_cq(2, 16, prp1=ring + 512) == spec.INVALID_PRP_OFFSET
        assert create_cq(2, 16, prp1=OUTSIDE) == spec.INVALID_FIELD
        assert create_sq(2, 2) == spec.COMPLETION_QUEUE_INVALID
        assert create_sq(2, 0) == spec.COMPLETION_QUEUE_INVALID
        assert create_sq(1, 1) == spec.INVALID_QUEUE_IDENTIFIER
        assert create_sq(2, 1, size=4096) == spec.INVALID_QUEUE_SIZE
        end = r.memory.size - 4096
        assert create_sq(2, 1, size=128, prp1=end) == spec.INVALID_FIELD  # runs off RAM
        assert create_sq(2, 1) == 0  # two SQs on CQ 1
        delete = {"sq": spec.ADMIN_DELETE_SQ, "cq": spec.ADMIN_DELETE_CQ}
        assert d.admin(delete["cq"], cdw=(1,)).status == spec.INVALID_QUEUE_DELETION
        assert d.admin(delete["cq"], cdw=(0,)).status == spec.INVALID_QUEUE_IDENTIFIER
        assert d.admin(delete["sq"], cdw=(0,)).status == spec.INVALID_QUEUE_IDENTIFIER
        assert d.admin(delete["sq"], cdw=(2,)).status == 0
        assert d.admin(delete["sq"], cdw=(2,)).status == spec.INVALID_QUEUE_IDENTIFIER
        assert d.admin(delete["sq"], cdw=(1,)).status == 0
        assert d.admin(delete["cq"], cdw=(1,)).status == 0
        assert d.admin(delete["cq"], cdw=(1,)).status == spec.INVALID_QUEUE_IDENTIFIER
        assert d.admin(0x7F).status == spec.INVALID_OPCODE
        assert d.admin(spec.ADMIN_IDENTIFY, flags=0x40, cdw=(1,)).status == spec.INVALID_FIELD
        assert d.admin(spec.ADMIN_FIRMWARE_COMMIT).status == spec.INVALID_FIRMWARE_SLOT
        assert d.admin(spec.ADMIN_ABORT, cdw=(1 << 16,)).dw0 == 1  # not aborted


def test_delete_sq_aborts_commands_in_flight(image: Path) -> None:
    with rig(image) as r:
        dev = r.dev
        sq, buf = dev.sqs[1], r.driver.alloc(4096)
        with dev.lock:  # commands started, their completions held back by the lock
            for cid in (7, 8):
                assert dev.nvm.execute(sq, Command(spec.IO_READ, 0, cid, 1, 0, buf, 0,
                                                   0, 0, 0, 0, 0, 0)) is None
            assert dev.admin.execute(Command(spec.ADMIN_DELETE_SQ, 0, 99, 0, 0, 0, 0,
                                             1, 0, 0, 0, 0, 0)) is None
        aborted = r.driver.wait(1, 2)
        assert {(e.cid, e.status) for e in aborted} == {(7, spec.ABORTED_SQ_DELETION),
                                                         (8, spec.ABORTED_SQ_DELETION)}
        (done,) = r.driver.wait(0)
        assert (done.cid, done.status) == (99, 0) and 1 not in dev.sqs
        assert dev.cqs[1].sqs == 0


def test_features(image: Path) -> None:
    with rig(image, queue=0, maxq="4") as r:
        d = r.driver

        def get(fid: int, cdw11: int = 0, select: int = 0) -> tuple[int, int]:
            e = d.admin(spec.ADMIN_GET_FEATURES, cdw=(select << 8 | fid, cdw11))
            return e.status, e.dw0

        def set_(fid: int, cdw11: int, save: bool = False) -> tuple[int, int]:
            e = d.admin(spec.ADMIN_SET_FEATURES, cdw=(fid | (spec.SET_SAVE if save else 0), cdw11))
            return e.status, e.dw0

        assert get(spec.FEAT_NUMBER_OF_QUEUES) == (0, 3 | 3 << 16)
        assert set_(spec.FEAT_NUMBER_OF_QUEUES, 63 | 1 << 16) == (0, 3 | 1 << 16)
        assert set_(spec.FEAT_NUMBER_OF_QUEUES, 0xFFFF)[0] == spec.INVALID_FIELD
        for fid, value in ((spec.FEAT_ARBITRATION, 0x0302_0103), (spec.FEAT_POWER_MANAGEMENT, 0x20),
                           (spec.FEAT_ERROR_RECOVERY, 100), (spec.FEAT_INTERRUPT_COALESCING, 0x0A08),
                           (spec.FEAT_WRITE_ATOMICITY, 1), (spec.FEAT_ASYNC_EVENT_CONFIG, 0x102),
                           (spec.FEAT_VOLATILE_WRITE_CACHE, 0)):
            assert set_(fid, value) == (0, 0)
            assert get(fid) == (0, value)
        assert get(spec.FEAT_VOLATILE_WRITE_CACHE, select=spec.SEL_DEFAULT) == (0, 1)
        assert get(spec.FEAT_ERROR_RECOVERY, select=spec.SEL_CAPABILITIES) == (0, 0x6)
        assert set_(spec.FEAT_POWER_MANAGEMENT, 1)[0] == spec.INVALID_FIELD
        assert set_(spec.FEAT_ERROR_RECOVERY, 1 << 16)[0] == spec.INVALID_FIELD
        assert set_(spec.FEAT_INTERRUPT_VECTOR_CONFIG, 5)[0] == spec.INVALID_FIELD
        assert set_(spec.FEAT_INTERRUPT_VECTOR_CONFIG, 2 | 1 << 16) == (0, 0)
        assert get(spec.FEAT_INTERRUPT_VECTOR_CONFIG, 2) == (0, 2 | 1 << 16)
        assert set_(spec.FEAT_TEMPERATURE_THRESHOLD, 1 << 16 | 300)[0] == spec.INVALID_FIELD
        assert set_(spec.FEAT_ARBITRATION, 0, save=True)[0] == spec.FEATURE_NOT_SAVEABLE
        assert get(0x0C)[0] == spec.INVALID_FIELD and set_(0x80, 0)[0] == spec.INVALID_FIELD
        assert get(spec.FEAT_TEMPERATURE_THRESHOLD) == (0, identify.WARNING_TEMP)
        # A threshold below the sensor's 296 K: the SMART warning, and its event.
        aer = d.submit(0, spec.ADMIN_ASYNC_EVENT)
        setting = d.submit(0, spec.ADMIN_SET_FEATURES, cdw=(spec.FEAT_TEMPERATURE_THRESHOLD, 290))
        done = {e.cid: e for e in d.wait(0, 2)}
        assert done[setting].status == 0
        assert done[aer].dw0 == spec.event(spec.EVENT_SMART, spec.EVENT_TEMPERATURE, spec.LOG_SMART)
        log = d.alloc(4096)
        assert d.admin(spec.ADMIN_GET_LOG_PAGE, prp1=log, cdw=(127 << 16 | spec.LOG_SMART,)).status == 0
        assert r.memory.read(log, 1)[0] == spec.WARNING_TEMPERATURE
        d.create_queue_pair(1, 16)
        assert set_(spec.FEAT_NUMBER_OF_QUEUES, 0)[0] == spec.COMMAND_SEQUENCE_ERROR
        d.create_queue_pair(2, 16)
        entry = d.admin(spec.ADMIN_CREATE_CQ, prp1=d.alloc(4096), cdw=(15 << 16 | 3, 1))
        assert entry.status == spec.INVALID_QUEUE_IDENTIFIER  # only 2 allocated


def test_log_pages_and_async_events(image: Path) -> None:
    with rig(image) as r:
        d, buf = r.driver, r.driver.alloc(8192)
        for _ in range(3):
            assert r.transfer(spec.IO_READ, 0, buf, 4096) == 0

        def log(lid: int, dwords: int = 128, offset: int = 0) -> tuple[int, bytes]:
            e = d.admin(spec.ADMIN_GET_LOG_PAGE, prp1=buf,
                        cdw=((dwords - 1) << 16 | lid, 0, offset))
            return e.status, r.memory.read(buf, dwords * 4)

        status, smart = log(spec.LOG_SMART)
        assert status == 0 and struct.unpack_from("<HBB", smart, 1) == (identify.TEMPERATURE, 100, 10)
        assert int.from_bytes(smart[64:80], "little") == 3  # host read commands
        assert int.from_bytes(smart[32:48], "little") == 1  # 12 KiB: one unit
        assert int.from_bytes(smart[112:128], "little") == 1  # power cycles
        status, firmware = log(spec.LOG_FIRMWARE_SLOT)
        assert firmware[0] == 1 and firmware[8:16] == b"1.0".ljust(8)
        assert log(spec.LOG_ERROR, 16) == (0, bytes(64))
        assert log(spec.LOG_SMART, 2, 4)[1] == smart[4:12]
        assert log(spec.LOG_SMART, 1, 512)[0] == spec.INVALID_FIELD
        assert log(spec.LOG_SMART, 1, 2)[0] == spec.INVALID_FIELD
        assert log(0x05)[0] == spec.INVALID_LOG_PAGE
        # Four requests are held; a fifth is refused.
        held = [d.submit(0, spec.ADMIN_ASYNC_EVENT) for _ in range(identify.ASYNC_EVENT_LIMIT)]
        extra = d.submit(0, spec.ADMIN_ASYNC_EVENT)
        (refused,) = d.wait(0, 1)
        assert (refused.cid, refused.status) == (extra, spec.ASYNC_EVENT_LIMIT_EXCEEDED)
        # A doorbell of no queue and a value beyond a queue's size are error events,
        # reported once until the error log is read.
        d.write(spec.DOORBELLS + 8 * 9, 1)
        d.write(spec.DOORBELLS + 8 * 1, 1000)
        (first,) = d.wait(0)
        assert first.cid == held[0] and first.dw0 == spec.event(0, 0, spec.LOG_ERROR)
        assert d.poll(0) is None
        # Reading the error log clears the mask: the second event is reported.
        reading = d.submit(0, spec.ADMIN_GET_LOG_PAGE, prp1=buf, cdw=(15 << 16 | spec.LOG_ERROR,))
        done = {e.cid: e for e in d.wait(0, 2)}
        assert done[reading].status == 0
        assert done[held[1]].dw0 == spec.event(0, 1, spec.LOG_ERROR)


def test_completion_queue_full_and_ioslots(image: Path) -> None:
    with rig(image, queue=0, ioslots="1") as r:
        d, dev = r.driver, r.dev
        d.create_queue_pair(1, 16, cq_size=4)  # room for 3 completions
        d.create_queue_pair(2, 16)
        buf = d.alloc(4096)
        for qid in (1, 2):  # one back-end slot: each waits for the one before
            for lba in range(3):
                d.submit(qid, spec.IO_READ, prp1=buf, cdw=(lba, 0, 0))
        assert len(d.wait(2, 3)) == 3 and len(d.wait(1, 3)) == 3
        # Completions the host does not consume: the fourth waits, the fifth is not
        # even taken from the submission queue until there is room.
        for lba in range(5):
            d.submit(1, spec.IO_READ, prp1=buf, cdw=(lba, 0, 0), ring=False)
        d.ring(1)
        # (the back end posts the held completion, then retires the command)
        _wait_for(lambda: len(dev.cqs[1].pending) == 1 and dev.io_in_flight == 0)
        assert dev.sqs[1].head == 7
        entries = d.wait(1, 5)
        assert [e.sq_head for e in entries] == [4, 5, 6, 7, 8]
        assert [e.status for e in entries] == [0] * 5


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_msix_and_intx(image: Path) -> None:
    with rig(image, queue=0) as r:
        d, dev, vm = r.driver, r.dev, r.vm
        buf = d.alloc(4096)
        # INTx while MSI-X is off: the admin queue holds an unread completion.
        d.submit(0, spec.ADMIN_IDENTIFY, prp1=buf, cdw=(1,))
        _wait_for(lambda: dev.intx_level)
        assert d.poll(0) is not None and not dev.intx_level
        d.write(spec.REG_INTMS, 1)
        d.submit(0, spec.ADMIN_IDENTIFY, prp1=buf, cdw=(1,))
        _wait_for(lambda: dev.cqs[0].unread)
        assert not dev.intx_level
        d.write(spec.REG_INTMC, 1)
        assert dev.intx_level
        d.wait(0)
        # MSI-X: vector 1 for I/O queue 1, through its irqfd.
        msix = next(p for p in _capabilities(vm) if cfg_read(vm, BDF, p, 1) == 0x11)
        cfg_write(vm, BDF, msix + 2, 2, 1 << 15)
        for offset, value in ((0, 0xFEE0_0000), (4, 0), (8, 0x41), (12, 0)):
            d.write(MSIX_TABLE + 16 + offset, value)
        d.create_queue_pair(1, 16, vector=1)
        vector = dev.msix.vectors[1]
        assert vm.vmfd.irqfds[vector.fd] == vector.gsi
        assert r.transfer(spec.IO_READ, 0, buf, 4096) == 0
        assert vector.take_pending() and dev.stats()["msix_interrupts"] >= 1
        assert not dev.intx_level


def test_doorbell_buffers_bind_ioeventfds(image: Path) -> None:
    with rig(image) as r:
        d, dev, vm = r.driver, r.dev, r.vm
        page = d.alloc(4096)
        for prp1, prp2 in ((page + 8, page), (OUTSIDE, page), (page, 0)):
            entry = d.admin(spec.ADMIN_DOORBELL_BUFFER_CONFIG, prp1=prp1, prp2=prp2)
            assert entry.status == spec.INVALID_FIELD
        assert d.use_doorbell_buffers() == 0
        assert r.memory.read_u32(d.shadow) == d.queues[0].tail  # the admin queue's, copied
        bound = {addr for addr, _length in vm.vmfd.ioeventfds.values()}
        assert bound == {d.bar + spec.DOORBELLS + 8, d.bar + spec.DOORBELLS + 12}
        # The I/O queue's tail and head are in the shadow page; the register is written
        # (in KVM: the ioeventfd signalled) only when EventIdx asks for it.
        buf, exits = d.alloc(4096), dev.doorbell_exits
        for burst in range(20):
            for lba in range(3):
                d.submit(1, spec.IO_READ, prp1=buf, cdw=(burst * 3 + lba, 0, 0))
            assert [e.status for e in d.wait(1, 3)] == [0] * 3
        assert r.memory.read_u32(d.eventidx + 8) == d.queues[1].tail
        assert dev.doorbell_exits - exits < 120  # fewer than one per doorbell update
        d.create_queue_pair(2, 16)
        assert len(vm.vmfd.ioeventfds) == 4
        d.write(spec.REG_CC, 0)  # reset: doorbell buffers go, ioeventfds unbound
        d.wait_ready(False)
        assert not vm.vmfd.ioeventfds and dev.buffers is None


def test_reset_and_shutdown(image: Path) -> None:
    with rig(image) as r:
        d, dev, buf = r.driver, r.dev, r.driver.alloc(MiB)
        for i in range(8):
            d.submit(1, spec.IO_WRITE, prp1=buf, prp2=d.prps(buf, 256 * 1024)[1],
                     cdw=(i * 512, 0, 511), ring=False)
        d.ring(1)
        d.write(spec.REG_CC, 0)  # reset with writes in flight
        d.wait_ready(False)
        assert dev.io_in_flight == 0 and not dev.sqs
        d.enable()
        assert 1 not in dev.sqs  # queues are gone after a reset
        d.create_queue_pair(1, 16)
        assert r.transfer(spec.IO_WRITE, 0, buf, 4096) == 0
        d.write(spec.REG_CC, d.read(spec.REG_CC) | 1 << 14)  # normal shutdown
        _wait_for(lambda: d.read(spec.REG_CSTS) >> 2 & 3 == spec.SHST_COMPLETE)
        assert dev.stats()["block_flushes"] >= 1
        assert d.read(spec.REG_CSTS) & spec.CSTS_RDY
        d.write(spec.REG_CC, 0)
        assert d.wait_ready(False) == 0
        d.write(spec.REG_CC, spec.CC_EN | 1 << 7)  # 8 KiB pages: not offered
        _wait_for(lambda: d.read(spec.REG_CSTS) & spec.CSTS_CFS)
        d.write(spec.REG_CC, 0)
        assert d.wait_ready(False) == 0
        d.write(spec.REG_ASQ, OUTSIDE, 8)
        d.write(spec.REG_CC, spec.CC_EN)
        assert d.read(spec.REG_CSTS) == spec.CSTS_CFS
        assert any("admin queues are not in guest RAM" in line for line in r.vm.logged)


def test_options() -> None:
    assert options.parse(["/vm/d.img", "maxq=4", "ro", "dsm=disable"]) == {
        "path": "/vm/d.img", "maxq": "4", "ro": "true", "dsm": "disable"}
    opts = options.read_options({"path": "/x", "device": "nvme"}, "nvme", BDF, "vm0")
    assert (opts.maxq, opts.qsz, opts.ioslots, opts.dsm) == (16, 2048, 8, "auto")
    assert opts.serial == b"NVME-5-0".ljust(20) and opts.bootindex is None
    assert opts.eui64 >> 40 == options.OUI_FREEBSD_NVME and opts.eui64 & 0xFFFF == 1
    assert opts.eui64 != options.read_options({"path": "/x"}, "nvme", BDF, "vm1").eui64
    sized = options.read_options({"path": "/x", "sectsz": "4096"}, "nvme", BDF, "vm0")
    assert sized.image.sectorsize is not None and sized.image.sectorsize.logical == 4096
    for key, value in (("maxq", "0"), ("maxq", "17"), ("qsz", "1"), ("qsz", "x"),
                       ("ioslots", "0"), ("sectsz", "1024"), ("dsm", "maybe"),
                       ("ser", "x" * 21), ("ser", "caf\u00e9"), ("eui64", "-1"),
                       ("bootindex", "first"), ("nonsense", "1"), ("ro", "perhaps")):
        with pytest.raises(ConfigError, match=key):
            options.read_options({"path": "/x", key: value}, "nvme@pci.0.5.0", BDF, "vm0")
    with pytest.raises(ConfigError, match="no disk image"):
        options.read_options({"device": "nvme"}, "nvme", BDF, "vm0")
    with pytest.raises(ConfigError, match="nvme"):
        options.parse([])


def test_image_errors(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(4096 + 512))
    with pytest.raises(ImageError, match="not a multiple of the 4096-byte"):
        factory.create(vm=FakeVm(), slot=BDF, config={"path": str(odd), "sectsz": "4096"})
    with pytest.raises(ImageError, match="no such file"):
        factory.create(vm=FakeVm(), slot=BDF, config={"path": str(tmp_path / "none")})
    with pytest.raises(ImageError, match="directory"):
        factory.create(vm=FakeVm(), slot=BDF, config={"path": str(tmp_path)})


def test_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status = main(["-s", "5,nvme,/vm/disk.img,maxq=4,qsz=256,ser=S1,dsm=enable,bootindex=1",
                   "-o", "config.dump=1", "vm0"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pci.")]
    assert status == 1
    assert lines == ["pci.0.5.0.bootindex=1", "pci.0.5.0.device=nvme", "pci.0.5.0.dsm=enable",
                     "pci.0.5.0.maxq=4", "pci.0.5.0.path=/vm/disk.img", "pci.0.5.0.qsz=256",
                     "pci.0.5.0.ser=S1"]
    toml = tmp_path / "vm.toml"
    toml.write_text('[pci.0.6.0]\ndevice = "nvme"\npath = "/vm/d.img"\nmaxq = 2\nro = true\n')
    assert main(["-k", str(toml), "-o", "config.dump=1", "vm0"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pci.")]
    assert lines == ["pci.0.6.0.device=nvme", "pci.0.6.0.maxq=2", "pci.0.6.0.path=/vm/d.img",
                     "pci.0.6.0.ro=true"]
    opts = options.read_options({"path": "/vm/d.img", "maxq": "2", "ro": "true"}, "nvme",
                                (0, 6, 0), "vm0")
    assert opts.maxq == 2 and opts.image.readonly
    with pytest.raises(ConfigError) as info:
        factory.create(vm=FakeVm(), slot=BDF, config={"path": str(tmp_path), "maxq": "99"})
    assert info.value.exit_status == 4


def test_boot_entries(image: Path) -> None:
    with rig(image, queue=0, bootindex="3") as r:
        (entry,) = r.dev.boot_entries()
        assert (entry.index, entry.path) == (3, "/pci@i0cf8/nvme@5/namespace@1,0")
    with rig(image, queue=0) as r:
        assert r.dev.boot_entries() == []
