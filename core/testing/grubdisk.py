# SPDX-License-Identifier: BSD-2-Clause
"""A bootable disk image built from Debian's GRUB (``grub-pc-bin``), for the demo.

The image is a raw MBR disk, laid out as ``grub-install`` would: GRUB's ``boot.img`` in
sector 0, its ``core.img`` in the gap after it (only what finds the partition built in:
BIOS disks, MBR partitions, ext2), and one ext2 partition from 1 MiB (made with
``mkfs.ext2 -d``, e2fsprogs) holding ``/boot/grub/grub.cfg``, GRUB's modules in
``/boot/grub/i386-pc`` and the kernels. A small core.img matters on a kvm_pvm host:
GRUB decompresses it (LZMA) in emulated supervisor code, about 100 s with the menu's
modules built in, while modules read from the partition load uncompressed. GRUB's
menu is on COM1 (115200 8N1); it boots the first entry when the timeout runs out. No
root rights, loop devices or ``grub-install`` are needed: the two sector addresses
``grub-install`` would patch are GRUB's defaults for this layout (core.img at LBA 1,
the rest of it from LBA 2).

    python -m hvf.testing.grubdisk OUT.img [--timeout S] [--linux KERNEL INITRD CMDLINE]

writes the image (the demo kernel, ``demo_hello``, always; a Linux entry, first, when
``--linux`` is given) and prints its path. :func:`make_grub_disk` does the same from
Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs

from hvf.testing.guests import RUNTIME, build_guest

__all__ = ["GRUB_DIR", "GrubDiskError", "LinuxEntry", "demo_kernel", "make_grub_disk"]

#: Debian's GRUB for BIOS machines (package grub-pc-bin).
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
#: Built into core.img: enough to read ``$prefix`` (the rest loads from there).
CORE_MODULES = ("biosdisk", "part_msdos", "ext2")
#: Loaded by grub.cfg (``normal``, the menu, is loaded by core.img from ``$prefix``).
CFG_MODULES = ("serial", "terminal", "multiboot", "echo")
SECTOR = 512
#: The partition starts at 1 MiB; core.img must fit in the sectors before it.
PARTITION_LBA = 2048
PARTITION_TYPE_LINUX = 0x83
PARTITION_TABLE = 0x1BE
SIGNATURE = 0x1FE
#: boot.img's short jump over its boot drive check (GRUB_BOOT_MACHINE_DRIVE_CHECK).
DRIVE_CHECK = 0x66
#: Status, CHS start, type, CHS end, LBA start, sectors ("LBA only" CHS values).
PARTITION_ENTRY = struct.Struct("<B3sB3sII")
CHS_LBA_ONLY = b"\xfe\xff\xff"
DEMO_KERNEL = "demo_hello"


class GrubDiskError(RuntimeError):
    """A tool or file the image needs is missing, or a tool failed (the message says
    which)."""


@attrs.frozen
class LinuxEntry:
    """A Linux kernel and initramfs for the menu's first entry."""

    kernel: Path
    initrd: Path
    cmdline: str


def demo_kernel(out_dir: os.PathLike[str] | str) -> Path:
    """Build the demo kernel (``hvf/testing/guests/demo_hello.S``, a multiboot kernel
    that prints on COM1 and powers off) into ``out_dir``."""
    return build_guest(RUNTIME / f"{DEMO_KERNEL}.S", out_dir)


def _run(cmd: list[str]) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise GrubDiskError(f"{cmd[0]} not found: {e}") from e
    if r.returncode:
        raise GrubDiskError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n"
                            f"{r.stdout}{r.stderr}")


def _grub_cfg(timeout: int, linux: LinuxEntry | None) -> str:
    modules = (*CFG_MODULES, "linux") if linux is not None else CFG_MODULES
    lines = [*(f"insmod {name}" for name in modules),
             "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1",
             "terminal_input serial", "terminal_output serial",
             f"set timeout={timeout}", "set default=0", ""]
    if linux is not None:
        lines += ['menuentry "Debian Linux (busybox initramfs)" {',
                  f"    linux /boot/{linux.kernel.name} {linux.cmdline}",
                  f"    initrd /boot/{linux.initrd.name}", "}", ""]
    lines += [f'menuentry "hvf demo kernel ({DEMO_KERNEL}, multiboot)" {{',
              f"    echo 'Loading /boot/{DEMO_KERNEL}.elf ...'",
              f"    multiboot /boot/{DEMO_KERNEL}.elf hvf-demo",
              "    boot", "}", ""]
    return "\n".join(lines)


