# SPDX-License-Identifier: BSD-2-Clause
"""SeaBIOS boots from virtio-blk: the boot program's int 13h reads and writes, and
``bootindex`` choosing between two disks."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_hvf
from hvf.testing import bootdisk

pytestmark = pytest.mark.kvm

DISK_ZEROS = bytes(bootdisk.DISK_WRITE_SECTORS * bootdisk.DISK_SECTOR)


@pytest.fixture(scope="module", autouse=True)
def seabios() -> None:
    if not bootdisk.SEABIOS.exists():
        pytest.skip(f"{bootdisk.SEABIOS} is missing: install Debian's seabios package "
                    "(scripts/setup does)")


def boot(tmp_path: Path, disks: list[str], name: str) -> str:
    """Boot SeaBIOS with the ``-s`` disk options ``disks``; COM1's output."""
    console = tmp_path / "com1.log"
    args = [*bootdisk.seabios_args(console, debug=tmp_path / "debug.log")]
    for slot, disk in enumerate(disks, start=4):
        args += ["-s", f"{slot},{disk}"]
    r = run_hvf([*args, name], timeout=120)
    text = console.read_text(errors="replace")
    # pc-testdev exit: 1 when the boot program passed (0 << 1 | 1), 3 when it failed
    assert r.returncode == 1, f"status {r.returncode}\n{text}\n{r.stderr[-2000:]}"
    return text


def write_area(disk: bootdisk.BootDisk) -> bytes:
    with open(disk.path, "rb") as f:
        f.seek(disk.write_lba * disk.sector)
        return f.read(disk.write_sectors * disk.sector)


def test_seabios_boots_a_virtio_blk_disk(tmp_path: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "boot.img", tag="vblk")
    text = boot(tmp_path, [f"virtio-blk,{disk.path}"], "vm-diskboot")
    report = disk.report(text)
    assert report.passed, text
    assert (report.drive, report.sector, report.wrote) == (0x80, 512, 16)
    disk.check_written()  # the host sees the guest's int 13h write in the image file


@pytest.mark.parametrize("first", ["alpha", "beta"])
def test_bootindex_picks_the_disk(tmp_path: Path, first: str) -> None:
    alpha = bootdisk.make_disk(tmp_path / "alpha.img", tag="alpha")
    beta = bootdisk.make_disk(tmp_path / "beta.img", tag="beta")
    index = {"alpha": 1, "beta": 0} if first == "beta" else {"alpha": 0, "beta": 1}
    text = boot(tmp_path, [f"virtio-blk,{alpha.path},bootindex={index['alpha']}",
                           f"virtio-blk,{beta.path},bootindex={index['beta']}"],
                f"vm-bootindex-{first}")
    booted, other = (alpha, beta) if first == "alpha" else (beta, alpha)
    assert booted.report(text).passed, text
    assert not other.report(text).booted, text
    booted.check_written()
    assert write_area(other) == DISK_ZEROS
    log = (tmp_path / "debug.log").read_text(errors="replace")
    slot = 4 if first == "alpha" else 5
    assert f"1: /pci@i0cf8/scsi@{slot}/disk@0,0" in log  # SeaBIOS's "boot order:" list


def test_bootindex_errors(tmp_path: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "boot.img", tag="err")
    base = ["-s", "0,hostbridge", "-s", "31,lpc", "-l", f"bootrom,{bootdisk.SEABIOS}"]
    r = run_hvf([*base, "-s", f"4,virtio-blk,{disk.path},bootindex=first", "vm-badindex"])
    assert r.returncode == 4
    assert "virtio-blk@pci.0.4.0: bootindex 'first' is not a number" in r.stderr
    other = bootdisk.make_disk(tmp_path / "other.img", tag="other")
    r = run_hvf([*base, "-s", f"4,virtio-blk,{disk.path},bootindex=1",
                 "-s", f"5,virtio-blk,{other.path},bootindex=1", "vm-twice"])
    assert r.returncode == 4
    assert ("bootindex 1 is given to both virtio-blk@pci.0.4.0 and virtio-blk@pci.0.5.0"
            in r.stderr)
    assert "Traceback" not in r.stderr
