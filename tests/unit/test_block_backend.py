# SPDX-License-Identifier: BSD-2-Clause
"""The block back end on real files: scatter/gather data, range checks (and a property
test that no request touches bytes outside the image or the guest's buffers), read-only
images, flush, discard and write-zeroes keeping sparse files sparse, direct I/O with
bounce buffers, short transfers, errors, many requests in flight, drain and close; each
on both engines (worker threads and io_uring) except where a test stands in for a system
call the workers make (tests/unit/test_block_uring.py has the ring's own)."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvf.plugins.block import backend as backend_module
from hvf.plugins.block.backend import IOV_MAX, BlockBackend, Status
from hvf.plugins.block.image import Image, open_image
from hvf.plugins.block.options import ImageOptions
from hvf.plugins.block.uring import Ring, UringBackend

KiB = 1024
MiB = 1 << 20
OK = Status.OK

#: ``make(size, options, threads, where)``: a back end, its file and the file's contents.
Make = Callable[..., tuple[BlockBackend, Path, bytes]]
#: ``sparse(options, where)``: a back end on a half-written sparse file, and the file.
Sparse = Callable[..., tuple[BlockBackend, Path]]


class Completions:
    """A ``done`` callback that records each completion and the thread it ran on."""

    def __init__(self) -> None:
        self.results: list[tuple[Status, int]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, status: Status, nbytes: int) -> None:
        with self._lock:
            self.results.append((status, nbytes))
            self.threads.add(threading.current_thread().name)


def one(backend: BlockBackend, submit: Callable[..., None], *args: object) -> tuple[Status, int]:
    """Submit one request, wait for it, return its completion."""
    done = Completions()
    submit(*args, done)
    assert backend.drain(timeout=30)
    assert len(done.results) == 1
    return done.results[0]


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


#: Tests of what the worker threads do (they stand in for a system call the workers make).
threads_only = pytest.mark.parametrize("engine", ["threads"])


@pytest.fixture(params=["threads", "uring"])
def engine(request: pytest.FixtureRequest) -> str:
    """The engine of the back ends a test makes."""
    if request.param == "uring":
        try:
            Ring(8).close()
        except OSError as e:
            pytest.skip(f"no io_uring here: {e}")
    return str(request.param)


def new_backend(image: Image, engine: str, threads: int = 2) -> BlockBackend:
    if engine == "threads":
        return BlockBackend(image, threads=threads)
    return UringBackend(image, Ring())


@pytest.fixture
def make(tmp_path: Path, engine: str) -> Iterator[Make]:
    """``make(size, options, threads, where)``: a back end on a new file of random bytes."""
    backends: list[BlockBackend] = []

    def build(size: int = MiB, options: ImageOptions | None = None, threads: int = 2,
              where: Path | None = None) -> tuple[BlockBackend, Path, bytes]:
        data = random.Random(size).randbytes(size)
        path = write_file((where or tmp_path) / f"disk{len(backends)}.img", data)
        backends.append(new_backend(open_image(path, options), engine, threads))
        return backends[-1], path, data

    yield build
    for backend in backends:
        backend.close()


# ---- data ----


def test_scatter_gather_reads_and_writes_move_the_right_bytes(make: Make) -> None:
    backend, path, data = make()
    ram = bytearray(64 * KiB)
    views = [memoryview(ram)[100:612], memoryview(ram)[5000:5001], memoryview(ram)[8192:12000]]
    total = sum(map(len, views))
    assert one(backend, backend.read, 4096, views) == (OK, total)
    assert b"".join(views) == data[4096:4096 + total]
    assert ram[:100] == bytes(100) and ram[612:5000] == bytes(4388)
    pieces = [b"abc", bytearray(b"defg" * 300), memoryview(b"h" * 77)]
    written = b"".join(bytes(p) for p in pieces)
    assert one(backend, backend.write, 777, pieces) == (OK, len(written))
    assert file_bytes(path) == data[:777] + written + data[777 + len(written):]


def test_completions_run_on_the_back_ends_threads(make: Make, engine: str) -> None:
    backend, _, _ = make(threads=3)
    done = Completions()
    for _ in range(20):
        backend.read(0, [bytearray(512)], done)
    backend.drain()
    if engine == "threads":
        assert done.threads <= {f"hvf block {i} {backend.name}" for i in range(3)}
    else:
        assert done.threads == {f"hvf block ring {backend.name}"}
    assert threading.current_thread().name not in done.threads


def test_empty_requests_complete_at_once(make: Make) -> None:
    backend, path, data = make()
    assert one(backend, backend.read, MiB, []) == (OK, 0)
    assert one(backend, backend.write, 0, [b"", bytearray()]) == (OK, 0)
    assert one(backend, backend.discard, 5, 0) == (OK, 0)
    assert one(backend, backend.write_zeroes, MiB, 0, True) == (OK, 0)
    assert file_bytes(path) == data


def test_a_read_into_read_only_buffers_is_a_programming_error(make: Make) -> None:
    backend, _, _ = make()
    with pytest.raises(TypeError, match="writable"):
        backend.read(0, [b"abc"], Completions())
    assert backend.stats()["in_flight"] == 0


def test_more_buffers_than_iov_max_are_split(make: Make) -> None:
    backend, path, data = make()
    ram = bytearray(512 * (IOV_MAX + 500))
    views = [memoryview(ram)[i:i + 512] for i in range(0, len(ram), 512)]
    assert one(backend, backend.read, 0, views) == (OK, len(ram))
    assert ram == data[:len(ram)]
    ram[:] = bytes(reversed(ram))
    assert one(backend, backend.write, 0, views) == (OK, len(ram))
    assert file_bytes(path)[:len(ram)] == ram


@threads_only
def test_short_transfers_are_resumed(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, path, data = make()
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def dribble(real: Callable[..., int]) -> Callable[..., int]:
        def call(fd: int, views: list[memoryview], offset: int) -> int:
            room, trimmed = 100, []
            for view in views:
                if room:
                    trimmed.append(view[:room])
                    room -= len(trimmed[-1])
            return real(fd, trimmed, offset)
        return call

    monkeypatch.setattr(os, "preadv", dribble(real_preadv))
    monkeypatch.setattr(os, "pwritev", dribble(real_pwritev))
    ram = bytearray(3000)
    views = [memoryview(ram)[:1], memoryview(ram)[1:250], memoryview(ram)[250:]]
    assert one(backend, backend.read, 10, views) == (OK, 3000)
    assert ram == data[10:3010]
    assert one(backend, backend.write, 0, [b"x" * 1234, b"y" * 7]) == (OK, 1241)
    assert file_bytes(path)[:1241] == b"x" * 1234 + b"y" * 7


# ---- range checks and read-only images ----


@pytest.mark.parametrize(("offset", "length"), [
    (-1, 1), (-512, 512), (MiB, 1), (MiB - 511, 512), (MiB + 4096, 512), (2**63, 512),
    (2**64 - 512, 512), (0, MiB + 1),
])
def test_requests_outside_the_image_are_out_of_range(make: Make, offset: int,
                                                    length: int) -> None:
    backend, path, data = make()
    ram = bytearray(b"\xaa" * length)
    assert one(backend, backend.read, offset, [ram]) == (Status.OUT_OF_RANGE, 0)
    assert one(backend, backend.write, offset, [ram]) == (Status.OUT_OF_RANGE, 0)
    assert one(backend, backend.discard, offset, length) == (Status.OUT_OF_RANGE, 0)
    assert one(backend, backend.write_zeroes, offset, length, False) == (Status.OUT_OF_RANGE, 0)
    assert ram == b"\xaa" * length and file_bytes(path) == data
    assert backend.stats()["out_of_range"] == 4


def test_negative_lengths_are_out_of_range(make: Make) -> None:
    backend, path, data = make()
    assert one(backend, backend.discard, 4096, -512) == (Status.OUT_OF_RANGE, 0)
    assert one(backend, backend.write_zeroes, 4096, -1, True) == (Status.OUT_OF_RANGE, 0)
    assert file_bytes(path) == data


def test_the_last_sector_is_in_range(make: Make) -> None:
    backend, _, data = make()
    ram = bytearray(512)
    assert one(backend, backend.read, MiB - 512, [ram]) == (OK, 512)
    assert ram == data[-512:]


def test_a_read_only_image_refuses_changes(make: Make) -> None:
    backend, path, data = make(options=ImageOptions(readonly=True))
    refused = (Status.IO_ERROR, -errno.EROFS)
    assert one(backend, backend.write, 0, [b"x" * 512]) == refused
    assert one(backend, backend.discard, 0, 4096) == refused
    assert one(backend, backend.write_zeroes, 0, 4096, True) == refused
    assert one(backend, backend.flush) == (OK, 0)
    ram = bytearray(512)
    assert one(backend, backend.read, 512, [ram]) == (OK, 512) and ram == data[512:1024]
    assert file_bytes(path) == data
    assert backend.stats()["io_errors"] == 3


# ---- property: nothing outside the image or the guest's buffers is ever touched ----

SIZE = 16 * KiB
SENTINEL = 0x5A


class Disk:
    """A back end, its file and the file's first contents (a short repr for hypothesis)."""

    def __init__(self, parts: tuple[BlockBackend, Path, bytes]) -> None:
        self.backend, self.path, self.data = parts

    def __repr__(self) -> str:
        return f"Disk({self.backend.image!r})"


