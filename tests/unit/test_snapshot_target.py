# SPDX-License-Identifier: BSD-2-Clause
"""What a snapshot save may replace: only hvf's own files, and only in a directory
whose parent exists. Real files; what is refused stays byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hvf.errors import SnapshotError
from hvf.memory import GuestMemory, MiB
from hvf.plugins.snapshot.statefile import MAGIC
from hvf.plugins.snapshot.store import SnapshotStore
from hvf.snapshot_api import Chunk

SIZE = 4 * MiB


def save(path: Path) -> None:
    mem = GuestMemory(SIZE)
    mem.write(0, b"data")
    SnapshotStore(path).save(memory=mem, machine={"memory_size": SIZE, "cpus": 1},
                             chunks=[Chunk("dev", "test", 1, {"x": 1})])


def tree(path: Path) -> dict[str, bytes | str]:
    """Every entry under ``path``: file contents, link targets, "dir" for directories."""
    out: dict[str, bytes | str] = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = p.read_bytes()
    return out


def test_a_foreign_state_file_is_not_replaced(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "state").write_bytes(b"my tax records\n")
    with pytest.raises(SnapshotError, match=r"refusing to save a snapshot into .*snap: "
                                            r".*state is not an hvf state file"):
        save(snap)
    assert tree(snap) == {"state": b"my tax records\n"}


@pytest.mark.parametrize("content", [b"", b"HVFSTAT", b"\0" * 64])
def test_short_or_empty_state_files_are_foreign_too(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state").write_bytes(content)
    with pytest.raises(SnapshotError, match="is not an hvf state file"):
        save(tmp_path)
    assert tree(tmp_path) == {"state": content}


def test_hvf_names_that_are_not_regular_files_are_refused(tmp_path: Path) -> None:
    for entry, make in (("state", lambda p: p.mkdir()),
                        ("state", lambda p: p.symlink_to("/etc/passwd")),
                        ("ram-20250101T000000Z-0123abcd", lambda p: p.mkdir()),
                        ("ram-20250101T000000Z-0123abcd", lambda p: p.symlink_to("/etc"))):
        snap = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        snap.mkdir()
        make(snap / entry)
        before = tree(snap)
        with pytest.raises(SnapshotError, match=f"{entry} is not a regular file"):
            save(snap)
        assert tree(snap) == before


def test_a_missing_parent_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "snap"
    with pytest.raises(SnapshotError, match=r"cannot create snapshot directory .*snap: "
                                            r"its parent .*such does not exist"):
        save(target)
    assert not (tmp_path / "no").exists()


def test_the_final_directory_is_created_and_an_hvf_snapshot_replaced(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    save(snap)  # created: its parent exists
    assert (snap / "state").read_bytes().startswith(MAGIC)
    first = tree(snap)
    save(snap)  # replaces hvf's own snapshot
    assert tree(snap) != first and set(tree(snap)) != set(first)
    state, _ = SnapshotStore(snap).load()
    assert state.machine["memory_size"] == SIZE


def test_an_empty_existing_directory_is_used(tmp_path: Path) -> None:
    snap = tmp_path / "empty"
    snap.mkdir()
    save(snap)
    SnapshotStore(snap).load()
