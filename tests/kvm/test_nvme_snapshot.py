# SPDX-License-Identifier: BSD-2-Clause
"""NVMe in snapshots, on real KVM: the nvme_disk guest, suspended while its commands
are in flight (doorbell buffers on, so its I/O doorbells are ioeventfds), is restored
in a new hvf and finishes: every block it wrote before and after reads back as written,
and the image holds the pattern; a restore refuses the image once it has changed."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from test_snapshot import Hvf, read, suspend_exit, wait_served, wait_until

from conftest import BASE_ARGS, run_hvf

pytestmark = pytest.mark.kvm

MIB = 1 << 20
BLOCKS = 16384  # 8 MiB: long enough to be caught in the middle


def test_guest_suspended_mid_io_finishes_after_restore(guests: dict[str, Path],
                                                        tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(64 * MIB)
    name, snap = "vm-nvme-snap", tmp_path / "snap"
    args = [*BASE_ARGS, "-s", f"3,nvme,{img}", "--kernel", guests["nvme_disk"],
            "--append", f"n={BLOCKS} depth=16", name]
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_until(lambda: b"nvme queue depth 16 dbbuf 1" in read(vm.stdout_path), 120,
                   "the guest to start its I/O", vm, interval=0.01)
        suspend_exit(name, vm, snap)
    before = vm.stdout
    assert "nvme read" not in before, "suspended too late: the guest had finished writing"
    with Hvf(["-r", snap], tmp_path, "b") as vm:
        assert vm.wait(300) == 1, vm.stderr  # pc-testdev: the guest exited 0
        after = vm.stdout
    lines = (before + after).splitlines()
    for expected in (f"nvme wrote {BLOCKS}", "nvme flushed", f"nvme read {BLOCKS} ok",
                     "nvme discard reads zero", "nvme write-zeroes ok", "nvme done"):
        assert expected in lines, (before, after)
    # The host sees the pattern past the deallocated half (and the 8 zeroed blocks).
    with img.open("rb") as f:
        f.seek((BLOCKS // 2 + 8) * 512)
        data = f.read((BLOCKS // 2 - 8) * 512)
    for block in range(BLOCKS // 2 + 8, BLOCKS, 997):
        c = (block * 0x9E3779B1 ^ 0xA5A5A5A5) & 0xFFFFFFFF
        offset = (block - BLOCKS // 2 - 8) * 512
        assert data[offset : offset + 512] == struct.pack("<128I", *(c ^ w for w in range(128)))
    # The image changed after the snapshot: a restore refuses it, naming the setting.
    with img.open("r+b") as f:
        f.write(b"someone else")
    r = run_hvf(["-r", snap], timeout=60)
    assert r.returncode == 4, r.stderr
    assert "nvme@pci.0.3.0" in r.stderr and "changed since the snapshot" in r.stderr
    assert "pci.0.3.0.path=COPY" in r.stderr and "Traceback" not in r.stderr
