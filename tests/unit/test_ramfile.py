# SPDX-License-Identifier: BSD-2-Clause
"""Guest RAM files: sparse saves, copy-on-write mapping, checksums, failures."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import attrs
import pytest
from hvf import extents
from hvf._pages import ffi
from hvf.errors import SnapshotError
from hvf.memory import GuestMemory, MiB
from hvf.plugins.snapshot import ramfile
from hvf.plugins.snapshot.ramfile import (
    PAGE,
    open_ram,
    ram_checksum,
    save_ram,
    verify_ram,
)

SIZE = 64 * MiB


@attrs.define
class AnonMemory:
    """Guest memory that cannot say where its data lies: save_ram scans all of it."""

    size: int
    map: mmap.mmap
    view: memoryview

    @classmethod
    def new(cls, size: int) -> AnonMemory:
        m = mmap.mmap(-1, size)
        return cls(size, m, memoryview(m))

    def data_extents(self) -> list[tuple[int, int]]:
        return [(0, self.size)]


def restored(path: Path, size: int) -> GuestMemory:
    """Guest memory running from a RAM file, as ``hvf -r`` builds it."""
    return GuestMemory(size, open_ram(path, size))


def scribble(mem: Any) -> dict[int, bytes]:
    """Data at the edges, across block boundaries, and zeros written over a page."""
    writes = {
        0: b"first byte",
        PAGE - 3: b"straddles two pages",
        65536 - 2: os.urandom(PAGE * 3),  # crosses a 64 KiB block boundary
        5 * MiB: os.urandom(3 * MiB),  # a long run
        20 * MiB: bytes(PAGE * 4),  # touched but zero: must stay a hole
        SIZE - 5: b"last!",
    }
    for off, data in writes.items():
        mem.view[off:off + len(data)] = data
    return writes


def test_sparse_save_round_trips(tmp_path: Path) -> None:
    mem = GuestMemory(SIZE)
    scribble(mem)
    path = tmp_path / "ram"
    info = save_ram(mem, path)
    st = path.stat()
    assert st.st_size == SIZE
    assert info["size"] == SIZE and info["page_size"] == PAGE
    # pages with data: 1 + 1 (straddle) + 4 (3 pages across a boundary) + 768 + 1
    assert info["data_bytes"] == (1 + 1 + 4 + 768 + 1) * PAGE
    assert st.st_blocks * 512 <= info["data_bytes"] + 256 * 1024  # a little fs slack
    assert restored(path, SIZE).map[:] == mem.map[:]
    assert oct(st.st_mode & 0o777) == oct(0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["ram"]


def test_mostly_zero_memory_is_mostly_holes(tmp_path: Path) -> None:
    mem = GuestMemory(256 * MiB)
    mem.write(100 * MiB, b"x")
    mem.view[0:MiB] = bytes(MiB)  # allocated in the memfd, but zero
    info = save_ram(mem, tmp_path / "ram")
    assert info["data_bytes"] == PAGE
    assert (tmp_path / "ram").stat().st_blocks * 512 <= 64 * 1024


def test_empty_memory(tmp_path: Path) -> None:
    mem = GuestMemory(4 * MiB)
    info = save_ram(mem, tmp_path / "ram")
    assert info["data_bytes"] == 0 and (tmp_path / "ram").stat().st_blocks == 0
    verify_ram(tmp_path / "ram", info)


def test_fallback_without_memfd_matches(tmp_path: Path) -> None:
    memfd = GuestMemory(SIZE)
    anon = AnonMemory.new(SIZE)
    for off, data in scribble(memfd).items():
        anon.view[off:off + len(data)] = memfd.view[off:off + len(data)]
    a = save_ram(memfd, tmp_path / "a")
    b = save_ram(anon, tmp_path / "b")
    assert a == b
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def test_long_runs_are_written_in_pieces_with_the_same_checksum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = GuestMemory(SIZE)
    scribble(mem)
    a = save_ram(mem, tmp_path / "a")
    writes: list[tuple[int, bool]] = []
    real = os.pwrite

    def counting(fd: int, data: Any, off: int) -> int:
        writes.append((len(data), is_direct(fd)))
        return real(fd, data, off)
    monkeypatch.setattr(ramfile, "WRITE_CHUNK", 64 * 1024)
    monkeypatch.setattr(os, "pwrite", counting)
    b = save_ram(mem, tmp_path / "b")
    assert a == b and max(n for n, _ in writes) == 64 * 1024
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    if direct_io_works(tmp_path):
        assert all(direct for _, direct in writes)  # every piece is block-aligned


def direct_io_works(where: Path) -> bool:
    try:
        fd = os.open(where / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, PAGE)
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(where / "probe")


def test_direct_io_refused_on_write_falls_back_to_buffered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = GuestMemory(SIZE)
    scribble(mem)
    a = save_ram(mem, tmp_path / "a")
    real = os.pwrite
    buffered: list[int] = []

    def no_direct(fd: int, data: Any, off: int) -> int:
        if is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        buffered.append(len(data))
        return real(fd, data, off)
    monkeypatch.setattr(os, "pwrite", no_direct)
    b = save_ram(mem, tmp_path / "b")
    assert a == b and sum(buffered) == a["data_bytes"]
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ramfile, "PROGRESS_STEP", 4 * MiB)
    mem = GuestMemory(SIZE)
    mem.view[:] = b"\x01" * SIZE
    calls: list[tuple[int, int]] = []
    save_ram(mem, tmp_path / "ram", progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, SIZE) and calls[-1] == (SIZE, SIZE)
    assert len(calls) >= 10
    assert all(t == SIZE for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_map_is_copy_on_write(tmp_path: Path) -> None:
    mem = GuestMemory(4 * MiB)
    mem.write(0x2000, b"original")
    path = tmp_path / "ram"
    save_ram(mem, path)
    before = path.read_bytes()
    m = restored(path, 4 * MiB).map
    assert m[0x2000:0x2008] == b"original"
    m[0x2000:0x2008] = b"modified"
    m[3 * MiB] = 0xFF  # a hole in the file
    m.flush()
    assert m[0x2000:0x2008] == b"modified" and m[3 * MiB] == 0xFF
    assert path.read_bytes() == before
    assert restored(path, 4 * MiB).map[0x2000:0x2008] == b"original"


def test_map_size_mismatch(tmp_path: Path) -> None:
    mem = GuestMemory(4 * MiB)
    save_ram(mem, tmp_path / "ram")
    with pytest.raises(SnapshotError, match=r"ram is 4194304 bytes but the snapshot's guest "
                       r"RAM is 8388608 bytes"):
        open_ram(tmp_path / "ram", 8 * MiB)
    os.truncate(tmp_path / "ram", 2 * MiB)
    with pytest.raises(SnapshotError, match="2097152 bytes but .* 4194304 bytes"):
        open_ram(tmp_path / "ram", 4 * MiB)
    with pytest.raises(SnapshotError, match="cannot open RAM file .*No such file"):
        open_ram(tmp_path / "nope", 4 * MiB)
    with pytest.raises(SnapshotError, match="not a regular file"):
        open_ram(tmp_path, 4 * MiB)
    with pytest.raises(SnapshotError, match="bad guest RAM size 0"):
        open_ram(tmp_path / "ram", 0)


def test_verify_detects_corruption_and_ignores_sparseness(tmp_path: Path) -> None:
    mem = GuestMemory(SIZE)
    scribble(mem)
    path = tmp_path / "ram"
    info = save_ram(mem, path)
    verify_ram(path, info)
    dense = tmp_path / "dense"
    shutil.copyfile(path, dense)  # not sparse: the zeros are real blocks now
    with open(dense, "r+b") as f:
        f.seek(30 * MiB)
        f.write(bytes(MiB))
    verify_ram(dense, info)
    assert ram_checksum(dense, SIZE) == info["checksum"]["value"]
    with open(dense, "r+b") as f:
        f.seek(5 * MiB + 12345)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SnapshotError, match="dense: checksum mismatch"):
        verify_ram(dense, info)
    bare = save_ram(mem, tmp_path / "bare", checksum=False)
    assert "checksum" not in bare and bare["data_bytes"] == info["data_bytes"]
    with pytest.raises(SnapshotError, match="no crc32-runs checksum"):
        verify_ram(tmp_path / "bare", bare)


def test_checksum_covers_where_data_lies(tmp_path: Path) -> None:
    sums = []
    for off in (0, PAGE, 64 * PAGE):
        mem = GuestMemory(MiB)
        mem.write(off, b"same bytes")
        sums.append(save_ram(mem, tmp_path / "ram")["checksum"]["value"])
    assert len(set(sums)) == 3


def test_failed_save_leaves_nothing_and_keeps_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = GuestMemory(4 * MiB)
    mem.write(0, b"old")
    path = tmp_path / "ram"
    save_ram(mem, path)
    old = path.read_bytes()
    mem.write(0, b"new")

    def boom(*a: Any) -> int:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", boom)
    with pytest.raises(SnapshotError, match=rf"cannot write guest RAM to {path}: No space"):
        save_ram(mem, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ram"]
    assert path.read_bytes() == old


def extent_bytes(mem: GuestMemory) -> int:
    return sum(end - start for start, end in mem.data_extents())


def test_save_of_a_restored_guest_reads_only_file_data_and_private_pages(
        tmp_path: Path) -> None:
    size = 256 * MiB
    mem = GuestMemory(size)
    mem.write(0, b"boot")
    mem.view[64 * MiB:72 * MiB] = os.urandom(8 * MiB)
    save_ram(mem, tmp_path / "first")
    again = restored(tmp_path / "first", size)
    assert extent_bytes(again) == 8 * MiB + PAGE  # the file's data, nothing private yet
    assert again.map[100 * MiB:164 * MiB] == bytes(64 * MiB)  # reading holes copies nothing
    assert extent_bytes(again) == 8 * MiB + PAGE
    # Private pages: new data in a hole, data overwritten, data zeroed.
    writes = {200 * MiB: b"new", 64 * MiB + 5: b"changed", 70 * MiB: bytes(2 * MiB)}
    for off, data in writes.items():
        again.write(off, data)
        mem.write(off, data)
    assert 8 * MiB + 2 * PAGE <= extent_bytes(again) <= 8 * MiB + PAGE + 2 * extents.COALESCE
    info = save_ram(again, tmp_path / "second")
    assert info == save_ram(mem, tmp_path / "expected")
    assert info["data_bytes"] == 6 * MiB + 2 * PAGE
    assert restored(tmp_path / "second", size).map[:] == mem.map[:]


def test_private_extents_merge_close_runs() -> None:
    size = 64 * MiB
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE)  # anonymous: every touched page is private
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
    for off in (0, 3 * PAGE, 10 * MiB, 10 * MiB + extents.COALESCE + PAGE, size - PAGE):
        m[off] = 1
    assert extents.private_extents(addr, size) == [
        (0, 4 * PAGE), (10 * MiB, 10 * MiB + PAGE),
        (10 * MiB + extents.COALESCE + PAGE, 10 * MiB + extents.COALESCE + 2 * PAGE),
        (size - PAGE, size)]
    assert extents.private_extents(addr, size, pagemap="/nonexistent") == [(0, size)]


def test_union_of_extents() -> None:
    assert list(extents.union([(0, 4), (10, 20)], [(2, 6), (20, 30), (40, 50)], [])) == [
        (0, 6), (10, 30), (40, 50)]
    assert list(extents.union([], [])) == []
