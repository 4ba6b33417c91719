# SPDX-License-Identifier: BSD-2-Clause
"""Guest RAM to and from a raw, sparse file.

The RAM file is the guest's memfd byte for byte (low memory, then memory above 4 GiB,
as :mod:`hvf.memory` lays it out), with no header, so it can be mapped straight back.
Zero memory becomes holes: the file's apparent size is the RAM size, its allocated
blocks only the pages that hold data.

Saving skips what the memfd never had (``SEEK_DATA``/``SEEK_HOLE`` on ``memory.fd``),
then within the data it has compares 64 KiB blocks, and inside a non-zero block each
4 KiB page, against zeros (a copy and a ``memcmp``), and ``pwrite``\\ s runs of non-zero
pages from the shared mapping.

The checksum (``crc32-runs``) covers only what is written, so it costs no extra pass
over memory: a CRC-32 over every maximal run of non-zero 4 KiB pages in address order,
each run's bytes followed by its start offset and length (u64 little-endian each).
Zero pages contribute nothing, so it does not depend on how sparse a copy of the file
is. Restoring maps the file lazily and does not check it (that would read it all);
:func:`verify_ram` does, for a ``snapshot verify`` command or a test.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from hvf.errors import SnapshotError
from hvf.plugins.snapshot.statefile import fsync_dir, temp_name

PAGE = 4096
BLOCK = 64 * 1024
#: Largest single pwrite; a longer run of data is written in pieces.
WRITE_CHUNK = 8 * 1024 * 1024
#: Progress is reported about this often (bytes of guest RAM scanned).
PROGRESS_STEP = 64 * 1024 * 1024
CHECKSUM_ALGORITHM = "crc32-runs"

_ZERO_BLOCK = bytes(BLOCK)
_ZERO_PAGE = bytes(PAGE)
_RUN_TRAILER = struct.Struct("<QQ")

Progress = Callable[[int, int], None]


class RamSource(Protocol):
    """What :func:`save_ram` needs of guest memory (:class:`hvf.memory.GuestMemory`)."""

    size: int
    fd: int | None
    view: memoryview


def _data_extents(fd: int | None, size: int) -> Iterator[tuple[int, int]]:
    """Page-aligned [start, end) ranges of ``fd`` that may hold data; all if unknown."""
    if fd is not None:
        try:
            pos = os.lseek(fd, 0, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at all
                return
            pos = -1  # SEEK_DATA unsupported here: scan everything
        if pos >= 0:
            last = 0
            while pos < size:
                try:
                    hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
                except OSError:
                    hole = size
                start = max(pos - pos % PAGE, last)  # whole pages, each once
                end = min(-(-hole // PAGE) * PAGE, size)
                if end > start:
                    yield start, end
                    last = end
                try:
                    pos = os.lseek(fd, hole, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        return
                    raise
            return
    yield 0, size


class _Checksummer:
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


class _Writer:
    """Collects runs of non-zero pages, writes them and folds them into the CRC."""

    def __init__(self, out: int | None, view: memoryview, checksum: bool = True) -> None:
        self.out = out
        self.view = view
        self.checksum = checksum
        self._summer = _Checksummer() if checksum else None
        self.data_bytes = 0
        self.run_start = -1  # start of the open run of non-zero pages, -1 if none
        self.done = 0  # the open run is written and summed up to here
        self.end = 0  # and extends to here

    def page(self, start: int, end: int) -> None:
        """[start, end) is non-zero; extend the open run or start a new one."""
        if self.run_start >= 0 and start == self.end:
            self.end = end
            if self.end - self.done >= WRITE_CHUNK:
                self._flush()
            return
        self.close_run()
        self.run_start = self.done = start
        self.end = end

    def _flush(self) -> None:
        piece = self.view[self.done:self.end]
        if self._summer is not None:
            self._summer.add(piece)
        if self.out is not None:
            offset = self.done
            while piece:
                n = os.pwrite(self.out, piece, offset)
                piece, offset = piece[n:], offset + n
        self.data_bytes += self.end - self.done
        self.done = self.end

    def close_run(self) -> None:
        if self.run_start < 0:
            return
        self._flush()
        if self._summer is not None:
            self._summer.add(_RUN_TRAILER.pack(self.run_start, self.end - self.run_start))
        self.run_start = -1

    def discard(self) -> None:
        """Stop the checksum thread of a write that failed."""
        if self._summer is not None:
            self._summer.result()

    @property
    def crc(self) -> int:
        """The checksum of everything written (call once, after the last run)."""
        assert self._summer is not None
        return self._summer.result()


def _non_zero_pages(block: bytes, base: int, writer: _Writer) -> None:
    """Hand ``writer`` the non-zero pages of ``block`` (at guest offset ``base``).

    Zero pages are found with ``bytes.find`` (a C scan) rather than page by page: a
    block of data with no zero page costs one search.
    """
    n = len(block)
    pending = cursor = 0  # pending: start of the unwritten non-zero stretch
    while True:
        z = block.find(_ZERO_PAGE, cursor)
        if z < 0:
            break
        aligned = z + (-z % PAGE)
        if aligned + PAGE > n:
            break
        if aligned == z or block.startswith(_ZERO_PAGE, aligned):
            if aligned > pending:
                writer.page(base + pending, base + aligned)
            pending = cursor = aligned + PAGE
        else:
            cursor = aligned
    if pending < n and block[pending:] != bytes(n - pending):
        writer.page(base + pending, base + n)


def _scan(fd: int | None, view: memoryview, size: int, writer: _Writer,
          progress: Progress | None) -> None:
    next_report = PROGRESS_STEP
    if progress:
        progress(0, size)
    for start, end in _data_extents(fd, size):
        for off in range(start, end, BLOCK):
            if progress and off >= next_report:
                progress(off, size)
                next_report = off + PROGRESS_STEP
            n = min(BLOCK, end - off)
            block = view[off:off + n].tobytes()
            if block == (_ZERO_BLOCK if n == BLOCK else bytes(n)):
                continue
            _non_zero_pages(block, off, writer)
    writer.close_run()
    if progress:
        progress(size, size)


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
    fd = getattr(memory, "fd", None)
    tmp = temp_name(path)
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SnapshotError(f"cannot create RAM file in {path.parent}: {e.strerror}") from None
    try:
        try:
            os.ftruncate(out, size)
            writer = _Writer(out, memory.view, checksum)
            try:
                _scan(fd, memory.view, size, writer, progress)
            except BaseException:
                writer.discard()
                raise
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise SnapshotError(f"cannot write guest RAM to {path}: {e.strerror or e}") from None
        raise
    info: dict[str, Any] = {"size": size, "data_bytes": writer.data_bytes, "page_size": PAGE}
    if checksum:
        info["checksum"] = {"algorithm": CHECKSUM_ALGORITHM, "value": writer.crc}
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


def map_ram(path: Path, size: int) -> mmap.mmap:
    """Map a RAM file copy-on-write (``MAP_PRIVATE``); the file is never modified.

    The file must be exactly ``size`` bytes: touching a page beyond the end of a
    shorter file would kill the VM with SIGBUS. Pages load from the file on first
    touch; nothing is read up front. The caller keeps the mapping alive.
    """
    path = Path(path)
    if size <= 0 or size % mmap.PAGESIZE:
        raise SnapshotError(f"RAM file {path}: bad guest RAM size {size}")
    fd, actual = _open_ram(path)
    try:
        if actual != size:
            raise SnapshotError(f"RAM file {path} is {actual} bytes but the snapshot's guest "
                                f"RAM is {size} bytes (truncated or the wrong file)")
        return mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise SnapshotError(f"cannot map RAM file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


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
                writer = _Writer(None, view)
                _scan(fd, view, size, writer, None)
                return writer.crc
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
