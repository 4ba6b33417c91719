# SPDX-License-Identifier: BSD-2-Clause
"""Snapshot directories: save, load, replacement, crashes and hostile RAM names."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hvf import cli
from hvf.errors import SnapshotError
from hvf.memory import GuestMemory, MiB
from hvf.plugins.snapshot import store as store_mod
from hvf.plugins.snapshot.ramfile import open_ram
from hvf.plugins.snapshot.statefile import write_state
from hvf.plugins.snapshot.store import SnapshotStore
from hvf.snapshot_api import Chunk

SIZE = 16 * MiB


def memory(tag: bytes, size: int = SIZE) -> GuestMemory:
    mem = GuestMemory(size)
    mem.write(0, tag)
    mem.write(size // 2, tag * 1000)
    mem.write(size - len(tag), tag)
    return mem


def save(st: SnapshotStore, tag: bytes, size: int = SIZE, **kw: Any) -> GuestMemory:
    mem = memory(tag, size)
    st.save(memory=mem, machine={"memory_size": size, "cpus": 1, "tag": tag.decode()},
            chunks=[Chunk("dev", "test", 1, {"tag": tag})], **kw)
    return mem


def check(st: SnapshotStore, tag: bytes) -> None:
    """load() gives the snapshot saved with ``tag``, RAM and state agreeing."""
    state, ram = st.load()
    assert state.machine["tag"] == tag.decode()
    assert state.chunks == [Chunk("dev", "test", 1, {"tag": tag})]
    size = state.ram["size"]
    assert GuestMemory(size, open_ram(ram, size)).map[:] == memory(tag, size).map[:]


def names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_save_and_load(tmp_path: Path) -> None:
    st = SnapshotStore(tmp_path / "snap")
    calls: list[tuple[int, int]] = []
    save(st, b"AAAA", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (SIZE, SIZE)
    assert (tmp_path / "snap").stat().st_mode & 0o777 == 0o700
    state, ram = st.load()
    assert ram.parent == tmp_path / "snap" and ram.name == state.ram["file"]
    assert state.ram["size"] == SIZE and state.ram["data_bytes"] == 3 * 4096
    assert names(tmp_path / "snap") == sorted(["state", ram.name])
    check(st, b"AAAA")


def test_second_save_replaces_the_first(tmp_path: Path) -> None:
    st = SnapshotStore(tmp_path / "snap")
    save(st, b"AAAA")
    _, first = st.load()
    running = GuestMemory(SIZE, open_ram(first, SIZE))  # a VM still running from it
    save(st, b"BBBB")
    _, second = st.load()
    assert second != first and not first.exists()
    assert names(tmp_path / "snap") == sorted(["state", second.name])
    check(st, b"BBBB")
    assert running.read(0, 4) == b"AAAA"  # unlinking a mapped file keeps its pages


def test_failure_before_commit_keeps_previous(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    st = SnapshotStore(tmp_path / "snap")
    save(st, b"AAAA")
    before = names(tmp_path / "snap")

    def boom(*a: Any, **kw: Any) -> None:
        raise SnapshotError("disk full")
    monkeypatch.setattr(store_mod, "write_state", boom)
    with pytest.raises(SnapshotError, match="disk full"):
        save(st, b"BBBB")
    assert names(tmp_path / "snap") == before  # the new RAM file is gone again
    check(st, b"AAAA")


def test_bad_device_state_refused_before_writing_ram(tmp_path: Path) -> None:
    st = SnapshotStore(tmp_path / "snap")
    with pytest.raises(SnapshotError, match=r"chunk 'dev'\.x: tuple is not a plain value"):
        st.save(memory=memory(b"A"), machine={}, chunks=[Chunk("dev", "t", 1, {"x": (1,)})])
    assert not (tmp_path / "snap").exists()


def test_leftovers_of_interrupted_saves_are_cleaned(tmp_path: Path) -> None:
    st = SnapshotStore(tmp_path / "snap")
    save(st, b"AAAA")
    snap = tmp_path / "snap"
    (snap / "ram-20200101T000000Z-deadbeef").write_bytes(b"orphan")
    (snap / ".ram-20200101T000000Z-deadbeef.tmp-0123456789ab").write_bytes(b"torn")
    (snap / ".state.tmp-0123456789ab").write_bytes(b"torn")
    check(st, b"AAAA")  # loading ignores them
    save(st, b"BBBB")
    _, ram = st.load()
    assert names(snap) == sorted(["state", ram.name])


def test_refuses_foreign_directory_and_concurrent_save(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(SnapshotError, match=r"refusing to save .* not hvf's \(notes\.txt\)"):
        save(SnapshotStore(tmp_path / "home"), b"A")
    (tmp_path / "file").write_text("")
    with pytest.raises(SnapshotError, match="exists and is not a directory"):
        save(SnapshotStore(tmp_path / "file"), b"A")
    st = SnapshotStore(tmp_path / "snap")
    save(st, b"AAAA")
    fd = os.open(tmp_path / "snap", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(SnapshotError, match="another save to this snapshot is in progress"):
            save(st, b"BBBB")
    finally:
        os.close(fd)
    check(st, b"AAAA")


def test_snapshot_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = tmp_path / "snap"
    save(SnapshotStore(snap), b"AAAA")
    assert cli.main(["snapshot", "verify", str(snap)]) == 0
    assert capsys.readouterr().out == f"{snap}: intact (1 chunks, 0 MiB of RAM data)\n"
    _, ram = SnapshotStore(snap).load()
    with open(ram, "r+b") as f:  # one bit of guest RAM, which a restore would not notice
        f.seek(SIZE // 2 + 100)
        f.write(b"a")
    assert cli.main(["snapshot", "verify", str(snap)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert cli.main(["snapshot", "verify", str(tmp_path / "none")]) == 1
    assert "no such snapshot" in capsys.readouterr().err


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no such snapshot"):
        SnapshotStore(tmp_path / "nope").load()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SnapshotError, match="not a snapshot directory"):
        SnapshotStore(tmp_path / "file").load()
    with pytest.raises(SnapshotError, match=r"not an hvf snapshot \(it has no 'state' file\)"):
        SnapshotStore(tmp_path).load()
    st = SnapshotStore(tmp_path / "snap")
    save(st, b"AAAA")
    _, ram = st.load()
    os.truncate(ram, SIZE - 4096)
    with pytest.raises(SnapshotError, match=rf"the RAM file is {SIZE - 4096} bytes but the "
                       rf"snapshot records {SIZE}"):
        st.load()
    ram.unlink()
    with pytest.raises(SnapshotError, match=rf"the RAM file '{ram.name}' that 'state' names "
                       r"is missing"):
        st.load()
    (tmp_path / "snap" / "state").write_bytes(b"garbage")
    with pytest.raises(SnapshotError, match="not an hvf state file"):
        st.load()


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "/etc/passwd", "ram-20200101T000000Z-00000000/../../x", "..", ".",
    "", "state", "ram-x\0", 5, None,
])
def test_untrusted_ram_names_rejected(tmp_path: Path, name: Any) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    write_state(snap / "state", machine={}, ram={"file": name, "size": 4096}, chunks=[])
    with pytest.raises(SnapshotError, match="RAM file name|names no RAM file"):
        SnapshotStore(snap).load()


def test_ram_symlink_and_bad_size_rejected(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(bytes(4096))
    name = "ram-20200101T000000Z-00000000"
    (snap / name).symlink_to(outside)
    write_state(snap / "state", machine={}, ram={"file": name, "size": 4096}, chunks=[])
    with pytest.raises(SnapshotError, match="is not a regular file"):
        SnapshotStore(snap).load()
    write_state(snap / "state", machine={}, ram={"file": name, "size": True}, chunks=[])
    with pytest.raises(SnapshotError, match="records no valid RAM size"):
        SnapshotStore(snap).load()


_SLOW_SAVER = """
import os, sys, time
from pathlib import Path
from hvf.memory import GuestMemory, MiB
from hvf.plugins.snapshot.store import SnapshotStore
from hvf.snapshot_api import Chunk