@pytest.fixture(params=["cached", "nocache"])
def small(request: pytest.FixtureRequest, make: Make) -> Disk:
    if request.param == "cached":
        return Disk(make(SIZE))
    where = request.getfixturevalue("direct_dir")
    return Disk(make(SIZE, ImageOptions(nocache=True), where=where))


lengths = st.one_of(st.integers(0, SIZE + 600), st.integers(0, 8).map(lambda n: n * 512))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["read", "write", "discard", "write_zeroes"]),
       offset=st.one_of(st.integers(-SIZE, 2 * SIZE), st.integers(0, 32).map(lambda n: n * 512),
                        st.sampled_from([2**63, -2**63, SIZE, SIZE - 1])),
       sizes=st.lists(lengths, max_size=4), gap=st.sampled_from([0, 8]),
       length=st.integers(-16, 2 * SIZE), unmap=st.booleans())
def test_no_request_touches_bytes_outside_its_ranges(
        small: Disk, op: str, offset: int, sizes: list[int], gap: int, length: int,
        unmap: bool) -> None:
    backend, path, data = small.backend, small.path, small.data
    with open(path, "r+b") as f:
        f.write(data)
    # Guest RAM: page-aligned, the buffers ``gap`` bytes apart, sentinels everywhere else.
    ram = mmap.mmap(-1, sum(sizes) + gap * (len(sizes) + 1) + 1)
    ram[:] = bytes([SENTINEL]) * len(ram)
    views, at = [], gap
    for size in sizes:
        views.append(memoryview(ram)[at:at + size])
        views[-1][:] = random.Random(at).randbytes(size)
        at += size + gap
    before = bytes(ram)
    total = length if op in ("discard", "write_zeroes") else sum(sizes)
    args = {"read": (offset, views), "write": (offset, views), "discard": (offset, length),
            "write_zeroes": (offset, length, unmap)}[op]
    status, nbytes = one(backend, getattr(backend, op), *args)
    expected_file, expected_ram = bytearray(data), bytearray(before)
    dio = backend.image.dio
    if not (offset >= 0 and total >= 0 and offset + total <= SIZE):
        assert (status, nbytes) == (Status.OUT_OF_RANGE, 0)
    elif dio and op in ("read", "write") and total and (offset | total) % dio.offset:
        assert (status, nbytes) == (Status.IO_ERROR, -errno.EINVAL)
    else:
        assert (status, nbytes) == (OK, total)
        if op == "read":
            at = gap
            for size in sizes:
                expected_ram[at:at + size] = data[offset:offset + size]
                offset += size
                at += size + gap
        elif op == "write":
            expected_file[offset:offset + total] = b"".join(views)
        else:
            expected_file[offset:offset + total] = bytes(total)
    del views, args
    assert bytes(ram) == expected_ram
    ram.close()
    assert file_bytes(path) == expected_file


