# SPDX-License-Identifier: BSD-2-Clause
"""virtio-blk driven from the guest's side on a fake machine, with a real image file."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeVm, mmio_read
from hvf.cli import main
from hvf.errors import ConfigError
from hvf.plugins.block.options import default_serial
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.virtio import blk
from hvf.plugins.virtio.pci import CFG_DEVICE
from hvf.plugins.virtio.spec import ACKNOWLEDGE, DRIVER, DRIVER_OK, F_VERSION_1, FEATURES_OK
from hvf.testing.virtio import STATUS, Driver, Used, VirtqDriver

BDF = (0, 5, 0)
SIZE = 64 * 1024
CAPACITY = SIZE // 512


class Disk:
    """A virtio-blk function on a fake machine with its queue set up."""

    def __init__(self, path: Path, **options: str) -> None:
        self.vm = FakeVm()
        bus = PciBus()
        self.vm.attach(bus)
        self.device = blk.create(vm=self.vm, slot=BDF, config={"path": str(path), **options})
        bus.add(BDF, self.device)
        bus.assign_resources(enable_decoding=True)
        self.driver = Driver(self.vm, BDF)
        self.queue = VirtqDriver(self.vm.memory, 16)
        self.status_at: dict[int, int] = {}
        assert self.driver.negotiate(F_VERSION_1) & FEATURES_OK
        self.driver.setup_queue(0, self.queue)
        self.driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    def config(self, offset: int, size: int) -> int:
        return mmio_read(self.vm, self.driver.addr(CFG_DEVICE, offset), size)

    def submit(self, readable: list[bytes], writable: list[int]) -> int:
        head = self.queue.add(readable, writable)
        if writable:
            gpa, length = self.queue._posted[head].writable[-1]
            self.status_at[head] = gpa + length - 1
        return head

    def status(self, used: Used) -> int:
        """The status byte of a completed request (the last writable byte, whatever
        length the device reported)."""
        return self.vm.memory.read(self.status_at.pop(used.head), 1)[0]

    def complete(self) -> list[Used]:
        """Kick, let the I/O thread run, wait for the back end: the used elements."""
        self.driver.kick(0)
        self.device._doorbell(0)
        assert self.device.drain(10)
        return self.queue.used()

    def request(self, kind: int, sector: int = 0, out: list[bytes] = (),  # type: ignore[assignment]
                into: list[int] = ()) -> Used:  # type: ignore[assignment]
        """One request; its used element (the status is its data's last byte)."""
        self.submit([header(kind, sector), *out], [*into, 1])
        (used,) = self.complete()
        return used


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def segment(sector: int, sectors: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, sectors, flags)


def pattern(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(size))


@contextmanager
def disk(path: Path, **options: str) -> Iterator[Disk]:
    d = Disk(path, **options)
    try:
        yield d
    finally:
        d.device.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(SIZE))
    return path


def test_config_space_and_features(image: Path) -> None:
    with disk(image, sectorsize="512/4096") as d:
        features = d.driver.features()
        for bit in (blk.F_SIZE_MAX, blk.F_SEG_MAX, blk.F_BLK_SIZE, blk.F_TOPOLOGY, blk.F_FLUSH,
                    blk.F_DISCARD, blk.F_WRITE_ZEROES):
            assert features & bit
        assert not features & blk.F_RO
        assert d.config(0, 8) == CAPACITY
        assert d.config(8, 4) == blk.SIZE_MAX
        assert d.config(12, 4) == 16 * 16 - 2 == blk.SEG_MAX
        assert d.config(20, 4) == 512
        assert d.config(24, 1) == 3  # 4096 / 512 = 2**3
        assert d.config(26, 2) == 8
        assert d.config(34, 2) == 1
        assert d.config(36, 4) == blk.MAX_RANGE_SECTORS and d.config(40, 4) == 32
        assert d.config(48, 4) == blk.MAX_RANGE_SECTORS and d.config(56, 1) == 1
    assert blk.SEG_MAX <= blk.QUEUE_SIZE - 2


def test_read_and_write_with_scatter_gather(image: Path) -> None:
    with disk(image) as d:
        data = [pattern(512, 1), pattern(1024, 2), pattern(512, 3)]
        used = d.request(blk.T_OUT, 3, out=data)
        assert used.data == bytes([blk.S_OK])
        assert image.read_bytes()[3 * 512 : 7 * 512] == b"".join(data)
        assert image.read_bytes()[: 3 * 512] == pattern(SIZE)[: 3 * 512]
        used = d.request(blk.T_IN, 2, into=[1024, 512, 1024])
        assert used.length == 2561 and used.data[-1] == blk.S_OK
        assert used.data[:-1] == image.read_bytes()[1024 : 1024 + 2560]


