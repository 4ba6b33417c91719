# SPDX-License-Identifier: BSD-2-Clause
"""Disks in snapshots, on real KVM with the virtio_blk test guest: suspended mid-write and
restored, the guest's read-back of every sector and the image agree; the snapshot
records the image, so a restore refuses one that changed, takes a copy given with
``-o pci.B.S.F.path=`` (of the right size), and refuses a copy of another size."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_snapshot import Hvf, suspend_exit, wait_served, wait_until
from test_virtio_blk_guest import IMAGE_SIZE, SECTOR, pattern

from conftest import run_hvf

pytestmark = pytest.mark.kvm

MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev", "-l", "debugcon,stdio")
SECTORS = 16384


def blank(path: Path, size: int = IMAGE_SIZE) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def check_image(img: Path, sectors: int) -> None:
    with img.open("rb") as f:
        head = f.read(sectors * SECTOR)
    expected = pattern(sectors)
    if head != expected:
        first = next(i for i in range(len(head)) if head[i] != expected[i])
        pytest.fail(f"image differs from the pattern at sector {first // SECTOR}")


def done_lines(sectors: int) -> list[str]:
    return [f"blk capacity {IMAGE_SIZE // SECTOR}", f"blk wrote {sectors}",
            f"blk flushed {sectors}", f"blk read {sectors} ok"]


@pytest.fixture
def mid_write(guests: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    """A snapshot of the guest taken while it writes: (image, snapshot, output so far)."""
    img, snap, name = blank(tmp_path / "disk.img"), tmp_path / "snap", "disk-snap"
    args = [*MACHINE, "-s", f"3,virtio-blk,{img}", "--kernel", guests["virtio_blk"],
            "--append", f"n={SECTORS}", name]
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_until(lambda: "blk capacity" in vm.stdout, 120, "the guest to start", vm)
        time.sleep(1)
        suspend_exit(name, vm, snap)
        before = vm.stdout
    assert f"blk wrote {SECTORS}" not in before, "suspended too late: the writes were done"
    return img, snap, before


def test_restore_mid_write_guest_and_image_agree(mid_write: tuple[Path, Path, str],
                                                 tmp_path: Path) -> None:
    img, snap, before = mid_write
    with Hvf(["-r", snap], tmp_path, "b") as vm:
        assert vm.wait(300) == 1, (vm.stdout, vm.stderr)
        after = vm.stdout
    assert (before + after).splitlines()[-6:-2] == done_lines(SECTORS), (before, after)
    check_image(img, SECTORS)


def test_restore_refuses_a_changed_image(mid_write: tuple[Path, Path, str]) -> None:
    img, snap, _ = mid_write
    info = run_hvf(["snapshot", "info", snap], timeout=60)
    assert info.returncode == 0, info.stderr
    assert "disk images (1):" in info.stdout, info.stdout
    assert f"device.virtio-blk@pci.0.3.0: {img}, {IMAGE_SIZE} bytes" in info.stdout, info.stdout
    with img.open("r+b") as f:
        f.seek(SECTORS * SECTOR)
        f.write(b"someone else")
    r = run_hvf(["-r", snap], timeout=60)
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert f"{img} changed since the snapshot (it was modified)" in r.stderr, r.stderr
    assert "pci.0.3.0.path=COPY" in r.stderr and "Traceback" not in r.stderr


def test_restore_takes_a_copy_of_the_same_size_and_refuses_another(
        mid_write: tuple[Path, Path, str], tmp_path: Path) -> None:
    img, snap, before = mid_write
    short = blank(tmp_path / "short.img", IMAGE_SIZE // 2)
    r = run_hvf(["-r", snap, "-o", f"pci.0.3.0.path={short}"], timeout=60)
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert f"{short} is {IMAGE_SIZE // 2} bytes but the snapshot's disk ({img}) was " \
           f"{IMAGE_SIZE}" in r.stderr, r.stderr
    copy = tmp_path / "copy.img"
    shutil.copyfile(img, copy)
    os.utime(copy)  # a copy is another file, modified later: the path decides the check
    with Hvf(["-r", snap, "-o", f"pci.0.3.0.path={copy}"], tmp_path, "c") as vm:
        assert vm.wait(300) == 1, (vm.stdout, vm.stderr)
        after = vm.stdout
    assert (before + after).splitlines()[-6:-2] == done_lines(SECTORS), (before, after)
    check_image(copy, SECTORS)