# ---- flush, discard, write-zeroes ----


@threads_only
def test_flush_is_fdatasync(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, _, _ = make()
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert one(backend, backend.flush) == (OK, 0)
    assert synced == [backend.image.fd]


@pytest.fixture
def sparse(tmp_path: Path, engine: str) -> Iterator[Sparse]:
    """``sparse(options)``: a back end on a 4 MiB file whose first 2 MiB are written."""
    backends: list[BlockBackend] = []

    def build(options: ImageOptions | None = None,
              where: Path | None = None) -> tuple[BlockBackend, Path]:
        path = (where or tmp_path) / f"sparse{len(backends)}.img"
        with open(path, "wb") as f:
            f.write(b"\xff" * (2 * MiB))
            f.truncate(4 * MiB)
            os.fsync(f.fileno())
        backends.append(new_backend(open_image(path, options), engine))
        return backends[-1], path

    yield build
    for backend in backends:
        backend.close()


def test_discard_punches_a_hole_and_keeps_the_size(sparse: Sparse) -> None:
    backend, path = sparse()
    before = allocated(path)
    assert before >= 2 * MiB
    assert one(backend, backend.discard, 0, MiB) == (OK, MiB)
    assert allocated(path) <= before - MiB
    assert os.stat(path).st_size == 4 * MiB
    with open(path, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 0
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == MiB
    assert path.read_bytes()[:2 * MiB] == bytes(MiB) + b"\xff" * MiB


def test_write_zeroes_with_unmap_leaves_a_hole(sparse: Sparse) -> None:
    backend, path = sparse()
    before = allocated(path)
    assert one(backend, backend.write_zeroes, MiB, MiB, True) == (OK, MiB)
    assert allocated(path) <= before - MiB
    assert path.read_bytes()[MiB:2 * MiB] == bytes(MiB)


def test_write_zeroes_without_unmap_keeps_the_blocks(sparse: Sparse) -> None:
    backend, path = sparse()
    before = allocated(path)
    assert one(backend, backend.write_zeroes, 0, MiB, False) == (OK, MiB)
    assert allocated(path) == before
    assert path.read_bytes()[:2 * MiB] == bytes(MiB) + b"\xff" * MiB


def test_nodelete_refuses_discard_and_never_deallocates(sparse: Sparse) -> None:
    backend, path = sparse(ImageOptions(nodelete=True))
    before = allocated(path)
    assert one(backend, backend.discard, 0, MiB) == (Status.UNSUPPORTED, 0)
    assert one(backend, backend.write_zeroes, 0, MiB, True) == (OK, MiB)
    assert allocated(path) == before
    assert path.read_bytes()[:MiB] == bytes(MiB)
    assert backend.stats()["unsupported"] == 1


def test_without_fallocate_write_zeroes_writes_zeros(sparse: Sparse,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(backend_module, "fallocate", unsupported)
    backend, path = sparse()
    length = 2 * backend_module.ZERO_CHUNK + 4096
    assert one(backend, backend.write_zeroes, 512, length, True) == (OK, length)
    assert one(backend, backend.discard, 0, 4096) == (Status.UNSUPPORTED, 0)
    assert one(backend, backend.write_zeroes, 0, 512, False) == (OK, 512)
    assert len(calls) == 2  # one try of each mode, then remembered
    content = path.read_bytes()
    assert content[:512 + length] == bytes(512 + length)
    assert len(content) == 4 * MiB


def test_write_zeroes_falls_back_on_tmpfs(sparse: Sparse) -> None:
    """tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    where = shm / f"hvf-block-test-{os.getpid()}"
    where.mkdir()
    try:
        backend, path = sparse(where=where)
        assert one(backend, backend.write_zeroes, 0, MiB, False) == (OK, MiB)
        assert one(backend, backend.discard, MiB, MiB) == (OK, MiB)
        assert path.read_bytes()[:2 * MiB] == bytes(2 * MiB)
        backend.close()
    finally:
        shutil.rmtree(where)


# ---- direct I/O ----


def test_nocache_moves_aligned_guest_ram_without_a_bounce(direct_dir: Path, make: Make,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    backend, path, data = make(options=ImageOptions(nocache=True), where=direct_dir)
    bounced: list[int] = []
    real = backend._bounce

    def bounce(length: int) -> memoryview:
        bounced.append(length)
        return real(length)

    monkeypatch.setattr(backend, "_bounce", bounce)
    ram = mmap.mmap(-1, 64 * KiB)
    views = [memoryview(ram)[:4096], memoryview(ram)[8192:16384]]
    assert one(backend, backend.read, 8192, views) == (OK, 12288)
    assert bytes(ram[:4096]) + bytes(ram[8192:16384]) == data[8192:20480]
    assert one(backend, backend.write, 0, views) == (OK, 12288)
    assert bounced == []
    assert file_bytes(path)[:12288] == data[8192:20480]
    del views
    ram.close()


def test_nocache_bounces_unaligned_buffers(direct_dir: Path, make: Make) -> None:
    backend, path, data = make(options=ImageOptions(nocache=True), where=direct_dir)
    ram = bytearray(20000)
    views = [memoryview(ram)[3:3 + 700], memoryview(ram)[1000:1000 + 3396]]
    assert one(backend, backend.read, 4096, views) == (OK, 4096)
    assert b"".join(views) == data[4096:8192]
    assert ram[:3] == bytes(3) and ram[703:1000] == bytes(297)
    assert one(backend, backend.write, MiB - 4096, views) == (OK, 4096)
    assert file_bytes(path)[-4096:] == data[4096:8192]


def test_nocache_refuses_unaligned_offsets_and_lengths(direct_dir: Path, make: Make) -> None:
    backend, path, _ = make(options=ImageOptions(nocache=True), where=direct_dir)
    assert backend.image.dio is not None
    align = backend.image.dio.offset
    misaligned = (Status.IO_ERROR, -errno.EINVAL)
    assert one(backend, backend.read, align // 2, [bytearray(align)]) == misaligned
    assert one(backend, backend.write, 0, [bytearray(align + 1)]) == misaligned
    assert one(backend, backend.write_zeroes, 0, align, False) == (OK, align)
    assert file_bytes(path)[:align] == bytes(align)


def test_nocache_write_zeroes_fallback_needs_alignment(direct_dir: Path, make: Make,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(backend_module, "fallocate", unsupported)
    backend, path, data = make(options=ImageOptions(nocache=True), where=direct_dir)
    assert backend.image.dio is not None
    align = backend.image.dio.offset
    assert one(backend, backend.write_zeroes, 1, align, False) == (Status.IO_ERROR,
                                                                    -errno.EINVAL)
    assert one(backend, backend.write_zeroes, align, 3 * align, True) == (OK, 3 * align)
    assert file_bytes(path) == data[:align] + bytes(3 * align) + data[4 * align:]


# ---- errors ----


@threads_only
def test_host_errors_complete_with_the_errno(make: Make, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    backend, _, _ = make()

    def full(fd: int, views: list[memoryview], offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full)
    with caplog.at_level(logging.WARNING, logger="hvf.block"):
        for _ in range(3):
            assert one(backend, backend.write, 0, [b"x"]) == (Status.IO_ERROR, -errno.ENOSPC)
    assert caplog.text.count("No space left on device") == 1
    assert backend.stats()["io_errors"] == 3


def test_an_image_that_shrank_reads_as_an_io_error(make: Make) -> None:
    backend, path, _ = make()
    os.truncate(path, MiB // 2)
    assert one(backend, backend.read, MiB - 4096, [bytearray(4096)]) == (Status.IO_ERROR,
                                                                          -errno.EIO)


@threads_only
def test_a_bug_in_a_request_or_a_callback_is_logged_and_survived(
        make: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    backend, _, _ = make(threads=1)

    def broken(*args: object) -> int:
        raise ValueError("boom")

    def raising(status: Status, nbytes: int) -> None:
        raise RuntimeError("callback boom")

    with caplog.at_level(logging.ERROR, logger="hvf.block"):
        monkeypatch.setattr(os, "preadv", broken)
        assert one(backend, backend.read, 0, [bytearray(1)]) == (Status.IO_ERROR, -errno.EIO)
        monkeypatch.undo()
        backend.flush(raising)
        assert backend.drain(timeout=30)
    assert "a read request failed" in caplog.text and "boom" in caplog.text
    assert "the completion of a flush request failed" in caplog.text
    assert one(backend, backend.read, 0, [bytearray(1)])[0] is OK


# ---- concurrency, drain, close ----


def test_many_requests_in_flight_complete_and_are_counted(make: Make) -> None:
    backend, path, _ = make(4 * MiB, threads=4)
    blocks = [random.Random(i).randbytes(4096) for i in range(1024)]
    done = Completions()
    for i, block in enumerate(blocks):
        backend.write(i * 4096, [block], done)
    assert backend.drain(timeout=60)
    assert done.results == [(OK, 4096)] * 1024
    ram = bytearray(4 * MiB)
    reads = Completions()
    for i in range(1024):
        backend.read(i * 4096, [memoryview(ram)[i * 4096:(i + 1) * 4096]], reads)
    assert backend.drain(timeout=60)
    assert ram == b"".join(blocks) == file_bytes(path)
    stats = backend.stats()
    assert stats == {**stats, "reads": 1024, "writes": 1024, "bytes_read": 4 * MiB,
                     "bytes_written": 4 * MiB, "io_errors": 0, "in_flight": 0}


def test_drain_waits_for_every_completion(make: Make) -> None:
    backend, _, _ = make(threads=2)
    release = threading.Event()
    finished = []

    def slow(status: Status, nbytes: int) -> None:
        release.wait(30)
        finished.append(status)

    for _ in range(4):
        backend.flush(slow)
    assert not backend.drain(timeout=0.05)
    assert backend.stats()["in_flight"] == 4
    release.set()
    assert backend.drain(timeout=30)
    assert finished == [OK] * 4 and backend.stats()["in_flight"] == 0


def test_close_drains_stops_the_workers_and_unlocks(make: Make) -> None:
    backend, path, _ = make()
    done = Completions()
    for i in range(50):
        backend.write(i * 512, [b"z" * 512], done)
    workers = [*backend._workers, *filter(None, [getattr(backend, "_reaper", None)])]
    backend.close()
    assert len(done.results) == 50 and not any(w.is_alive() for w in workers)
    assert backend.image.fd == -1
    with pytest.raises(RuntimeError, match="closed"):
        backend.read(0, [bytearray(1)], done)
    backend.close()
    open_image(path).close()


def test_a_back_end_needs_a_worker(tmp_path: Path) -> None:
    image = open_image(write_file(tmp_path / "d.img", bytes(4096)))
    with pytest.raises(ValueError, match="at least one worker"):
        BlockBackend(image, threads=0)
    image.close()
