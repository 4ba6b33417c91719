# SPDX-License-Identifier: BSD-2-Clause
"""The AHCI controller driven from the guest's side on a fake machine, with real image
files and guest RAM: registers, the command engine, ATA disks, reset and save/restore.
The guest-side model (:class:`Hba`) is shared with the other AHCI test modules."""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeVm, cfg_read, cfg_write, mmio_read, mmio_write
from hvf.errors import DeviceError, ImageError
from hvf.plugins.ahci import factory, spec
from hvf.plugins.pci.bus import PciBus

BDF = (0, 4, 0)
SIZE = 1 << 20
SECTORS = SIZE // 512
#: Guest RAM layout: each port's command list, FIS area and tables, then data buffers.
LIST_BASE = 0x0010_0000
PORT_AREA = 0x0004_0000
TABLE_STRIDE = 0x1000
DATA = 0x0100_0000


@functools.cache
def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ from sector to sector."""
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(size))


def h2d(command: int, *, lba: int = 0, count: int = 0, features: int = 0,
        device: int = 0x40, control: int = 0, c_bit: bool = True) -> bytes:
    """A register host-to-device FIS."""
    return bytes([
        spec.FIS_H2D, 0x80 if c_bit else 0, command, features & 0xFF,
        lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, device,
        lba >> 24 & 0xFF, lba >> 32 & 0xFF, lba >> 40 & 0xFF, features >> 8 & 0xFF,
        count & 0xFF, count >> 8 & 0xFF, 0, control, 0, 0, 0, 0])


class Hba:
    """An AHCI function on a fake machine, and a guest driver for it."""

    def __init__(self, config: dict[str, Any], emulation: str = "ahci") -> None:
        self.vm = FakeVm()
        bus = PciBus()
        self.vm.attach(bus)
        self.device = factory.build(emulation, BDF, config)
        bus.add(BDF, self.device)
        bus.assign_resources(enable_decoding=True)
        bar = self.device.bars[spec.ABAR_INDEX]
        assert bar is not None
        self.abar = bar.address
        self.memory = self.vm.memory

    # ---- registers ----

    def read(self, reg: int, size: int = 4) -> int:
        return mmio_read(self.vm, self.abar + reg, size)

    def write(self, reg: int, value: int, size: int = 4) -> None:
        mmio_write(self.vm, self.abar + reg, size, value)

    def port_read(self, port: int, reg: int) -> int:
        return self.read(spec.PORT_BASE + port * spec.PORT_STRIDE + reg)

    def port_write(self, port: int, reg: int, value: int) -> None:
        self.write(spec.PORT_BASE + port * spec.PORT_STRIDE + reg, value)

    # ---- guest memory layout ----

    @staticmethod
    def clb(port: int) -> int:
        return LIST_BASE + port * PORT_AREA

    @classmethod
    def fb(cls, port: int) -> int:
        return cls.clb(port) + 0x400

    @classmethod
    def table(cls, port: int, slot: int) -> int:
        return cls.clb(port) + 0x1000 + slot * TABLE_STRIDE

    def received(self, port: int, offset: int, length: int = 20) -> bytes:
        return self.memory.read(self.fb(port) + offset, length)

    # ---- driving a port ----

    def start(self, port: int) -> None:
        """Point the port at its list and FIS area, enable FIS receive, then start it."""
        self.port_write(port, spec.P_CLB, self.clb(port))
        self.port_write(port, spec.P_CLBU, 0)
        self.port_write(port, spec.P_FB, self.fb(port))
        self.port_write(port, spec.P_FBU, 0)
        self.memory.write(self.fb(port), bytes(256))
        self.port_write(port, spec.P_CMD, spec.CMD_FRE | spec.CMD_SUD)
        self.port_write(port, spec.P_SERR, 0xFFFFFFFF)
        self.port_write(port, spec.P_IS, 0xFFFFFFFF)
        self.port_write(port, spec.P_CMD, spec.CMD_FRE | spec.CMD_SUD | spec.CMD_ST)

    def prepare(self, port: int, slot: int, fis: bytes, prdt: Sequence[tuple[int, int]] = (),
                *, acmd: bytes = b"", flags: int = 0) -> None:
        """Write command ``slot``: header, FIS, ATAPI command and PRDT (gpa, bytes)."""
        table = self.table(port, slot)
        header = struct.pack("<IIII", (len(prdt) << 16) | flags | 5, 0xDEAD, table, 0)
        self.memory.write(self.clb(port) + slot * 32, header + bytes(16))
        self.memory.write(table, fis.ljust(64, b"\0") + acmd.ljust(16, b"\0") + bytes(48))
        for i, (gpa, length) in enumerate(prdt):
            self.memory.write(table + 0x80 + 16 * i,
                              struct.pack("<IIII", gpa & 0xFFFFFFFF, gpa >> 32, 0,
                                          (length - 1) | 1 << 31))

    def issue(self, port: int, slots: int, *, sact: bool = False) -> None:
        """Set PxCI (and PxSACT) bits, let the I/O thread run them, wait for the disk."""
        if sact:
            self.port_write(port, spec.P_SACT, slots)
        self.port_write(port, spec.P_CI, slots)
        self.settle(port)

    def settle(self, port: int) -> None:
        self.device.run_commands()
        drive = self.device.ports[port].drive
        assert drive is not None
        assert drive.backend.drain(10)

    def run(self, port: int, fis: bytes, prdt: Sequence[tuple[int, int]] = (), *,
            slot: int = 0, acmd: bytes = b"", flags: int = 0) -> Result:
        """One non-queued command in ``slot``: its result."""
        self.port_write(port, spec.P_IS, 0xFFFFFFFF)
        self.prepare(port, slot, fis, prdt, acmd=acmd, flags=flags)
        self.issue(port, 1 << slot)
        return Result(self, port, slot)

    def recover(self, port: int) -> None:
        """What SeaBIOS does after an error: stop, clear SERR and IS, start again."""
        self.port_write(port, spec.P_CMD, spec.CMD_FRE | spec.CMD_SUD)
        assert not self.port_read(port, spec.P_CMD) & spec.CMD_CR
        self.port_write(port, spec.P_SERR, 0xFFFFFFFF)
        self.port_write(port, spec.P_IS, 0xFFFFFFFF)
        self.port_write(port, spec.P_CMD, spec.CMD_FRE | spec.CMD_SUD | spec.CMD_ST)

    def close(self) -> None:
        self.device.close()


class Result:
    """A finished command as the guest sees it."""

    def __init__(self, hba: Hba, port: int, slot: int) -> None:
        self.tfd = hba.port_read(port, spec.P_TFD)
        self.irq = hba.port_read(port, spec.P_IS)
        self.ci = hba.port_read(port, spec.P_CI)
        self.d2h = hba.received(port, spec.RX_D2H)
        self.pio = hba.received(port, spec.RX_PIO_SETUP)
        self.prdbc = hba.memory.read_u32(hba.clb(port) + slot * 32 + 4)
        self.slot = slot

    @property
    def status(self) -> int:
        return self.tfd & 0xFF

    @property
    def error(self) -> int:
        return self.tfd >> 8 & 0xFF

    @property
    def ok(self) -> bool:
        return (not self.status & (spec.ST_ERR | spec.ST_BSY | spec.ST_DRQ)
                and not self.ci >> self.slot & 1 and bool(self.irq & spec.IS_DHRS)
                and self.d2h[2] == self.status)


@contextmanager
def hba(config: dict[str, Any], emulation: str = "ahci") -> Iterator[Hba]:
    h = Hba(config, emulation)
    try:
        yield h
    finally:
        h.close()


def disk_config(*paths: Path, **options: str) -> dict[str, Any]:
    return {"port": {str(i): {"type": "hd", "path": str(p), **options}
                     for i, p in enumerate(paths)}}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(SIZE))
    return path


# ---- PCI identity and generic host control ----


def test_pci_identity_and_host_registers(image: Path, tmp_path: Path) -> None:
    cd = tmp_path / "cd.iso"
    cd.write_bytes(bytes(8 * 2048))
    config = {"port": {"0": {"type": "hd", "path": str(image)},
                       "2": {"type": "cd", "path": str(cd)}}}
    with hba(config) as h:
        vm = h.vm
        assert cfg_read(vm, BDF, 0, 4) == 0x2821_8086
        assert cfg_read(vm, BDF, 0x08, 4) >> 8 == 0x010601
        assert cfg_read(vm, BDF, 0x3D, 1) == 1  # INTA
        assert cfg_read(vm, BDF, 0x24, 4) == h.abar  # BAR 5, 32-bit memory
        cap = h.read(spec.CAP)
        for bit in (spec.CAP_S64A, spec.CAP_SNCQ, spec.CAP_SSS, spec.CAP_SCLO, spec.CAP_SAM):
            assert cap & bit
        assert cap & 0x1F == 2 and (cap >> 8) & 0x1F == 31  # NP = highest port, 32 slots
        assert h.read(spec.PI) == 0b101
        assert h.read(spec.VS) == 0x10301
        assert h.read(spec.GHC) == spec.GHC_AE
        assert h.read(spec.CAP2) == spec.CAP2_APST
        assert h.read(spec.CAP, 1) == cap & 0xFF and h.read(spec.CAP + 2, 2) == cap >> 16 & 0xFFFF
        assert h.port_read(0, spec.P_SIG) == spec.SIG_ATA
        assert h.port_read(2, spec.P_SIG) == spec.SIG_ATAPI
        assert h.port_read(0, spec.P_SSTS) == 0x133 and h.port_read(2, spec.P_SSTS) == 0x133
        assert h.port_read(0, spec.P_TFD) & 0xFF == spec.ST_OK
        assert h.port_read(1, spec.P_SSTS) == 0 and h.port_read(1, spec.P_SIG) == 0xFFFFFFFF
        h.port_write(1, spec.P_CMD, spec.CMD_ST)  # not implemented: ignored
        assert h.port_read(1, spec.P_CMD) == 0
        # MSI capability, one message
        pointer = cfg_read(vm, BDF, 0x34, 1)
        assert cfg_read(vm, BDF, pointer, 1) == 0x05


def test_identify_device(image: Path) -> None:
    with hba(disk_config(image, ser="SERIAL-1", model="A DISK", nmrr="1")) as h:
        h.start(0)
        r = h.run(0, h2d(spec.IDENTIFY_DEVICE), [(DATA, 512)])
        assert r.ok and r.prdbc == 512
        assert r.irq & spec.IS_PSS and r.pio[0] == spec.FIS_PIO_SETUP and r.pio[1] & 0x20
        assert r.pio[15] == spec.ST_OK
        words = struct.unpack("<256H", h.memory.read(DATA, 512))
        raw = b"".join(struct.pack(">H", w) for w in words)
        assert raw[20:40] == b"SERIAL-1".ljust(20) and raw[54:94] == b"A DISK".ljust(40)
        assert raw[46:54] == b"001".ljust(8)
        assert words[83] & 1 << 10 and words[86] & 1 << 10  # LBA48
        assert words[100] | words[101] << 16 == SECTORS
        assert words[60] | words[61] << 16 == SECTORS
        assert words[75] == 31 and words[76] & 1 << 8  # NCQ, depth 32
        assert words[169] & 1 and words[69] & 1 << 14  # TRIM, deterministic
        assert words[217] == 1
        assert words[255] & 0xFF == 0xA5 and sum(h.memory.read(DATA, 512)) % 256 == 0
        # the CD signature and packet identify are refused on a disk
        r = h.run(0, h2d(spec.IDENTIFY_PACKET_DEVICE), [(DATA, 512)])
        assert r.status & spec.ST_ERR and r.error == spec.ER_ABRT and r.irq & spec.IS_TFES


def test_read_and_write_dma_ext_with_scatter_gather(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        prdt = [(DATA, 1024), (DATA + 0x10000, 512), (DATA + 0x20000, 2048)]
        r = h.run(0, h2d(spec.READ_DMA_EXT, lba=3, count=7), prdt)
        assert r.ok and r.prdbc == 3584
        expect = pattern(SIZE)[3 * 512:10 * 512]
        got = b"".join(h.memory.read(gpa, n) for gpa, n in prdt)
        assert got == expect
        data = pattern(2048, 9)
        h.memory.write(DATA, data)
        r = h.run(0, h2d(spec.WRITE_DMA, lba=100, count=4), [(DATA, 2048)])
        assert r.ok
        content = image.read_bytes()
        assert content[100 * 512:104 * 512] == data
        assert content[:100 * 512] == pattern(SIZE)[:100 * 512]


def test_pio_read_and_write_sectors(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        r = h.run(0, h2d(spec.READ_SECTORS, lba=1, count=2), [(DATA, 1024)])
        assert r.ok and r.irq & spec.IS_PSS and r.pio[1] & 0x20
        assert h.memory.read(DATA, 1024) == pattern(SIZE)[512:1536]
        h.memory.write(DATA, bytes(512))
        r = h.run(0, h2d(spec.WRITE_SECTORS_EXT, lba=5, count=1), [(DATA, 512)])
        assert r.ok and not r.pio[1] & 0x20
        assert image.read_bytes()[5 * 512:6 * 512] == bytes(512)
        # READ MULTIPLE needs SET MULTIPLE first
        r = h.run(0, h2d(spec.READ_MULTIPLE, lba=1, count=2), [(DATA, 1024)])
        assert r.error == spec.ER_ABRT
        h.recover(0)
        assert h.run(0, h2d(spec.SET_MULTIPLE_MODE, count=16)).ok
        assert h.run(0, h2d(spec.READ_MULTIPLE, lba=1, count=2), [(DATA, 1024)]).ok


@pytest.mark.parametrize("command,lba,count,prdt,error", [
    (spec.READ_DMA_EXT, SECTORS - 1, 2, 1024, spec.ER_IDNF),
    (spec.WRITE_DMA_EXT, 2**48 - 1, 1, 512, spec.ER_IDNF),
    (spec.READ_DMA, 0, 4, 1024, spec.ER_ABRT),  # PRDT too short
    (0x77, 0, 0, 0, spec.ER_ABRT),  # not a command
    (spec.NOP, 0, 0, 0, spec.ER_ABRT),
])
def test_errors_abort_and_halt_until_restarted(image: Path, command: int, lba: int,
                                               count: int, prdt: int, error: int) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        r = h.run(0, h2d(command, lba=lba, count=count), [(DATA, prdt)] if prdt else [])
        assert r.status == spec.ST_RDY | spec.ST_ERR and r.error == error
        assert r.irq & spec.IS_TFES and r.ci == 1  # the failed command stays in PxCI
        assert r.d2h[2] == r.status and r.d2h[3] == error
        # halted: a new command waits until the guest restarts the port
        h.prepare(0, 1, h2d(spec.FLUSH_CACHE_EXT))
        h.issue(0, 2)
        assert h.port_read(0, spec.P_CI) == 3
        h.recover(0)
        assert h.port_read(0, spec.P_CI) == 0
        assert h.run(0, h2d(spec.FLUSH_CACHE_EXT), slot=1).ok
    assert image.read_bytes() == pattern(SIZE)


def test_command_list_outside_ram_is_a_host_bus_error(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        h.port_write(0, spec.P_CMD, spec.CMD_FRE)
        h.port_write(0, spec.P_CLB, 0xF000_0000)
        h.port_write(0, spec.P_CMD, spec.CMD_FRE | spec.CMD_ST)
        h.issue(0, 1)
        irq = h.port_read(0, spec.P_IS)
        assert irq & spec.IS_HBFS
        assert h.port_read(0, spec.P_TFD) == spec.ER_ABRT << 8 | spec.ST_RDY | spec.ST_ERR
        assert h.vm.logged and "not inside guest RAM" in h.vm.logged[-1]


# ---- NCQ ----


def fpdma(command: int, tag: int, lba: int, count: int, *, fua: bool = False) -> bytes:
    return h2d(command, lba=lba, count=tag << 3, features=count,
               device=0x40 | (0x80 if fua else 0))


def test_ncq_reads_and_writes_complete_with_set_device_bits(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        h.port_write(0, spec.P_IE, 0xFFFFFFFF)
        for tag in range(8):
            h.memory.write(DATA + tag * 0x2000, pattern(4096, tag))
            command = spec.WRITE_FPDMA_QUEUED if tag % 2 else spec.READ_FPDMA_QUEUED
            h.prepare(0, tag, fpdma(command, tag, tag * 16, 8, fua=tag == 3),
                      [(DATA + tag * 0x2000, 4096)])
        h.issue(0, 0xFF, sact=True)
        assert h.port_read(0, spec.P_CI) == 0 and h.port_read(0, spec.P_SACT) == 0
        irq = h.port_read(0, spec.P_IS)
        assert irq & spec.IS_SDBS and not irq & spec.IS_TFES
        sdb = h.received(0, spec.RX_SDB, 8)
        assert sdb[0] == spec.FIS_SDB and sdb[2] == spec.ST_OK
        content = image.read_bytes()
        for tag in range(8):
            area = content[tag * 16 * 512:(tag * 16 + 8) * 512]
            if tag % 2:
                assert area == pattern(4096, tag)
            else:
                assert h.memory.read(DATA + tag * 0x2000, 4096) == area == \
                    pattern(SIZE)[tag * 16 * 512:(tag * 16 + 8) * 512]
        assert h.device.ports[0].drive.backend.stats()["flushes"] == 1  # the FUA write
        assert h.port_read(0, spec.P_TFD) & 0xFF == spec.ST_OK


def test_ncq_error_is_logged_in_page_10h(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        h.prepare(0, 5, fpdma(spec.READ_FPDMA_QUEUED, 5, SECTORS - 2, 8), [(DATA, 4096)])
        h.issue(0, 1 << 5, sact=True)
        irq = h.port_read(0, spec.P_IS)
        assert irq & spec.IS_TFES and irq & spec.IS_SDBS
        assert h.port_read(0, spec.P_SACT) == 1 << 5  # not completed
        assert h.port_read(0, spec.P_TFD) >> 8 == spec.ER_IDNF
        h.recover(0)
        assert h.port_read(0, spec.P_SACT) == 0
        r = h.run(0, h2d(spec.READ_LOG_EXT, lba=spec.LOG_NCQ_ERROR, count=1), [(DATA, 512)])
        assert r.ok
        page = h.memory.read(DATA, 512)
        assert page[0] == 5 and page[2] & spec.ST_ERR and page[3] == spec.ER_IDNF
        assert page[4:7] == (SECTORS - 2).to_bytes(3, "little") and sum(page) % 256 == 0
        # read once: the log is clear again; the directory lists page 10h
        assert h.run(0, h2d(spec.READ_LOG_DMA_EXT, lba=spec.LOG_NCQ_ERROR, count=1),
                     [(DATA, 512)]).ok
        assert h.memory.read(DATA, 511) == bytes(511)
        assert h.run(0, h2d(spec.READ_LOG_EXT, lba=0, count=1), [(DATA, 512)]).ok
        directory = h.memory.read(DATA, 512)
        assert directory[0] == 1 and directory[0x20] == 1
        assert h.run(0, h2d(spec.READ_LOG_EXT, lba=0x30, count=1), [(DATA, 512)]).error \
            == spec.ER_ABRT


def test_non_queued_command_waits_for_queued_ones(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        h.prepare(0, 0, fpdma(spec.READ_FPDMA_QUEUED, 0, 0, 8), [(DATA, 4096)])
        h.prepare(0, 1, h2d(spec.FLUSH_CACHE_EXT))
        port = h.device.ports[0]
        with h.device.lock:  # completions wait
            h.port_write(0, spec.P_SACT, 1)
            h.port_write(0, spec.P_CI, 3)
            h.device.run_commands()
            assert set(port.running) == {0}  # the flush did not start beside the read
            assert h.port_read(0, spec.P_CI) == 2
        h.settle(0)
        assert h.port_read(0, spec.P_CI) == 0 and h.port_read(0, spec.P_SACT) == 0


# ---- TRIM, flush, features ----


def test_trim_punches_holes(image: Path) -> None:
    import os
    with hba(disk_config(image)) as h:
        h.start(0)
        ranges = struct.pack("<QQQ", 0 | 64 << 48, 0, 1000 | 8 << 48).ljust(512, b"\0")
        h.memory.write(DATA, ranges)
        before = os.stat(image).st_blocks
        r = h.run(0, h2d(spec.DATA_SET_MANAGEMENT, features=spec.DSM_TRIM, count=1),
                  [(DATA, 512)])
        if r.error == spec.ER_ABRT and h.device.ports[0].drive.backend.stats()["unsupported"]:
            pytest.skip("the file system cannot punch holes")
        assert r.ok
        content = image.read_bytes()
        assert content[:64 * 512] == bytes(64 * 512)
        assert content[1000 * 512:1008 * 512] == bytes(4096)
        assert content[64 * 512:1000 * 512] == pattern(SIZE)[64 * 512:1000 * 512]
        assert os.stat(image).st_blocks < before
        # a range past the end refuses the whole command
        h.memory.write(DATA, struct.pack("<QQ", 64 | 8 << 48, SECTORS - 1 | 2 << 48))
        r = h.run(0, h2d(spec.DATA_SET_MANAGEMENT, features=spec.DSM_TRIM, count=1),
                  [(DATA, 512)])
        assert r.error == spec.ER_ABRT
        assert image.read_bytes()[64 * 512:72 * 512] == pattern(SIZE)[64 * 512:72 * 512]


def test_trim_refused_read_only_and_nodelete(image: Path) -> None:
    for options in ({"ro": "true"}, {"nodelete": "true"}):
        with hba(disk_config(image, **options)) as h:
            h.start(0)
            assert h.run(0, h2d(spec.IDENTIFY_DEVICE), [(DATA, 512)]).ok
            words = struct.unpack("<256H", h.memory.read(DATA, 512))
            assert not words[169] & 1
            h.memory.write(DATA, struct.pack("<Q", 8 << 48))
            r = h.run(0, h2d(spec.DATA_SET_MANAGEMENT, features=1, count=1), [(DATA, 512)])
            assert r.error == spec.ER_ABRT
            if "ro" in options:
                h.recover(0)
                r = h.run(0, h2d(spec.WRITE_DMA_EXT, lba=0, count=1), [(DATA, 512)])
                assert r.error == spec.ER_ABRT
    assert image.read_bytes() == pattern(SIZE)


def test_flush_features_power(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        assert h.run(0, h2d(spec.FLUSH_CACHE)).ok
        assert h.device.ports[0].drive.backend.stats()["flushes"] == 1
        for sub, count in ((spec.SF_DISABLE_WRITE_CACHE, 0), (spec.SF_SET_TRANSFER_MODE, 0x45),
                           (spec.SF_DISABLE_READ_LOOK_AHEAD, 0)):
            assert h.run(0, h2d(spec.SET_FEATURES, features=sub, count=count)).ok
        assert h.run(0, h2d(spec.IDENTIFY_DEVICE), [(DATA, 512)]).ok
        words = struct.unpack("<256H", h.memory.read(DATA, 512))
        assert words[88] >> 8 == 1 << 5 and not words[85] & 0x60  # UDMA 5; cache off
        r = h.run(0, h2d(spec.SET_FEATURES, features=spec.SF_SET_TRANSFER_MODE, count=0x47))
        assert r.error == spec.ER_ABRT  # no UDMA 7
        h.recover(0)
        r = h.run(0, h2d(spec.CHECK_POWER_MODE))
        assert r.ok and r.d2h[12] == 0xFF
        for command in (spec.IDLE_IMMEDIATE, spec.STANDBY_IMMEDIATE, spec.IDLE, spec.SLEEP):
            assert h.run(0, h2d(command)).ok
        assert h.run(0, h2d(spec.READ_VERIFY_EXT, lba=SECTORS - 1, count=1)).ok
        assert h.run(0, h2d(spec.READ_VERIFY, lba=SECTORS - 1, count=2)).error == spec.ER_IDNF


# ---- interrupts ----


def test_intx_and_msi(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        h.port_write(0, spec.P_IE, spec.IS_DHRS)
        h.write(spec.GHC, spec.GHC_AE | spec.GHC_IE)
        assert h.run(0, h2d(spec.FLUSH_CACHE_EXT)).ok
        assert h.read(spec.IS) == 1 and h.device.intx_level
        h.port_write(0, spec.P_IS, spec.IS_DHRS)
        assert h.device.intx_level  # IS still set
        h.write(spec.IS, 1)
        assert not h.device.intx_level and h.read(spec.IS) == 0
        # MSI
        msi = h.device.msi
        cfg_write(h.vm, BDF, msi.offset + 4, 4, 0xFEE00000)
        cfg_write(h.vm, BDF, msi.offset + 12, 2, 0x41)
        cfg_write(h.vm, BDF, msi.offset + 2, 2, 1)
        before = h.device.msi_interrupts
        assert h.run(0, h2d(spec.FLUSH_CACHE_EXT)).ok
        assert h.device.msi_interrupts == before + 1 and not h.device.intx_level
        assert h.vm.vmfd.irqfds  # the vector is bound
        # interrupts off: nothing
        h.write(spec.GHC, spec.GHC_AE)
        assert h.run(0, h2d(spec.FLUSH_CACHE_EXT)).ok
        assert h.device.msi_interrupts == before + 1


# ---- resets ----


def test_comreset_soft_reset_and_hba_reset(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        h.port_write(0, spec.P_CMD, spec.CMD_FRE)
        h.port_write(0, spec.P_SCTL, 1)
        assert h.port_read(0, spec.P_SSTS) & 0xF == 0
        assert h.port_read(0, spec.P_TFD) & spec.ST_BSY
        h.port_write(0, spec.P_SCTL, 0x20)  # release, limit to 3 Gb/s
        assert h.port_read(0, spec.P_SSTS) == 0x123
        assert h.port_read(0, spec.P_TFD) & 0xFF == spec.ST_OK
        d2h = h.received(0, spec.RX_D2H)
        assert d2h[0] == spec.FIS_D2H and d2h[12] == 1 and d2h[4] == 1  # signature
        # soft reset: SRST set (with the reset and clear-busy bits), then cleared
        h.port_write(0, spec.P_CMD, spec.CMD_FRE | spec.CMD_ST)
        h.memory.write(h.fb(0), bytes(256))
        h.prepare(0, 0, h2d(0, control=spec.CONTROL_SRST, c_bit=False),
                  flags=spec.HEADER_RESET | spec.HEADER_CLEAR_BUSY)
        h.issue(0, 1)
        assert h.port_read(0, spec.P_CI) == 0
        h.prepare(0, 1, h2d(0, c_bit=False))
        h.issue(0, 2)
        assert h.port_read(0, spec.P_CI) == 0 and h.port_read(0, spec.P_SIG) == spec.SIG_ATA
        assert h.received(0, spec.RX_D2H)[0] == spec.FIS_D2H
        assert h.port_read(0, spec.P_IS) & spec.IS_DHRS
        # HBA reset: registers back to reset values, the list base kept, HR reads 0
        h.port_write(0, spec.P_IE, 0xFF)
        h.write(spec.GHC, spec.GHC_HR)
        assert h.read(spec.GHC) == spec.GHC_AE
        assert h.port_read(0, spec.P_IE) == 0 and h.port_read(0, spec.P_CMD) == spec.CMD_POD
        assert h.port_read(0, spec.P_CLB) == h.clb(0)
        h.start(0)
        assert h.run(0, h2d(spec.FLUSH_CACHE_EXT)).ok


def test_stopping_forgets_commands_in_flight(image: Path) -> None:
    with hba(disk_config(image)) as h:
        h.start(0)
        port = h.device.ports[0]
        h.prepare(0, 0, h2d(spec.READ_DMA_EXT, count=8), [(DATA, 4096)])
        with h.device.lock:  # hold the completion back while the guest stops the port
            h.port_write(0, spec.P_CI, 1)
            h.device.run_commands()
            assert port.running
            h.port_write(0, spec.P_CMD, spec.CMD_FRE)
            assert h.port_read(0, spec.P_CI) == 0
        assert port.drive.backend.drain(10)
        assert not h.port_read(0, spec.P_CMD) & spec.CMD_CR
        assert not h.port_read(0, spec.P_IS) & spec.IS_DHRS  # the late completion is dropped


# ---- snapshots ----


def test_save_restore_keeps_registers_and_issued_commands(image: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.img"
    copy.write_bytes(image.read_bytes())
    with hba(disk_config(image)) as h:
        h.start(0)
        assert h.run(0, h2d(spec.SET_MULTIPLE_MODE, count=8)).ok
        h.port_write(0, spec.P_IE, 0x1F)
        saved = h.device.save_state()
        # a command issued while the I/O thread is held: saved in PxCI, run after restore
        h.prepare(0, 3, h2d(spec.READ_DMA_EXT, lba=2, count=1), [(DATA, 512)])
        h.port_write(0, spec.P_CI, 1 << 3)
        pending = h.device.save_state()
        assert pending["ports"]["0"]["registers"]["ci"] == 1 << 3
        with hba(disk_config(copy)) as other:
            other.device.restore_state(pending, 1)
            other.memory.write(DATA, bytes(512))
            other.settle(0)
            assert other.port_read(0, spec.P_CI) == 0
            assert other.memory.read(DATA, 512) == pattern(SIZE)[1024:1536]
            assert other.port_read(0, spec.P_IE) == 0x1F
            assert other.device.ports[0].drive.state.multiple == 8
        h.device.restore_state(saved, 1)
        assert h.port_read(0, spec.P_CI) == 0


def test_restore_refuses_a_changed_image(image: Path, tmp_path: Path) -> None:
    with hba(disk_config(image)) as h:
        saved = h.device.save_state()
        assert saved["ports"]["0"]["image"]["path"] == str(image)
        with image.open("r+b") as f:
            f.write(b"changed")
        with pytest.raises(ImageError, match="changed since the snapshot"):
            h.device.restore_state(saved, 1)


@pytest.mark.parametrize("path,value,message", [
    (("hba", "ghc"), 1 << 5, "ghc"),
    (("ports", "0", "registers", "clb"), 0x100001, "clb"),
    (("ports", "0", "registers", "irq_status"), 1 << 25, "irq_status"),
    (("ports", "0", "drive", "multiple"), 3, "multiple"),
    (("ports", "0", "drive", "ncq_log"), b"x", "ncq_log"),
    (("ports", "0", "registers", "halted"), 1, "halted"),
    (("ports", "1"), {}, "ports"),
])
def test_restore_refuses_bad_state(image: Path, path: tuple[str, ...], value: Any,
                                   message: str) -> None:
    with hba(disk_config(image)) as h:
        saved = h.device.save_state()
        node = saved
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(DeviceError, match=message):
            h.device.restore_state(saved, 1)
