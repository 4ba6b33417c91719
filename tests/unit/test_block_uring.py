# SPDX-License-Identifier: BSD-2-Clause
"""The io_uring engine's own paths: the kernel's errors as ``-errno``, short transfers
finished on the reaper, what goes to the worker instead, requests submitted from a
completion, and the engine choice (threads where io_uring cannot be set up).
tests/unit/test_block_backend.py runs the shared contract on both engines."""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from hvf.config import Config
from hvf.errors import ConfigError
from hvf.plugins.block import engine as engine_module
from hvf.plugins.block import uring
from hvf.plugins.block.backend import BlockBackend, Status
from hvf.plugins.block.engine import new_backend
from hvf.plugins.block.image import open_image
from hvf.plugins.block.options import ImageOptions
from hvf.plugins.block.uring import Ring, UringBackend

from test_block_backend import Completions, one

MiB = 1 << 20
OK = Status.OK


def _ring_works() -> bool:
    try:
        Ring(8).close()
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ring_works(), reason="no io_uring here")

Make = Callable[..., tuple[UringBackend, Path, bytes]]




@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """``make(options)``: a ring back end on a new 1 MiB file of random bytes."""
    backends: list[UringBackend] = []

    def build(options: ImageOptions | None = None) -> tuple[UringBackend, Path, bytes]:
        data = random.Random(len(backends)).randbytes(MiB)
        path = tmp_path / f"disk{len(backends)}.img"
        path.write_bytes(data)
        backends.append(UringBackend(open_image(path, options), Ring()))
        return backends[-1], path, data

    yield build
    for backend in backends:
        backend.close()


# ---- the kernel's errors ----


