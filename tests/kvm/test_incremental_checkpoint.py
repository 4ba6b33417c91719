# SPDX-License-Identifier: BSD-2-Clause
"""Incremental checkpoints on real KVM: ``hvf ctl checkpoint --incremental`` writes the
pages a guest dirtied since its last checkpoint, and ``hvf -r`` restores them.

The guest is test_migration's dirtying counter, told to dirty 655 pages, 1% of its
256 MiB, over and over; it numbers its COM1 lines, so the output of every process must
join into one sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_hvf
from hvf.extents import PAGE
from hvf.memory import GuestMemory, MiB
from hvf.plugins.snapshot.store import SnapshotStore
from test_migration import dirty_guest  # noqa: F401 - the fixture
from test_snapshot import (
    Hvf,
    check_counter,
    counter_args,
    ctl,
    lines_in,
    poweroff,
    wait_served,
    wait_until,
)

pytestmark = pytest.mark.kvm

RAM = 256 * MiB
DIRTIED = RAM // PAGE // 100  # 655 pages
#: Pages beside the dirtied ones a counter touches between two checkpoints (its stack,
#: data, page tables): an allowance, not a figure.
OTHERS = 48


def guest_ram(snap: Path) -> bytes:
    """Guest RAM as ``hvf -r`` rebuilds it from ``snap``: its RAM file and layers."""
    store = SnapshotStore(snap)
    state, ram = store.load()
    memory = GuestMemory(RAM, store.open_ram(ram, RAM))
    try:
        store.load_layers(state, memory.view)
        return bytes(memory.map[:])
    finally:
        memory.close()


def test_incremental_checkpoints_write_what_the_guest_dirtied_and_restore(
        dirty_guest: Path, tmp_path: Path) -> None:  # noqa: F811
    name, snap, whole = "incr", tmp_path / "snap", tmp_path / "whole"
    outs = [tmp_path / f"com1-{i}" for i in range(3)]
    args = counter_args(dirty_guest, outs[0], name, "-m", "256M", append=f"pages={DIRTIED}")
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_until(lambda: lines_in(outs[0]) >= 3, 60, "3 lines from the guest", vm)
        refused = run_hvf(["ctl", "--vm", name, "checkpoint", "--incremental", snap], timeout=60)
        assert refused.returncode != 0 and "take a full checkpoint first" in refused.stderr
        full = ctl(name, "checkpoint", snap)
        assert not full["incremental"] and full["ram_bytes_written"] > DIRTIED * PAGE
        seen = lines_in(outs[0])
        wait_until(lambda: lines_in(outs[0]) >= seen + 3, 60, "3 more lines", vm)
        layer = ctl(name, "suspend", "--incremental", snap)
        print(f"\nfull checkpoint: {full['ram_bytes_written'] / MiB:.1f} MiB in "
              f"{full['seconds']} s; incremental: {layer['ram_bytes_written'] / MiB:.2f} MiB "
              f"({layer['ram_bytes_written'] / RAM:.2%} of RAM) in {layer['seconds']} s")
        assert layer["incremental"] and layer["state"] == "paused"
        assert DIRTIED * PAGE <= layer["ram_bytes_written"] <= (DIRTIED + OTHERS) * PAGE
        ctl(name, "checkpoint", whole)  # the same paused guest, all of it
        assert guest_ram(snap) == guest_ram(whole)
        poweroff(name, vm)
    first, _ = check_counter(outs[0].read_bytes())

    # A restored guest builds on the snapshot it runs from (its private pages).
    with Hvf(["-r", snap, "-l", f"com1,file={outs[1]}"], tmp_path, "b") as vm:
        wait_served(name, vm)
        wait_until(lambda: lines_in(outs[1]) >= 3, 60, "3 lines after the restore", vm)
        again = ctl(name, "suspend", "--incremental", "--exit", snap)
        assert again["incremental"] and again["state"] == "stopping"
        assert again["ram_bytes_written"] <= (DIRTIED + OTHERS) * PAGE
        assert vm.wait(30) == 0, vm.stderr
    second, _ = check_counter(outs[0].read_bytes() + outs[1].read_bytes())
    assert second >= first + 2

    with Hvf(["-r", snap, "-l", f"com1,file={outs[2]}"], tmp_path, "c") as vm:
        wait_served(name, vm)
        wait_until(lambda: lines_in(outs[2]) >= 3, 60, "3 lines after the second restore", vm)
        poweroff(name, vm)
    total, _ = check_counter(b"".join(out.read_bytes() for out in outs))
    assert total >= second + 2