def test_header_split_across_descriptors(image: Path) -> None:
    with disk(image) as d:
        raw = header(blk.T_IN, 1)
        d.submit([raw[:3], raw[3:]], [512, 1])
        (used,) = d.complete()
        assert used.data == pattern(SIZE)[512:1024] + bytes([blk.S_OK])


def test_flush(image: Path) -> None:
    with disk(image) as d:
        assert d.request(blk.T_FLUSH).data == bytes([blk.S_OK])
        assert d.device.backend.stats()["flushes"] == 1


def test_discard_leaves_the_file_sparse_and_write_zeroes(image: Path) -> None:
    with disk(image) as d:
        before = os.stat(image).st_blocks
        used = d.request(blk.T_DISCARD, out=[segment(0, 64)])  # the first 32 KiB
        if used.data == bytes([blk.S_UNSUPP]):
            pytest.skip("the file system cannot punch holes")
        assert used.data == bytes([blk.S_OK])
        assert os.stat(image).st_blocks < before
        with open(image, "rb") as f:
            assert os.lseek(f.fileno(), 0, os.SEEK_DATA) >= 32 * 1024
        used = d.request(blk.T_WRITE_ZEROES, out=[segment(64, 8), segment(100, 4, 1)])
        assert used.data == bytes([blk.S_OK])
        content = image.read_bytes()
        assert content[: 36 * 1024] == bytes(36 * 1024)
        assert content[100 * 512 : 104 * 512] == bytes(2048)
        assert content[36 * 1024 : 100 * 512] == pattern(SIZE)[36 * 1024 : 100 * 512]
        assert len(content) == SIZE


def test_get_id(image: Path) -> None:
    with disk(image, ser="DISK-1") as d:
        used = d.request(blk.T_GET_ID, into=[20])
        assert used.data == b"DISK-1" + bytes(14) + bytes([blk.S_OK])
    with disk(image) as d:
        used = d.request(blk.T_GET_ID, into=[8, 12])
        assert used.data[:20] == default_serial(str(image)).encode() and len(used.data[:20]) == 20
        assert used.data[-1] == blk.S_OK
    with pytest.raises(ConfigError, match="ser="):
        blk.create(vm=FakeVm(), slot=BDF, config={"path": str(image), "ser": "x" * 21})


def test_read_only_refuses_writes(image: Path) -> None:
    with disk(image, ro="true") as d:
        features = d.driver.features()
        assert features & blk.F_RO and not features & (blk.F_DISCARD | blk.F_WRITE_ZEROES)
        assert d.request(blk.T_OUT, 0, out=[bytes(512)]).data == bytes([blk.S_IOERR])
        assert d.request(blk.T_DISCARD, out=[segment(0, 8)]).data == bytes([blk.S_IOERR])
        assert d.request(blk.T_WRITE_ZEROES, out=[segment(0, 8)]).data == bytes([blk.S_IOERR])
        assert d.request(blk.T_IN, 0, into=[512]).data == pattern(512) + bytes([blk.S_OK])
        assert d.request(blk.T_FLUSH).data == bytes([blk.S_OK])
    assert image.read_bytes() == pattern(SIZE)


@pytest.mark.parametrize("case, status", [
    ("unknown type", blk.S_UNSUPP),
    ("short header", blk.S_IOERR),
    ("partial sector", blk.S_IOERR),
    ("past the end", blk.S_IOERR),
    ("straddles the end", blk.S_IOERR),
    ("huge sector", blk.S_IOERR),
    ("discard with unmap", blk.S_UNSUPP),
    ("discard past the end", blk.S_IOERR),
    ("odd segment list", blk.S_IOERR),
])
def test_malformed_requests(image: Path, case: str, status: int) -> None:
    requests = {
        "unknown type": ([header(99)], [512, 1]),
        "short header": ([header(blk.T_IN)[:12]], [512, 1]),
        "partial sector": ([header(blk.T_OUT), bytes(100)], [1]),
        "past the end": ([header(blk.T_IN, CAPACITY)], [512, 1]),
        "straddles the end": ([header(blk.T_OUT, CAPACITY - 1), bytes(1024)], [1]),
        "huge sector": ([header(blk.T_IN, 2**64 - 1)], [512, 1]),
        "discard with unmap": ([header(blk.T_DISCARD), segment(0, 8, 1)], [1]),
        "discard past the end": ([header(blk.T_DISCARD), segment(CAPACITY - 4, 8)], [1]),
        "odd segment list": ([header(blk.T_WRITE_ZEROES), segment(0, 8)[:10]], [1]),
    }
    with disk(image) as d:
        d.submit(*requests[case])
        (used,) = d.complete()
        assert used.length == 1 and d.status(used) == status
        assert d.device.in_flight == 0
    assert image.read_bytes() == pattern(SIZE)