def test_a_write_on_a_read_only_descriptor_is_ebadf_logged_once(
        make: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend, path, data = make()
    read_only = os.open(path, os.O_RDONLY)
    backend._fd = read_only
    try:
        with caplog.at_level(logging.WARNING, logger="hvf.block"):
            for _ in range(3):
                assert one(backend, backend.write, 0, [b"x" * 512]) == (Status.IO_ERROR,
                                                                         -errno.EBADF)
        ram = bytearray(512)
        assert one(backend, backend.read, 512, [ram]) == (OK, 512) and ram == data[512:1024]
    finally:
        os.close(read_only)
        backend._fd = backend.image.fd
    assert caplog.text.count(os.strerror(errno.EBADF)) == 1
    assert backend.stats()["io_errors"] == 3 and backend.stats()["writes"] == 3
    assert path.read_bytes() == data


def test_a_closed_descriptor_fails_reads_writes_and_flushes(make: Make) -> None:
    backend, path, data = make()
    closed = os.dup(backend.image.fd)
    os.close(closed)
    backend._fd = closed
    try:
        bad = (Status.IO_ERROR, -errno.EBADF)
        assert one(backend, backend.read, 0, [bytearray(4096)]) == bad
        assert one(backend, backend.write, 0, [b"y" * 4096]) == bad
        assert one(backend, backend.flush) == bad
    finally:
        backend._fd = backend.image.fd
    assert backend.stats()["io_errors"] == 3
    assert path.read_bytes() == data


# ---- short transfers ----


def test_short_transfers_are_finished_on_the_reaper(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    real_reap = Ring.reap

    def short(self: Ring) -> Iterable[tuple[int, int]]:
        return [(tag, min(result, 100)) for tag, result in real_reap(self)]

    calls: list[str] = []

    def counted(real: Callable[..., int]) -> Callable[..., int]:
        def call(fd: int, views: list[memoryview], offset: int) -> int:
            calls.append(threading.current_thread().name)
            return real(fd, views, offset)
        return call

    monkeypatch.setattr(Ring, "reap", short)
    monkeypatch.setattr(os, "preadv", counted(os.preadv))
    monkeypatch.setattr(os, "pwritev", counted(os.pwritev))
    backend, path, data = make()
    ram = bytearray(3000)
    views = [memoryview(ram)[:1], memoryview(ram)[1:250], memoryview(ram)[250:]]
    assert one(backend, backend.read, 10, views) == (OK, 3000)
    assert ram == data[10:3010]
    assert one(backend, backend.write, 0, [b"x" * 1234, b"y" * 7]) == (OK, 1241)
    assert path.read_bytes()[:1241] == b"x" * 1234 + b"y" * 7
    assert set(calls) == {f"hvf block ring {backend.name}"} and len(calls) == 2
    assert backend.stats()["bytes_read"] == 3000 and backend.stats()["bytes_written"] == 1241


def test_a_read_across_the_end_of_a_shrunken_image_is_an_io_error(make: Make) -> None:
    backend, path, data = make()
    os.truncate(path, MiB - 2048)
    ram = bytearray(4096)
    assert one(backend, backend.read, MiB - 4096, [ram]) == (Status.IO_ERROR, -errno.EIO)
    assert ram[:2048] == data[MiB - 4096:MiB - 2048]


# ---- what the worker takes ----


def test_a_full_ring_hands_requests_to_the_worker(make: Make) -> None:
    backend, _, data = make()
    backend._depth = 0
    done = Completions()
    ram = bytearray(8192)
    backend.read(0, [memoryview(ram)[:4096]], done)
    backend.write(8192, [b"z" * 4096], done)
    backend.flush(done)
    assert backend.drain(timeout=30)
    assert done.results == [(OK, 4096), (OK, 4096), (OK, 0)]
    assert done.threads == {f"hvf block 0 {backend.name}"}
    assert ram[:4096] == data[:4096]


def test_a_read_only_image_reads_on_the_ring(make: Make) -> None:
    backend, _, data = make(ImageOptions(readonly=True))
    done = Completions()
    ram = bytearray(4096)
    backend.read(4096, [ram], done)
    backend.flush(done)
    assert backend.drain(timeout=30)
    assert sorted(done.results) == [(OK, 0), (OK, 4096)] and ram == data[4096:8192]
    assert f"hvf block ring {backend.name}" in done.threads


# ---- completions ----


def test_a_completion_may_submit_and_a_failing_one_is_survived(
        make: Make, caplog: pytest.LogCaptureFixture) -> None:
    backend, _, _ = make()
    flushed = Completions()

    def then_flush(status: Status, nbytes: int) -> None:
        backend.flush(flushed)

    def raising(status: Status, nbytes: int) -> None:
        raise RuntimeError("callback boom")

    with caplog.at_level(logging.ERROR, logger="hvf.block"):
        backend.write(0, [b"w" * 512], then_flush)
        backend.read(0, [bytearray(512)], raising)
        assert backend.drain(timeout=30)
    assert backend.drain(timeout=30) and flushed.results == [(OK, 0)]
    assert "the completion of a read request failed" in caplog.text
    assert backend.stats()["flushes"] == 1 and backend.stats()["in_flight"] == 0


# ---- the engine choice ----


def test_the_engine_is_the_disks_aio_option(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    for values, expected in [({"aio": "threads"}, BlockBackend),
                             ({"aio": "io_uring"}, UringBackend), ({}, BlockBackend)]:
        options = ImageOptions.from_config(Config(values))
        backend = new_backend(open_image(path, options), threads=3, name="d")
        try:
            assert type(backend) is expected
            assert one(backend, backend.read, 0, [bytearray(512)]) == (OK, 512)
        finally:
            backend.close()


def test_an_unknown_aio_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="invalid aio 'native': threads or io_uring"):
        ImageOptions.from_config(Config({"aio": "native"}))


def test_without_io_uring_the_back_end_uses_threads(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def refused(entries: int = 0) -> Ring:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(uring, "Ring", refused)
    monkeypatch.setattr(engine_module, "_refused", set())
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    options = ImageOptions(aio="io_uring")
    with caplog.at_level(logging.WARNING, logger="hvf.block"):
        for _ in range(2):
            backend = new_backend(open_image(path, options), threads=3, name="d")
            assert type(backend) is BlockBackend and len(backend._workers) == 3
            assert one(backend, backend.read, 0, [bytearray(512)]) == (OK, 512)
            backend.close()
    assert caplog.text.count("disks use worker threads") == 1
