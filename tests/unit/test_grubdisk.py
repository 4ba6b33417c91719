# SPDX-License-Identifier: BSD-2-Clause
"""The GRUB demo disk's layout: boot sector, core.img in the gap, the ext2 partition and
what it holds (read back with e2fsprogs' debugfs)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hvf.testing import grubdisk

pytestmark = pytest.mark.skipif(
    not (grubdisk.GRUB_DIR / "boot.img").exists() or shutil.which("debugfs") is None,
    reason="needs Debian's grub-pc-bin and e2fsprogs (scripts/setup installs them)")


def partition_file(image: Path, tmp_path: Path, name: str) -> bytes:
    """The file ``name`` from the image's ext2 partition."""
    part = tmp_path / "part.img"
    with open(image, "rb") as f:
        f.seek(grubdisk.PARTITION_LBA * grubdisk.SECTOR)
        part.write_bytes(f.read())
    r = subprocess.run(["debugfs", "-R", f"cat {name}", str(part)], capture_output=True,
                       check=True)
    return r.stdout


def test_layout(tmp_path: Path) -> None:
    image = grubdisk.make_grub_disk(tmp_path / "demo.img", timeout=3)
    data = image.read_bytes()
    boot = (grubdisk.GRUB_DIR / "boot.img").read_bytes()
    assert data[510:512] == b"\x55\xaa"
    assert data[:0x66] == boot[:0x66]  # GRUB's code, core.img's LBA (1) at 0x5C
    assert data[0x66:0x68] == b"\x90\x90"  # the boot drive check is on, as grub-setup sets
    status, _, kind, _, start, sectors = grubdisk.PARTITION_ENTRY.unpack_from(data, 0x1BE)
    assert (status, kind, start) == (0x80, 0x83, 2048)
    assert data[0x1CE:0x1FE] == bytes(48)  # the other three entries are empty
    assert len(data) == (start + sectors) * 512
    # core.img from LBA 1; its first sector's block list loads the rest from LBA 2
    lba, count, segment = struct.unpack_from("<QHH", data, 512 + 0x1F4)
    assert (lba, segment) == (2, 0x820)
    assert 1 < 1 + count < 2048
    ext2 = start * 512 + 1024
    assert struct.unpack_from("<H", data, ext2 + 56)[0] == 0xEF53  # the ext2 magic
    cfg = partition_file(image, tmp_path, "/boot/grub/grub.cfg").decode()
    assert "terminal_output serial" in cfg and "set timeout=3" in cfg
    assert "multiboot /boot/demo_hello.elf hvf-demo" in cfg and "linux" not in cfg
    assert partition_file(image, tmp_path, "/boot/demo_hello.elf") == \
        grubdisk.demo_kernel(tmp_path).read_bytes()
    assert partition_file(image, tmp_path, "/boot/grub/i386-pc/normal.mod") == \
        (grubdisk.GRUB_DIR / "normal.mod").read_bytes()


def test_linux_entry_comes_first(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz-test", tmp_path / "initrd-test.img"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    image = grubdisk.make_grub_disk(
        tmp_path / "demo.img", linux=grubdisk.LinuxEntry(kernel, initrd, "console=ttyS0"))
    cfg = partition_file(image, tmp_path, "/boot/grub/grub.cfg").decode()
    assert "insmod linux" in cfg
    assert cfg.index("linux /boot/vmlinuz-test console=ttyS0") < cfg.index("multiboot ")
    assert "initrd /boot/initrd-test.img" in cfg
    assert partition_file(image, tmp_path, "/boot/vmlinuz-test") == b"kernel"


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert grubdisk.main([str(tmp_path / "d.img"), "--timeout", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d.img")
    assert grubdisk.main([str(tmp_path / "missing" / "d.img")]) == 1
    assert "grubdisk: " in capsys.readouterr().err