def test_no_status_byte(image: Path) -> None:
    with disk(image) as d:
        d.submit([header(blk.T_OUT), bytes(512)], [])
        (used,) = d.complete()
        assert used.length == 0
        assert d.request(blk.T_FLUSH).data == bytes([blk.S_OK])  # and the device carries on
    assert image.read_bytes() == pattern(SIZE)


def test_save_restore_and_stats(image: Path) -> None:
    with disk(image) as d:
        d.request(blk.T_IN, 0, into=[512])
        saved = d.device.save_state()
        assert saved["device"]["image"]["path"] == str(image)
        assert saved["device"]["image"]["size"] == image.stat().st_size
        d.device.restore_state(saved, 2)
        stats = d.device.stats()
        assert stats["in_flight"] == 0 and stats["block_reads"] == 1


def test_parse() -> None:
    assert blk.parse(["/vm/disk.img", "ro", "sectorsize=512/4096", "ser=ABC"]) == {
        "path": "/vm/disk.img", "ro": "true", "sectorsize": "512/4096", "ser": "ABC"}
    with pytest.raises(ConfigError, match="virtio-blk"):
        blk.parse([])


_KINDS = st.sampled_from([blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID, blk.T_DISCARD,
                          blk.T_WRITE_ZEROES, 2, 99, 2**32 - 1])
_SECTORS = st.one_of(st.integers(0, CAPACITY + 2), st.integers(0, 2**64 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(st.tuples(
    _KINDS, _SECTORS, st.lists(st.integers(0, 1100), max_size=3),
    st.lists(st.integers(0, 1100), max_size=3), st.sampled_from([0, 0, 0, 1, 8, 16]),
    st.booleans(),
    st.lists(st.tuples(_SECTORS, st.integers(0, 2**32 - 1), st.integers(0, 3)), max_size=2)),
    min_size=1, max_size=4))
def test_hostile_requests(requests: list) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.img"
        original = pattern(SIZE)
        path.write_bytes(original)
        allowed = bytearray(SIZE)  # 1 where a request may have changed the image
        with disk(path) as d:
            for kind, sector, out, into, header_cut, has_status, segments in requests:
                raw = header(kind, sector)[: 16 - header_cut]
                data = [] if header_cut else [pattern(n, 5) for n in out]
                ranges = [(sector * 512, sum(out))] if kind == blk.T_OUT else []
                if kind in (blk.T_DISCARD, blk.T_WRITE_ZEROES) and segments and not header_cut:
                    data = [b"".join(segment(s, n, f) for s, n, f in segments)]
                    ranges = [(s * 512, n * 512) for s, n, _f in segments]
                d.submit([raw, *data], [*into, 1] if has_status else into)
                (used,) = d.complete()
                assert used.length <= sum(into) + has_status
                valid = [(o, n) for o, n in ranges if n % 512 == 0 and o + n <= SIZE]
                for offset, length in valid:
                    allowed[offset : offset + length] = b"\1" * length
                if has_status:
                    status = d.status(used)
                    assert status in (blk.S_OK, blk.S_IOERR, blk.S_UNSUPP)
                    if status == blk.S_OK:
                        assert not header_cut and valid == ranges
            assert d.device.in_flight == 0
        content = path.read_bytes()
        assert len(content) == SIZE
        assert all(a == b or allowed[i] for i, (a, b) in enumerate(zip(content, original)))


def test_command_line_builds_bhyve_tree(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["-s", "4,virtio-blk,/vm/disk.img,ro,nocache,sectorsize=512/4096,ser=S1",
                   "-o", "config.dump=1", "vm0"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pci.")]
    assert status == 1
    assert lines == ["pci.0.4.0.device=virtio-blk", "pci.0.4.0.nocache=true",
                     "pci.0.4.0.path=/vm/disk.img", "pci.0.4.0.ro=true",
                     "pci.0.4.0.sectorsize=512/4096", "pci.0.4.0.ser=S1"]
