# SPDX-License-Identifier: BSD-2-Clause
"""Disk images that test a firmware's disk boot: what SeaBIOS's int 13h reads and writes.

The boot program (``hvf/testing/guests/bootdisk.S``, 16-bit real mode) is the image's
MBR, or an ISO's El Torito no-emulation boot image. Loaded by the firmware, it prints
``bootdisk TAG drive DD sector N`` on COM1, reads 1 MiB through int 13h extended reads
(AH=42h) and checks every dword of it against the pattern written here, writes a
pattern of its own through AH=43h (disks only; a CD is read-only), prints
``bootdisk TAG done`` and ends the run: with ``-l pc-testdev`` hvf exits with status 1
when everything passed and 3 when something failed; without it the program powers off
through ACPI (status 1) either way. Output goes to COM1 directly (not int 10h).

Use, in a test of a disk front end (any controller SeaBIOS boots from)::

    from hvf.testing import bootdisk

    disk = bootdisk.make_disk(tmp_path / "boot.img", tag="nvme")   # or make_iso()
    args = [*bootdisk.seabios_args(tmp_path / "com1.log"),
            "-s", f"4,nvme,{disk.path}", "vm-boot"]
    # run hvf with args (hvf.testing.run_hvf), then:
    report = disk.report((tmp_path / "com1.log").read_text())
    assert report.passed, report            # booted, read 1 MiB correctly, wrote, done
    disk.check_written()                    # the host sees what the guest wrote

The tag (at most 15 ASCII characters) names the disk in every line, so a test with
several disks sees which one the firmware booted. SeaBIOS takes 3-8 s to get to the
boot program on a kvm_pvm host; the program itself about a second more.
"""

from __future__ import annotations

import array
import functools
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import attrs

from hvf.testing.guests import AS, LD, RUNTIME, GuestBuildError

__all__ = ["DATA_BYTES", "SEABIOS", "BootDisk", "BootDiskError", "BootReport",
           "boot_program", "make_disk", "make_iso", "pattern", "seabios_args"]

#: Debian's SeaBIOS (package seabios).
SEABIOS = Path("/usr/share/seabios/bios.bin")
SOURCE = RUNTIME / "bootdisk.S"

#: How much the program reads and checks.
DATA_BYTES = 1 << 20
#: Disk layout, in 512-byte sectors: the data at 1 MiB, the write area after it.
DISK_SECTOR = 512
DISK_DATA_LBA = 2048
DISK_WRITE_LBA = DISK_DATA_LBA + DATA_BYTES // DISK_SECTOR
DISK_WRITE_SECTORS = 16
DISK_SIZE = 4 << 20
CD_SECTOR = 2048

MAGIC = b"HVFBOOT1"
PARAMS_OFFSET = 0x10
#: magic, tag, stage sectors, sector size, data LBA, data sectors, seed, write LBA,
#: write sectors (bootdisk.S ``params``).
PARAMS = struct.Struct("<8s16sHHIIIIH2x")
MAX_TAG = 15
#: The program's buffer: one int 13h call moves at most this much.
MAX_TRANSFER = 32 * 1024


class BootDiskError(RuntimeError):
    """The boot program could not be built, or an image does not hold what it should."""


@attrs.frozen
class BootReport:
    """What the boot program printed for one tag (None: the line is missing)."""

    drive: int | None = None
    sector: int | None = None
    read_bytes: int | None = None
    read_failure: str | None = None
    wrote: int | None = None
    write_failure: str | None = None
    done: bool = False

    @property
    def booted(self) -> bool:
        return self.drive is not None

    @property
    def passed(self) -> bool:
        """Booted, read all of the data correctly, wrote (if asked), finished."""
        return (self.booted and self.done and self.read_bytes == DATA_BYTES
                and self.read_failure is None and self.write_failure is None)


