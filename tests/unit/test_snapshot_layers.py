# SPDX-License-Identifier: BSD-2-Clause
"""Incremental snapshots: RAM layers over a full RAM file, written, chained, linked
into another directory, verified, and refused when hostile or stale."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hvf.errors import SnapshotError
from hvf.extents import PAGE
from hvf.memory import GuestMemory, MiB
from hvf.plugins.snapshot import statefile
from hvf.plugins.snapshot.layers import MAX_LAYERS, decode_runs, encode_runs
from hvf.plugins.snapshot.statefile import read_state, write_state
from hvf.plugins.snapshot.store import STATE, SnapshotStore
from hvf.snapshot_api import Chunk
from hypothesis import given
from hypothesis import strategies as st

SIZE = 16 * MiB
PAGES = SIZE // PAGE
MACHINE = {"memory_size": SIZE, "cpus": 1}


def chunks(tag: str) -> list[Chunk]:
    return [Chunk("dev", "test", 1, {"tag": tag})]


def guest() -> GuestMemory:
    mem = GuestMemory(SIZE)
    for page in (0, 7, 100, PAGES - 1):
        mem.write(page * PAGE, os.urandom(PAGE))
    return mem


def dirty(mem: GuestMemory, runs: list[tuple[int, int]], zero: bool = False) -> None:
    for first, count in runs:
        mem.write(first * PAGE, bytes(count * PAGE) if zero else os.urandom(count * PAGE))


def restored(st: SnapshotStore) -> GuestMemory:
    """Guest RAM as ``hvf -r`` rebuilds it: the RAM file copy-on-write, layers over it."""
    state, ram = st.load()
    mem = GuestMemory(SIZE, st.open_ram(ram, SIZE))
    st.load_layers(state, mem.view)
    return mem


def incremental(st: SnapshotStore, mem: GuestMemory, base: Path, base_ram: dict[str, Any],
                runs: list[tuple[int, int]], tag: str = "inc") -> dict[str, Any]:
    return st.save_incremental(memory=mem, machine=MACHINE, chunks=chunks(tag), base=base,
                               base_ram=base_ram, dirty=runs)


def test_a_layer_holds_only_the_dirty_pages_and_restores_exactly(tmp_path: Path) -> None:
    st = SnapshotStore(tmp_path / "snap")
    mem = guest()
    full = st.save(memory=mem, machine=MACHINE, chunks=chunks("full"))
    runs = [(3, 2), (7, 1), (50, 10)]
    dirty(mem, [(3, 2), (50, 10)])
    dirty(mem, [(7, 1)], zero=True)  # a data page of the base, now zero
    ram = incremental(st, mem, tmp_path / "snap", full, runs)
    layer = ram["layers"][-1]
    assert layer["data_bytes"] == 13 * PAGE
    assert (tmp_path / "snap" / layer["file"]).stat().st_size == 13 * PAGE
    state = read_state(tmp_path / "snap" / STATE)
    assert state.format_version == 2 and state.chunks == chunks("inc")
    assert restored(st).map[:] == mem.map[:]
    st.verify()
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == sorted(
        [STATE, full["file"], layer["file"]])


def test_layers_chain_and_a_full_save_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    st = SnapshotStore(path)
    mem = guest()
    ram = st.save(memory=mem, machine=MACHINE, chunks=chunks("full"))
    for step in range(3):
        runs = [(10 + step, 1), (200 + 3 * step, 2)]
        dirty(mem, runs)
        ram = incremental(st, mem, path, ram, runs)
        assert restored(st).map[:] == mem.map[:]
    assert len(ram["layers"]) == 3
    assert "3 RAM layers" not in st.describe(read_state(path / STATE))
    assert "RAM layers (3" in st.describe(read_state(path / STATE))
    ram = incremental(st, mem, path, ram, [])  # nothing dirtied: no new layer
    assert len(ram["layers"]) == 3
    st.save(memory=mem, machine=MACHINE, chunks=chunks("full again"))
    assert len(list(path.iterdir())) == 2  # the state and one RAM file: layers removed
    assert read_state(path / STATE).format_version == 1
    assert restored(st).map[:] == mem.map[:]


def test_a_layer_in_another_directory_shares_the_base_by_hard_links(tmp_path: Path) -> None:
    first, second = SnapshotStore(tmp_path / "a"), SnapshotStore(tmp_path / "b")
    mem = guest()
    full = first.save(memory=mem, machine=MACHINE, chunks=chunks("full"))
    at_first = bytes(mem.map[:])
    dirty(mem, [(40, 4)])
    ram = incremental(second, mem, tmp_path / "a", full, [(40, 4)])
    assert os.path.samefile(tmp_path / "a" / full["file"], tmp_path / "b" / ram["file"])
    assert restored(first).map[:] == at_first  # the first snapshot is untouched
    for name in os.listdir(tmp_path / "a"):
        os.unlink(tmp_path / "a" / name)
    assert restored(second).map[:] == mem.map[:]


def test_a_base_that_changed_since_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    st = SnapshotStore(path)
    mem = guest()
    full = st.save(memory=mem, machine=MACHINE, chunks=chunks("full"))
    st.save(memory=mem, machine=MACHINE, chunks=chunks("someone else's"))
    before = sorted(os.listdir(path))
    with pytest.raises(SnapshotError, match="has changed since this VM wrote it"):
        incremental(st, mem, path, full, [(1, 1)])
    assert sorted(os.listdir(path)) == before


def test_verify_finds_a_corrupt_layer(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    st = SnapshotStore(path)
    mem = guest()
    full = st.save(memory=mem, machine=MACHINE, chunks=chunks("full"))
    dirty(mem, [(5, 1)])
    layer = incremental(st, mem, path, full, [(5, 1)])["layers"][0]["file"]
    with open(path / layer, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\0")
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        st.verify()


def rewrite_ram(path: Path, change: Any) -> None:
    """Rewrite the snapshot's state with its ``ram`` section changed by ``change``."""
    state = read_state(path / STATE)
    ram = dict(state.ram)
    change(ram)
    write_state(path / STATE, machine=state.machine, ram=ram, chunks=state.chunks)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["layers"][0].update(pages=encode_runs([(PAGES - 1, 2)])), "bad page run"),
    (lambda r: r["layers"][0].update(pages=encode_runs([(9, 2), (10, 1)])), "bad page run"),
    (lambda r: r["layers"][0].update(pages=b"\0" * 15), "malformed page table"),
    (lambda r: r["layers"][0].update(pages=encode_runs([(5, 2)])), "truncated or replaced"),
    (lambda r: r["layers"][0].update(file="../state"), "refusing RAM layer name"),
    (lambda r: r["layers"][0].update(file="ram-20260101T000000Z-00000000"), "is missing"),
    (lambda r: r.update(layers="ram"), "malformed RAM layers"),
    (lambda r: r.update(layers=r["layers"] * (MAX_LAYERS + 1)), "more than the"),
])
def test_hostile_layer_tables_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    path = tmp_path / "snap"
    st = SnapshotStore(path)
    mem = guest()
    full = st.save(memory=mem, machine=MACHINE, chunks=chunks("full"))
    dirty(mem, [(5, 1)])
    incremental(st, mem, path, full, [(5, 1)])
    rewrite_ram(path, change)
    with pytest.raises(SnapshotError, match=message):
        st.load()


def test_a_version_1_state_file_with_layers_is_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "snap"
    st = SnapshotStore(path)
    mem = guest()
    full = st.save(memory=mem, machine=MACHINE, chunks=chunks("full"))
    incremental(st, mem, path, full, [(5, 1)])
    with monkeypatch.context() as m:  # as if written by an hvf that knew no version 2
        m.setattr(statefile, "LAYERED_VERSION", 1)
        rewrite_ram(path, lambda r: None)
    with pytest.raises(SnapshotError, match="format version 1 has no RAM layers"):
        st.load()


@given(st.binary(max_size=200), st.integers(1, 1 << 40))
def test_any_page_table_decodes_to_ordered_runs_inside_ram_or_is_refused(
        table: bytes, pages: int) -> None:
    try:
        runs = decode_runs(table, pages, "t")
    except SnapshotError:
        return
    end = 0
    for first, count in runs:
        assert count >= 1 and first >= end and first + count <= pages
        end = first + count
    assert encode_runs(runs) == table
