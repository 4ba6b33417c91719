# SPDX-License-Identifier: BSD-2-Clause
"""SeaBIOS boots from NVMe: the boot program (hvf.testing.bootdisk) on an NVMe disk
reads 1 MiB through int 13h and checks it, writes a pattern the host finds in the image;
``bootindex`` chooses between an NVMe disk and a virtio-blk disk.

Debian builds SeaBIOS twice: ``bios.bin`` (128 KiB) without its NVMe driver and
``bios-256k.bin`` with it (QEMU's default). The 256 KiB build runs its initialisation
from the lower half of the image, which the firmware expects to find shadowed at
0xC0000 (under QEMU it unlocks the chipset's PAM registers and copies it there); these
tests need hvf's boot ROM to shadow that half, and say so when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_hvf
from hvf.plugins.lpc import bootrom
from hvf.testing import bootdisk

pytestmark = pytest.mark.kvm

SEABIOS_256K = bootdisk.SEABIOS.with_name("bios-256k.bin")


def has_nvme_driver(rom: Path) -> bool:
    return rom.exists() and b"nvme_probe_ns" in rom.read_bytes()


@pytest.fixture(scope="module")
def firmware() -> Path:
    """A SeaBIOS with its NVMe driver that hvf can run."""
    if has_nvme_driver(bootdisk.SEABIOS):
        return bootdisk.SEABIOS
    if not has_nvme_driver(SEABIOS_256K):
        pytest.skip(f"neither {bootdisk.SEABIOS} nor {SEABIOS_256K} has SeaBIOS's NVMe "
                    f"driver (Debian's seabios package ships it in bios-256k.bin)")
    size = SEABIOS_256K.stat().st_size
    assert size <= bootrom.MAX_SHADOW, f"{SEABIOS_256K} is {size >> 10} KiB: too big to shadow"
    return SEABIOS_256K


def boot(tmp_path: Path, firmware: Path, disks: list[str], name: str) -> tuple[str, str]:
    """Boot SeaBIOS with the ``-s`` disk options ``disks``; COM1's output and SeaBIOS's
    log."""
    console, debug = tmp_path / "com1.log", tmp_path / "debug.log"
    args = [arg.replace(str(bootdisk.SEABIOS), str(firmware))
            for arg in bootdisk.seabios_args(console, debug=debug)]
    for slot, disk in enumerate(disks, start=4):
        args += ["-s", f"{slot},{disk}"]
    r = run_hvf([*args, name], timeout=180)
    text = console.read_text(errors="replace")
    log = debug.read_text(errors="replace")
    # pc-testdev exit: 1 when the boot program passed, 3 when it failed
    assert r.returncode == 1, f"status {r.returncode}\n{text}\n{log[-3000:]}\n{r.stderr[-2000:]}"
    return text, log


def test_seabios_boots_an_nvme_disk(tmp_path: Path, firmware: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "boot.img", tag="nvme")
    text, _log = boot(tmp_path, firmware, [f"nvme,{disk.path}"], "vm-nvme-boot")
    report = disk.report(text)
    assert report.passed, text
    assert (report.drive, report.sector, report.wrote) == (0x80, 512, 16)
    disk.check_written()  # the guest's int 13h write is in the image file


@pytest.mark.parametrize("first", ["nvme", "virtio"])
def test_bootindex_picks_nvme_or_virtio_blk(tmp_path: Path, firmware: Path, first: str) -> None:
    nvme = bootdisk.make_disk(tmp_path / "nvme.img", tag="nvme-disk")
    vblk = bootdisk.make_disk(tmp_path / "vblk.img", tag="vblk-disk")
    index = {"nvme": 0, "virtio": 1} if first == "nvme" else {"nvme": 1, "virtio": 0}
    text, log = boot(tmp_path, firmware, [f"nvme,{nvme.path},bootindex={index['nvme']}",
                                          f"virtio-blk,{vblk.path},bootindex={index['virtio']}"],
                     f"vm-nvme-order-{first}")
    booted, other = (nvme, vblk) if first == "nvme" else (vblk, nvme)
    assert booted.report(text).passed, text
    assert not other.report(text).booted, text
    nvme_line = f"{index['nvme'] + 1}: /pci@i0cf8/nvme@4/namespace@1,0"
    assert nvme_line in log  # SeaBIOS's boot order list