@attrs.frozen
class BootDisk:
    """An image made by :func:`make_disk` or :func:`make_iso`, and where its parts are
    (in the medium's sectors)."""

    path: Path
    tag: str
    seed: int
    sector: int
    data_lba: int
    write_lba: int
    write_sectors: int

    def report(self, console: str) -> BootReport:
        """Parse this disk's lines out of the COM1 output ``console``."""
        fields: dict[str, object] = {}
        prefix = rf"^bootdisk {re.escape(self.tag)} "
        for line in console.replace("\r", "").splitlines():
            if m := re.match(prefix + r"drive ([0-9a-f]{2}) sector (\d+)$", line):
                fields["drive"], fields["sector"] = int(m[1], 16), int(m[2])
            elif m := re.match(prefix + r"read (\d+) bytes ok$", line):
                fields["read_bytes"] = int(m[1])
            elif m := re.match(prefix + r"read FAIL (.*)$", line):
                fields["read_failure"] = m[1]
            elif m := re.match(prefix + r"wrote (\d+) sectors at lba [0-9a-f]{8}$", line):
                fields["wrote"] = int(m[1])
            elif m := re.match(prefix + r"write FAIL (.*)$", line):
                fields["write_failure"] = m[1]
            elif re.match(prefix + r"done$", line):
                fields["done"] = True
        return BootReport(**fields)  # type: ignore[arg-type]

    def check_written(self) -> None:
        """Check that the write area holds the program's pattern and the data area is
        untouched; :class:`BootDiskError` names the first bad sector."""
        if not self.write_sectors:
            raise BootDiskError(f"{self.path}: this image has no write area")
        with open(self.path, "rb") as f:
            f.seek(self.write_lba * self.sector)
            got = f.read(self.write_sectors * self.sector)
            f.seek(self.data_lba * self.sector)
            data = f.read(DATA_BYTES)
        _compare(self.path, got, pattern(~self.seed, len(got)), self.write_lba, self.sector,
                 "write area")
        _compare(self.path, data, pattern(self.seed, DATA_BYTES), self.data_lba, self.sector,
                 "data area")


def _compare(path: Path, got: bytes, want: bytes, lba: int, sector: int, what: str) -> None:
    if got == want:
        return
    if len(got) != len(want):
        raise BootDiskError(f"{path}: the {what} is cut short ({len(got)} of {len(want)} bytes)")
    first = next(i for i in range(0, len(want), sector) if got[i:i + sector] != want[i:i + sector])
    raise BootDiskError(f"{path}: the {what} differs from the pattern at sector "
                        f"{lba + first // sector}")


