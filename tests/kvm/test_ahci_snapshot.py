# SPDX-License-Identifier: BSD-2-Clause
"""AHCI in snapshots, on real KVM: SeaBIOS's boot program, suspended while it reads its
1 MiB through int 13h from an AHCI disk, is restored and finishes (every dword checked,
its pattern written and found in the image); a restore refuses the image changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_snapshot import Hvf, read, suspend_exit, wait_served, wait_until

from conftest import run_hvf
from hvf.testing import bootdisk

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module", autouse=True)
def seabios() -> None:
    if not bootdisk.SEABIOS.exists():
        pytest.skip(f"{bootdisk.SEABIOS} is missing: install Debian's seabios package "
                    "(scripts/setup does)")


def test_boot_program_suspended_mid_read_finishes_after_restore(tmp_path: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "boot.img", tag="ahci-snap")
    name, snap = "vm-ahci-snap", tmp_path / "snap"
    out1, out2 = tmp_path / "com1-a", tmp_path / "com1-b"
    args = [*bootdisk.seabios_args(out1), "-s", f"4,ahci,hd:{disk.path}", name]
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_until(lambda: re.search(rb"bootdisk ahci-snap drive 80", read(out1)), 120,
                   "the boot program to start reading", vm, interval=0.01)
        suspend_exit(name, vm, snap)
    before = read(out1).decode(errors="replace")
    assert "bootdisk ahci-snap done" not in before, "suspended too late: the program ended"
    with Hvf(["-r", snap, "-l", f"com1,file={out2}"], tmp_path, "b") as vm:
        assert vm.wait(120) == 1, vm.stderr  # pc-testdev: the program passed
    report = disk.report(before + read(out2).decode(errors="replace"))
    assert report.passed, (before, read(out2))
    disk.check_written()
    # the image changed after the snapshot: a restore refuses it, naming the setting
    with disk.path.open("r+b") as f:
        f.seek(disk.write_lba * disk.sector)
        f.write(b"someone else")
    r = run_hvf(["-r", snap], timeout=60)
    assert r.returncode == 4, r.stderr
    assert "ahci@pci.0.4.0 port 0" in r.stderr and "changed since the snapshot" in r.stderr
    assert "pci.0.4.0.port.0.path=COPY" in r.stderr and "Traceback" not in r.stderr