def make_grub_disk(path: os.PathLike[str] | str, *, timeout: int = 5,
                   linux: LinuxEntry | None = None) -> Path:
    """Write the GRUB disk image at ``path`` (replacing it) and return its path.

    ``timeout`` is the menu's, in seconds. Raises :class:`GrubDiskError` when GRUB
    (``/usr/lib/grub/i386-pc``, ``grub-mkimage``) or ``mkfs.ext2`` is missing.
    """
    if not (GRUB_DIR / "boot.img").is_file():
        raise GrubDiskError(f"{GRUB_DIR}/boot.img is missing: install Debian's grub-pc-bin "
                            "(scripts/setup does)")
    for tool in ("grub-mkimage", "mkfs.ext2"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise GrubDiskError(f"{tool} not found: install grub-common / e2fsprogs")
    out = Path(path)
    with tempfile.TemporaryDirectory(prefix="hvf-grubdisk-") as tmp:
        work = Path(tmp)
        root = work / "root"
        modules = root / "boot" / "grub" / "i386-pc"
        modules.mkdir(parents=True)
        # Modules only: without command.lst and the other lists, normal mode does not
        # read them character by character at start (~20 s on kvm_pvm), and grub.cfg
        # loads the modules it needs with insmod.
        for module in GRUB_DIR.glob("*.mod"):
            shutil.copy(module, modules)
        shutil.copy(demo_kernel(work), root / "boot" / f"{DEMO_KERNEL}.elf")
        if linux is not None:
            shutil.copy(linux.kernel, root / "boot" / linux.kernel.name)
            shutil.copy(linux.initrd, root / "boot" / linux.initrd.name)
        (root / "boot" / "grub" / "grub.cfg").write_text(_grub_cfg(timeout, linux))

        core = work / "core.img"
        _run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-o", str(core),
              "-p", "(hd0,msdos1)/boot/grub", *CORE_MODULES])
        core_bytes = core.read_bytes()
        if len(core_bytes) > (PARTITION_LBA - 1) * SECTOR:
            raise GrubDiskError(f"GRUB's core.img ({len(core_bytes)} bytes) does not fit "
                                f"before the partition at LBA {PARTITION_LBA}")

        content = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        part_sectors = max(8 << 20, content * 5 // 4 + (4 << 20)) // SECTOR
        partition = work / "part.img"
        mkfs = shutil.which("mkfs.ext2") or "/usr/sbin/mkfs.ext2"
        # 4 KiB blocks: GRUB reads a file block by block, through the BIOS.
        _run([mkfs, "-q", "-F", "-b", "4096", "-L", "hvf-demo", "-d", str(root), str(partition),
              f"{part_sectors // 2}k"])

        mbr = bytearray((GRUB_DIR / "boot.img").read_bytes())
        if len(mbr) != SECTOR or mbr[DRIVE_CHECK:DRIVE_CHECK + 2] != b"\xeb\x05":
            raise GrubDiskError(f"{GRUB_DIR}/boot.img is not the boot sector this "
                                "builder knows (GRUB 2.06)")
        # As grub-setup does for a hard disk: the floppy-probe code where the partition
        # table goes gives way to the table, and the jump over the boot drive check
        # becomes two NOPs (a drive number without bit 7 is taken as 0x80).
        mbr[PARTITION_TABLE:SIGNATURE] = bytes(SIGNATURE - PARTITION_TABLE)
        mbr[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
        PARTITION_ENTRY.pack_into(mbr, PARTITION_TABLE, 0x80, CHS_LBA_ONLY,
                                  PARTITION_TYPE_LINUX, CHS_LBA_ONLY, PARTITION_LBA,
                                  part_sectors)
        tmp_image = out.with_name(f".{out.name}.tmp")
        with open(tmp_image, "wb") as f:
            f.write(mbr)
            f.write(core_bytes)
            f.seek(PARTITION_LBA * SECTOR)
            with open(partition, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
        os.replace(tmp_image, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvf.testing.grubdisk",
                                     description="Write hvf's GRUB demo disk image.")
    parser.add_argument("image", type=Path)
    parser.add_argument("--timeout", type=int, default=5, help="menu timeout (s)")
    parser.add_argument("--linux", nargs=3, metavar=("KERNEL", "INITRD", "CMDLINE"),
                        help="a Linux entry, first in the menu")
    args = parser.parse_args(argv)
    linux = None
    if args.linux:
        linux = LinuxEntry(Path(args.linux[0]), Path(args.linux[1]), args.linux[2])
    try:
        print(make_grub_disk(args.image, timeout=args.timeout, linux=linux))
    except (GrubDiskError, OSError) as e:
        print(f"grubdisk: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