def pattern(seed: int, length: int) -> bytes:
    """``length`` bytes (a multiple of 4) where the dword at offset o is seed + o/4."""
    start = seed & 0xFFFF_FFFF
    words = array.array("I", (x & 0xFFFF_FFFF for x in range(start, start + length // 4)))
    assert words.itemsize == 4
    if sys.byteorder == "big":
        words.byteswap()
    return words.tobytes()


@functools.lru_cache(maxsize=1)
def boot_program() -> bytes:
    """The boot program, assembled from ``bootdisk.S`` (parameters not filled in)."""
    with tempfile.TemporaryDirectory(prefix="hvf-bootdisk-") as tmp:
        obj, binary = Path(tmp, "bootdisk.o"), Path(tmp, "bootdisk.bin")
        for cmd in ([AS, "--32", "-o", str(obj), str(SOURCE)],
                    [LD, "-m", "elf_i386", "-Ttext", "0x7c00", "-e", "_start",
                     "--oformat", "binary", "-o", str(binary), str(obj)]):
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except FileNotFoundError as e:
                raise GuestBuildError(f"{cmd[0]} not found ({e}): install GNU binutils") from e
            except subprocess.CalledProcessError as e:
                raise GuestBuildError(f"{' '.join(cmd)} failed:\n{e.stdout}{e.stderr}") from e
        program = binary.read_bytes()
    if program[PARAMS_OFFSET:PARAMS_OFFSET + len(MAGIC)] != MAGIC or len(program) % 512:
        raise GuestBuildError(f"{SOURCE}: the program lacks its parameter block")
    return program


def _seed(tag: str, seed: int | None) -> int:
    return zlib.crc32(tag.encode()) if seed is None else seed & 0xFFFF_FFFF


def _check_tag(tag: str) -> None:
    if not tag or len(tag) > MAX_TAG or not tag.isascii() or not tag.isprintable() or " " in tag:
        raise ValueError(f"bootdisk tag {tag!r}: 1-{MAX_TAG} printable ASCII characters, "
                         "no spaces")


def _program(disk: BootDisk, *, stage: int) -> bytes:
    program = bytearray(boot_program())
    PARAMS.pack_into(program, PARAMS_OFFSET, MAGIC, disk.tag.encode(), stage, disk.sector,
                     disk.data_lba, DATA_BYTES // disk.sector, disk.seed, disk.write_lba,
                     disk.write_sectors)
    return bytes(program)


def make_disk(path: os.PathLike[str] | str, *, tag: str = "disk", seed: int | None = None,
              size: int = DISK_SIZE) -> BootDisk:
    """Write a raw (sparse) disk image at ``path``: the boot program as its MBR, the
    1 MiB pattern at LBA 2048, a write area of 16 sectors at LBA 4096."""
    _check_tag(tag)
    end = (DISK_WRITE_LBA + DISK_WRITE_SECTORS) * DISK_SECTOR
    if size < end or size % DISK_SECTOR:
        raise ValueError(f"bootdisk image size {size}: at least {end}, in whole sectors")
    disk = BootDisk(Path(path), tag, _seed(tag, seed), DISK_SECTOR, DISK_DATA_LBA,
                    DISK_WRITE_LBA, DISK_WRITE_SECTORS)
    program = _program(disk, stage=len(boot_program()) // DISK_SECTOR - 1)
    with open(disk.path, "wb") as f:
        f.write(program)
        f.seek(DISK_DATA_LBA * DISK_SECTOR)
        f.write(pattern(disk.seed, DATA_BYTES))
        f.truncate(size)  # the write area reads as zeros until the guest writes it
    return disk


def make_iso(path: os.PathLike[str] | str, *, tag: str = "cd",
             seed: int | None = None) -> BootDisk:
    """Write an ISO 9660 image at ``path`` (with ``xorriso``, Debian's package xorriso)
    whose El Torito no-emulation boot image is the boot program, and whose file
    ``DATA.BIN`` is the 1 MiB pattern; it has no write area."""
    _check_tag(tag)
    xorriso = shutil.which("xorriso")
    if xorriso is None:
        raise BootDiskError("xorriso not found: install Debian's xorriso (scripts/setup does)")
    disk = BootDisk(Path(path), tag, _seed(tag, seed), CD_SECTOR, 0, 0, 0)
    data = pattern(disk.seed, DATA_BYTES)
    program = boot_program()
    with tempfile.TemporaryDirectory(prefix="hvf-bootiso-") as tmp:
        Path(tmp, "BOOT.BIN").write_bytes(program)
        Path(tmp, "DATA.BIN").write_bytes(data)
        cmd = [xorriso, "-as", "mkisofs", "-quiet", "-o", str(disk.path), "-V", "HVFBOOT",
               "-b", "BOOT.BIN", "-no-emul-boot", "-boot-load-size",
               str(len(program) // 512), "-c", "BOOT.CAT", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise BootDiskError(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    with open(disk.path, "r+b") as f:
        image = f.read()
        boot = _find_sector(image, PARAMS_OFFSET, program[PARAMS_OFFSET:PARAMS_OFFSET + 16])
        data_lba = _find_sector(image, 0, data[:64])
        disk = attrs.evolve(disk, data_lba=data_lba)
        f.seek(boot * CD_SECTOR)
        f.write(_program(disk, stage=0))
    return disk


def _find_sector(image: bytes, offset: int, needle: bytes) -> int:
    """The first 2048-byte sector holding ``needle`` at ``offset``."""
    for lba in range(len(image) // CD_SECTOR):
        start = lba * CD_SECTOR + offset
        if image[start:start + len(needle)] == needle:
            return lba
    raise BootDiskError("xorriso's image does not hold the boot program and its data")


def seabios_args(console: os.PathLike[str] | str, *,
                 debug: os.PathLike[str] | str | None = None) -> list[str]:
    """hvf options for a SeaBIOS boot with COM1 logged to the file ``console`` (and
    SeaBIOS's own log, port 0x402, to ``debug``) and pc-testdev's exit port: add the
    disks (``-s``) and the VM name."""
    args = ["-s", "0,hostbridge", "-s", "31,lpc", "-l", f"com1,file={console}",
            "-l", "pc-testdev", "-l", f"bootrom,{SEABIOS}"]
    if debug is not None:
        args += ["-l", f"debugcon,{debug}"]
    return args
