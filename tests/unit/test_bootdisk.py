# SPDX-License-Identifier: BSD-2-Clause
"""hvf.testing.bootdisk without a guest: the images' layout, the program's parameters,
the host-side check and the parser of the program's lines."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from hvf.testing import bootdisk
from hvf.testing.bootdisk import PARAMS, PARAMS_OFFSET, BootDiskError


def params(image: bytes, offset: int = 0) -> tuple[object, ...]:
    return PARAMS.unpack_from(image, offset + PARAMS_OFFSET)


def test_pattern() -> None:
    data = bootdisk.pattern(0xFFFF_FFFE, 16)
    assert struct.unpack("<4I", data) == (0xFFFF_FFFE, 0xFFFF_FFFF, 0, 1)


def test_disk_layout(tmp_path: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "d.img", tag="vblk", seed=0x1234)
    image = disk.path.read_bytes()
    assert len(image) == bootdisk.DISK_SIZE
    assert image[510:512] == b"\x55\xaa" and image[0x1BE:0x1FE] == bytes(64)
    program = bootdisk.boot_program()
    magic, tag, stage, sector, data_lba, count, seed, write_lba, write_count = params(image)
    assert (magic, tag.rstrip(b"\0"), stage, sector) == (b"HVFBOOT1", b"vblk",
                                                         len(program) // 512 - 1, 512)
    assert (data_lba, count, seed, write_lba, write_count) == (2048, 2048, 0x1234, 4096, 16)
    assert image[512:len(program)] == program[512:]  # stage 2 from LBA 1
    assert image[2048 * 512:2048 * 512 + (1 << 20)] == bootdisk.pattern(0x1234, 1 << 20)
    assert image[4096 * 512:] == bytes(len(image) - 4096 * 512)


def test_check_written(tmp_path: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "d.img", tag="w")
    with pytest.raises(BootDiskError, match="write area differs from the pattern at sector 4096"):
        disk.check_written()
    with open(disk.path, "r+b") as f:
        f.seek(disk.write_lba * 512)
        f.write(bootdisk.pattern(~disk.seed, 16 * 512))
    disk.check_written()
    with open(disk.path, "r+b") as f:
        f.seek((disk.data_lba + 77) * 512 + 3)
        f.write(b"!")
    with pytest.raises(BootDiskError, match="data area differs from the pattern at sector 2125"):
        disk.check_written()


@pytest.mark.skipif(shutil.which("xorriso") is None, reason="needs xorriso (scripts/setup)")
def test_iso_layout(tmp_path: Path) -> None:
    disk = bootdisk.make_iso(tmp_path / "cd.iso", tag="cd", seed=7)
    image = disk.path.read_bytes()
    assert image[0x8001:0x8006] == b"CD001"  # ISO 9660 primary volume descriptor
    boot = next(lba for lba in range(len(image) // 2048)
                if image[lba * 2048 + PARAMS_OFFSET:][:8] == b"HVFBOOT1")
    _, tag, stage, sector, data_lba, count, seed, _, write_count = params(image, boot * 2048)
    assert (tag.rstrip(b"\0"), stage, sector, count, seed, write_count) == \
        (b"cd", 0, 2048, 512, 7, 0)
    assert data_lba == disk.data_lba
    assert image[data_lba * 2048:data_lba * 2048 + (1 << 20)] == bootdisk.pattern(7, 1 << 20)
    with pytest.raises(BootDiskError, match="no write area"):
        disk.check_written()


@pytest.mark.parametrize("tag", ["", "has space", "x" * 16, "caf\u00e9"])
def test_bad_tag(tmp_path: Path, tag: str) -> None:
    with pytest.raises(ValueError, match="bootdisk tag"):
        bootdisk.make_disk(tmp_path / "d.img", tag=tag)


def test_report(tmp_path: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "d.img", tag="t1")
    text = ("SeaBIOS\r\nbootdisk t1 drive 80 sector 512\r\n"
            "bootdisk t1 read 1048576 bytes ok\r\n"
            "bootdisk t1 wrote 16 sectors at lba 00001000\r\n"
            "bootdisk other done\r\nbootdisk t1 done\r\n")
    report = disk.report(text)
    assert report.passed and (report.drive, report.sector, report.wrote) == (0x80, 512, 16)
    failed = disk.report("bootdisk t1 drive 80 sector 512\n"
                         "bootdisk t1 read FAIL lba 00000abc mismatch\n"
                         "bootdisk t1 write FAIL lba 00001000 status 03\nbootdisk t1 done\n")
    assert not failed.passed
    assert (failed.read_failure, failed.write_failure) == ("lba 00000abc mismatch",
                                                           "lba 00001000 status 03")
    assert not disk.report("bootdisk t10 drive 80 sector 512\n").booted


def test_seabios_args(tmp_path: Path) -> None:
    args = bootdisk.seabios_args(tmp_path / "c.log", debug=tmp_path / "d.log")
    assert f"com1,file={tmp_path / 'c.log'}" in args and "pc-testdev" in args
    assert f"bootrom,{bootdisk.SEABIOS}" in args and f"debugcon,{tmp_path / 'd.log'}" in args