size = int(sys.argv[2])
mem = GuestMemory(size)
tag = b"BBBB"
mem.write(0, tag); mem.write(size // 2, tag * 1000); mem.write(size - 4, tag)
mem.view[4096:size // 2 - 4096] = b"\\x5a" * (size // 2 - 8192)  # lots of data to write
real = os.pwrite
def slow(fd, data, off):
    time.sleep(0.001)  # a slow disk, so that the kill lands mid-save
    return real(fd, data, off)
os.pwrite = slow
import hvf.plugins.snapshot.ramfile as r
r.WRITE_CHUNK = 256 * 1024
print("go", flush=True)
SnapshotStore(Path(sys.argv[1])).save(
    memory=mem, machine={"memory_size": size, "cpus": 1, "tag": "BBBB"},
    chunks=[Chunk("dev", "test", 1, {"tag": tag})])
"""


def test_sigkill_during_save_keeps_previous_snapshot(tmp_path: Path) -> None:
    st = SnapshotStore(tmp_path / "snap")
    save(st, b"AAAA")
    before = names(tmp_path / "snap")
    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVER, str(st.path), str(SIZE)],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"go\n"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            temps = [p for p in st.path.iterdir() if p.name.startswith(".ram-")]
            if temps and temps[0].stat().st_blocks * 512 > MiB:
                break
            assert child.poll() is None, "the save finished before it could be killed"
            time.sleep(0.002)
        else:
            pytest.fail("the save never started writing RAM")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        if child.stdout:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    check(st, b"AAAA")
    assert set(before) < set(names(st.path))  # a torn temporary file, ignored
    save(st, b"CCCC")  # and the next save cleans it up
    _, ram = st.load()
    assert names(st.path) == sorted(["state", ram.name])


_EVENTS = ("open", "ftruncate", "pwrite", "write", "fsync", "replace", "unlink", "close")


def _save_and_die_at(st: SnapshotStore, mem: GuestMemory, n: int) -> int:
    """Fork a child that saves ``mem`` and SIGKILLs itself just before its n-th file
    operation; the child's exit status (0 if the save finished first)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            count = 0

            def wrap(real: Any) -> Any:
                def op(*a: Any, **kw: Any) -> Any:
                    nonlocal count
                    count += 1
                    if count == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*a, **kw)
                return op
            for name in _EVENTS:
                setattr(os, name, wrap(getattr(os, name)))
            st.save(memory=mem, machine={"memory_size": mem.size, "cpus": 1, "tag": "BBBB"},
                    chunks=[Chunk("dev", "test", 1, {"tag": b"BBBB"})])
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def test_sigkill_at_every_step_leaves_a_whole_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed before any file operation of a save, the old or the new snapshot loads,
    whole; once the new one is committed, it stays."""
    # A killed process loses nothing that reached the page cache, so fsync only costs
    # time here (it still counts as a step where the child may die).
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    st = SnapshotStore(tmp_path / "snap")
    new = memory(b"BBBB", MiB)
    seen = []
    for n in range(1, 500):
        if n == 1 or seen[-1] == b"BBBB":
            save(st, b"AAAA", MiB)  # start from the old snapshot again
        status = _save_and_die_at(st, new, n)
        state, _ = st.load()
        tag = state.machine["tag"].encode()
        check(st, tag)
        seen.append(tag)
        if os.WIFEXITED(status):
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
    else:
        pytest.fail("the save never finished")
    assert seen[-1] == b"BBBB" and len(seen) > 10, seen
    first_new = seen.index(b"BBBB")
    assert set(seen[:first_new]) == {b"AAAA"} and set(seen[first_new:]) == {b"BBBB"}
