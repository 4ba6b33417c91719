# SPDX-License-Identifier: BSD-2-Clause
"""Guest RAM to and from a raw, sparse file.

The RAM file is the guest's memory byte for byte (low memory, then memory above 4 GiB,
as :mod:`hvf.memory` lays it out), with no header, so it can be mapped straight back.
Zero memory becomes holes: the file's apparent size is the RAM size, its allocated
blocks only the pages that hold data.

Saving reads only where guest RAM may hold data (:meth:`GuestMemory.data_extents`:
the memfd's data, or a restored guest's file data and private pages); there a C scan
(:mod:`hvf._pages`) finds the runs of non-zero 4 KiB pages, which a few threads
``pwrite`` straight from guest memory, with ``O_DIRECT`` where the file system takes
it: the data goes to disk once, without a second copy in the page cache, and the
closing ``fsync`` has little left to do.

The checksum (``crc32-runs``) covers only what is written, so it costs no extra pass
over memory: a CRC-32 over every maximal run of non-zero 4 KiB pages in address order,
each run's bytes followed by its start offset and length (u64 little-endian each).
Zero pages contribute nothing, so it does not depend on how sparse a copy of the file
is. Restoring maps the file lazily and does not check it (that would read it all);
:func:`verify_ram` does, for ``hvf snapshot verify``.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import stat
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from hvf._pages import ffi, lib
from hvf.errors import SnapshotError
from hvf.extents import PAGE, file_extents
from hvf.plugins.snapshot.statefile import fsync_dir, temp_name

#: Largest single pwrite; a longer run of data is written in pieces.
WRITE_CHUNK = 8 * 1024 * 1024
#: Threads writing pieces at once (the disk sees this queue depth).
WRITERS = 4
#: Progress is reported about this often (bytes of guest RAM scanned).
PROGRESS_STEP = 64 * 1024 * 1024
CHECKSUM_ALGORITHM = "crc32-runs"

_RUN_TRAILER = struct.Struct("<QQ")

Progress = Callable[[int, int], None]


class RamSource(Protocol):
    """What :func:`save_ram` needs of guest memory (:class:`hvf.memory.GuestMemory`)."""

    size: int
    view: memoryview

    def data_extents(self) -> Iterable[tuple[int, int]]: ...


class Checksummer:
    """Folds pieces into a running CRC-32 on a thread of its own, in order, so the
    checksum costs no time beside the writes (zlib and pwrite both release the GIL)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()
        self._crc = 0
        self._thread = threading.Thread(target=self._run, name="hvf ram checksum", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            self._crc = zlib.crc32(piece, self._crc)

    def add(self, piece: bytes | memoryview) -> None:
        self._queue.put(piece)

    def result(self) -> int:
        self._queue.put(None)
        self._thread.join()
        return self._crc


def _pwrite_all(fd: int, piece: memoryview, offset: int) -> None:
    while piece:
        n = os.pwrite(fd, piece, offset)
        piece, offset = piece[n:], offset + n


class FileWriter:
    """Writes pieces of guest RAM into a new file on :data:`WRITERS` threads.

    Pieces aligned to the file system's block size go through a second descriptor
    opened with ``O_DIRECT``; the rest, or everything where ``O_DIRECT`` is refused
    (tmpfs, some network file systems), through the buffered one.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            os.close(self.fd)
            os.unlink(path)
            raise
        self._direct_fd: int | None = None
        try:
            self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            pass  # not on this file system: buffered only
        self.direct = self._direct_fd is not None
        self.align = max(os.fstat(self.fd).st_blksize, PAGE)
        self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="hvf ram write")
        self._pending: deque[Future[None]] = deque()

    def write(self, piece: memoryview, offset: int) -> None:
        """Queue ``piece`` (a view the caller keeps valid) for ``offset``; raises the
        error of an earlier write that failed."""
        while len(self._pending) >= 2 * WRITERS:  # the scan waits for the disk, so
            self._pending.popleft().result()  # progress is progress; errors stop it
        self._pending.append(self._pool.submit(self._write, piece, offset))

    def _write(self, piece: memoryview, offset: int) -> None:
        if self.direct and offset % self.align == 0 and len(piece) % self.align == 0:
            assert self._direct_fd is not None
            try:
                _pwrite_all(self._direct_fd, piece, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # refused after all: buffered from now on
        _pwrite_all(self.fd, piece, offset)

    def finish(self) -> None:
        """Wait for every write, then make the file durable."""
        self._pool.shutdown(wait=True)
        for f in self._pending:
            f.result()
        os.fsync(self.fd)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in (self.fd, self._direct_fd):
            if fd is not None:
                os.close(fd)


class _Runs:
    """Collects runs of non-zero pages, hands them to the writer in pieces of at most
    :data:`WRITE_CHUNK`, and folds them into the CRC."""

    def __init__(self, out: FileWriter | None, view: memoryview, checksum: bool = True) -> None:
        self.out = out
        self.view = view
        self._summer = Checksummer() if checksum else None
        self.data_bytes = 0
        self.run_start = -1  # start of the open run of non-zero pages, -1 if none
        self.done = 0  # the open run is written and summed up to here
        self.end = 0  # and extends to here

    def add(self, start: int, end: int) -> None:
        """[start, end) is non-zero; extend the open run or start a new one."""
        if self.run_start < 0 or start != self.end:
            self.close_run()
            self.run_start = self.done = start
        self.end = end
        while self.end - self.done >= WRITE_CHUNK:
            self._flush(self.done + WRITE_CHUNK)

    def _flush(self, upto: int) -> None:
        piece = self.view[self.done:upto]
        if self._summer is not None:
            self._summer.add(piece)
        if self.out is not None:
            self.out.write(piece, self.done)
        self.data_bytes += upto - self.done
        self.done = upto

    def close_run(self) -> None:
        if self.run_start < 0:
            return
        if self.end > self.done:
            self._flush(self.end)
        if self._summer is not None:
            self._summer.add(_RUN_TRAILER.pack(self.run_start, self.end - self.run_start))
        self.run_start = -1

    def discard(self) -> None:
        """Stop the checksum thread of a save that failed."""
        if self._summer is not None:
            self._summer.result()

    @property
    def crc(self) -> int:
        """The checksum of everything written (call once, after the last run)."""
        assert self._summer is not None
        return self._summer.result()


def _scan(view: memoryview, extents: Iterable[tuple[int, int]], size: int, runs: _Runs,
          progress: Progress | None) -> None:
    """Hand ``runs`` every run of non-zero pages inside ``extents`` (page-aligned)."""
    memory = ffi.from_buffer("unsigned char[]", view)
    run_end = ffi.new("size_t *")
    next_report = PROGRESS_STEP
    if progress:
        progress(0, size)
    for start, end in extents:
        for lo in range(start, end, PROGRESS_STEP):
            if progress and lo >= next_report:
                progress(lo, size)
                next_report = lo + PROGRESS_STEP
            npages = (min(lo + PROGRESS_STEP, end) - lo) // PAGE
            base = memory + lo
            i = 0
            while (i := lib.hvf_nonzero_run(base, npages, i, run_end)) < npages:
                runs.add(lo + i * PAGE, lo + run_end[0] * PAGE)
                i = run_end[0]
    runs.close_run()
    if progress:
        progress(size, size)


@contextlib.contextmanager
def published(tmp: Path, path: Path, what: str) -> Iterator[None]:
    """Rename ``tmp`` over ``path`` durably once the body has written it; on any
    failure remove ``tmp``, an ``OSError`` reported as "cannot write ``what``"."""
    try:
        yield
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise SnapshotError(f"cannot write {what}: {e.strerror or e}") from None
        raise


def check_file(path: Path, size: int, what: str, *, missing: str, recorded: str) -> None:
    """Refuse ``path`` (the ``what``) unless it is a regular file of ``size`` bytes;
    ``missing`` is the error if it is absent, ``recorded`` says who expects ``size``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SnapshotError(missing) from None
    except OSError as e:
        raise SnapshotError(f"{path}: cannot stat {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{path}: the {what} is not a regular file")
    if st.st_size != size:
        raise SnapshotError(f"{path}: the {what} is {st.st_size} bytes but {recorded} "
                            f"{size} (truncated or replaced)")


def save_ram(memory: RamSource, path: Path, *, progress: Progress | None = None,
             checksum: bool = True) -> dict[str, Any]:
    """Write guest RAM to ``path`` sparsely and atomically; the manifest's ``ram`` facts.

    ``progress(done, total)`` is called now and then with bytes of RAM scanned. Returns
    ``{"size", "data_bytes", "page_size", "checksum": {"algorithm", "value"}}``; without
    ``checksum`` (about 0.35 s of CPU per GiB of data, on a thread beside the writes)
    the last key is left out.
    """
    path = Path(path)
    size = memory.size
    tmp = temp_name(path)
    try:
        out = FileWriter(tmp, size)
    except OSError as e:
        raise SnapshotError(f"cannot create RAM file in {path.parent}: {e.strerror}") from None
    with published(tmp, path, f"guest RAM to {path}"):
        try:
            runs = _Runs(out, memory.view, checksum)
            try:
                _scan(memory.view, memory.data_extents(), size, runs, progress)
                out.finish()
            except BaseException:
                runs.discard()
                raise
        finally:
            out.close()
    info: dict[str, Any] = {"size": size, "data_bytes": runs.data_bytes, "page_size": PAGE}
    if checksum:
        info["checksum"] = {"algorithm": CHECKSUM_ALGORITHM, "value": runs.crc}
    return info


def _open_ram(path: Path) -> tuple[int, int]:
    """Open a RAM file read-only; (fd, size). It must be a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot open RAM file {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SnapshotError(f"RAM file {path} is not a regular file")
    return fd, st.st_size


def open_ram(path: Path, size: int) -> int:
    """Open a RAM file to run a guest from; the descriptor, read-only.

    :class:`hvf.memory.GuestMemory` maps it copy-on-write, so that pages load on first
    touch and the file is never modified. The file must be exactly ``size`` bytes:
    touching a page beyond the end of a shorter file would kill the VM with SIGBUS.
    """
    path = Path(path)
    if size <= 0 or size % mmap.PAGESIZE:
        raise SnapshotError(f"RAM file {path}: bad guest RAM size {size}")
    fd, actual = _open_ram(path)
    if actual != size:
        os.close(fd)
        raise SnapshotError(f"RAM file {path} is {actual} bytes but the snapshot's guest "
                            f"RAM is {size} bytes (truncated or the wrong file)")
    return fd


def ram_checksum(path: Path, size: int) -> int:
    """Recompute the ``crc32-runs`` checksum of a RAM file (reads all its data)."""
    path = Path(path)
    fd, actual = _open_ram(path)
    try:
        if actual != size:
            raise SnapshotError(f"RAM file {path} is {actual} bytes, expected {size}")
        if size == 0:
            return 0
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                runs = _Runs(None, view)
                _scan(view, file_extents(fd, size), size, runs, None)
                return runs.crc
            finally:
                view.release()
    except OSError as e:
        raise SnapshotError(f"cannot read RAM file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def verify_ram(path: Path, info: dict[str, Any]) -> None:
    """Check a RAM file against the ``ram`` facts :func:`save_ram` returned."""
    size = info.get("size")
    check = info.get("checksum")
    if not isinstance(size, int) or isinstance(size, bool):
        raise SnapshotError(f"RAM file {path}: the snapshot records no valid size")
    if not isinstance(check, dict) or check.get("algorithm") != CHECKSUM_ALGORITHM:
        raise SnapshotError(f"RAM file {path}: no {CHECKSUM_ALGORITHM} checksum recorded")
    got = ram_checksum(path, size)
    if got != check.get("value"):
        raise SnapshotError(f"RAM file {path}: checksum mismatch (recorded "
                            f"{check.get('value')!r}, computed {got}); the file is corrupt")
