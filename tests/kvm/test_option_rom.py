# SPDX-License-Identifier: BSD-2-Clause
"""SeaBIOS finds a device's option ROM behind its expansion ROM BAR (``romfile=PATH``)
and runs it: first a tiny ROM built here, then Debian's iPXE ROM for virtio-net.

On a kvm_pvm host iPXE then stops in KVM's emulator (a protected-mode ``iret``), as it
does under QEMU there; hvf reports that as an emulation failure (exit status 4), not a
crash. With hardware virtualization iPXE goes on to open the card.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import PVM, popen_hvf, run_hvf, stop, wait_for_text
from hvf.testing.bootdisk import SEABIOS, seabios_args

pytestmark = pytest.mark.kvm

#: Debian's iPXE for virtio-net (package ipxe-qemu): a legacy BIOS ROM (code type 0)
#: whose PCI data structure names 1af4:1041, the modern virtio-net hvf's card has.
IPXE_VIRTIO = Path("/usr/lib/ipxe/qemu/pxe-virtio.rom")

#: A legacy option ROM: header, PCI data structure, and an init entry that writes
#: MESSAGE to COM1 by polling its line status register, then returns (``lret``).
ROM_SOURCE = r"""
    .code16
    .globl _start
_start:
    .byte 0x55, 0xaa, 1             /* signature; 1 x 512 bytes */
    jmp init                        /* offset 3: the init entry */
    .org 0x18
    .word pcir
    .balign 4
pcir:
    .ascii "PCIR"
    .word VENDOR, DEVICE
    .word 0, 0x18                   /* device list; structure length */
    .byte 0, 0, 0, 0xff             /* revision; class code */
    .word 1, 0                      /* image length (x 512); code revision */
    .byte 0, 0x80                   /* x86 code; the last image */
    .word 0
init:
    pushw %ax
    pushw %dx
    pushw %si
    pushw %ds
    pushw %cs
    popw %ds
    movw $message, %si
next:
    lodsb
    testb %al, %al
    jz done
    movb %al, %ah
    movw $0x3fd, %dx                /* COM1 line status */
wait:
    inb %dx, %al
    testb $0x20, %al                /* transmitter holding register empty */
    jz wait
    movb %ah, %al
    movw $0x3f8, %dx
    outb %al, %dx
    jmp next
done:
    popw %ds
    popw %si
    popw %dx
    popw %ax
    lret
message:
    .asciz MESSAGE
    .org 511
    .byte 0                         /* checksum, set below */
"""


def build_rom(out: Path, name: str, vendor: int, device: int, message: str) -> Path:
    """A 512-byte option ROM for ``vendor:device`` whose init prints ``message``."""
    source, obj, rom = out / f"{name}.S", out / f"{name}.o", out / f"{name}.rom"
    source.write_text(ROM_SOURCE.replace("VENDOR", hex(vendor)).replace("DEVICE", hex(device))
                      .replace("MESSAGE", f'"{message}\\r\\n"'))
    for command in ([os.environ.get("HVF_GUEST_AS", "as"), "--32", "-o", obj, source],
                    [os.environ.get("HVF_GUEST_LD", "ld"), "-m", "elf_i386", "-Ttext=0",
                     "--oformat", "binary", "-o", rom, obj]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"
    image = bytearray(rom.read_bytes())
    assert len(image) == 512
    image[-1] = -sum(image[:-1]) & 0xFF
    rom.write_bytes(image)
    return rom


@pytest.fixture(scope="module")
def seabios() -> Path:
    if not SEABIOS.exists():
        pytest.skip(f"{SEABIOS} is missing: install Debian's seabios package (scripts/setup does)")
    return SEABIOS


def test_seabios_runs_the_rom_of_the_device_it_names(seabios: Path, tmp_path: Path) -> None:
    rng = build_rom(tmp_path, "rng", 0x1AF4, 0x1044, "hvf option ROM for 1af4:1044 ran")
    other = build_rom(tmp_path, "other", 0x1AF4, 0x1044, "a ROM for another device ran")
    console, debug = tmp_path / "com1.log", tmp_path / "debug.log"
    proc = popen_hvf([*seabios_args(console, debug=debug),
                      "-s", f"4,virtio-rnd,romfile={rng}",
                      "-s", f"5,uart,romfile={other}",  # 131f:2000: not the ROM's IDs
                      "rom-vm"])
    try:
        text = wait_for_text(console, "No bootable device", proc, timeout=240)
    finally:
        stop(proc, signal.SIGTERM, timeout=30)
    assert text.count("hvf option ROM for 1af4:1044 ran\n") == 1
    assert "another device" not in text
    log = debug.read_text(errors="replace")
    # the firmware sized both ROM BARs (2 KiB, in its 4 KiB granules) and ran one ROM
    for bdf in ("00:04.0", "00:05.0"):
        assert re.search(rf"PCI: map device bdf={bdf}\s+bar 6, addr [0-9a-f]+, size 00001000",
                         log), log
    assert log.count("Running option rom at") == 1
    assert "WARNING" not in log


def test_a_romfile_hvf_cannot_read_exits_4(tmp_path: Path) -> None:
    for path, why in ((tmp_path / "missing.rom", "cannot open it: No such file or directory"),
                      (tmp_path, "is not a regular file")):
        r = run_hvf(["-s", "0,hostbridge", "-s", f"4,virtio-rnd,romfile={path}",
                     "-s", "31,lpc", "vm-badrom"])
        assert r.returncode == 4, r.stderr
        assert f"pci slot 0:4:0 (virtio-rnd): option ROM '{path}'" in r.stderr
        assert why in r.stderr and "Traceback" not in r.stderr


def test_ipxe_finds_and_initialises_virtio_net(seabios: Path, tmp_path: Path) -> None:
    if not IPXE_VIRTIO.exists():
        pytest.skip(f"{IPXE_VIRTIO} is missing: install Debian's ipxe-qemu package")
    try:
        from hvf.plugins.net import _slirp  # noqa: F401
    except ImportError:
        pytest.skip("hvf was built without libslirp (libslirp-dev): no back end without root")
    console, debug = tmp_path / "com1.log", tmp_path / "debug.log"
    proc = popen_hvf([*seabios_args(console, debug=debug),
                      "-s", f"3,virtio-net,slirp,romfile={IPXE_VIRTIO}", "ipxe-vm"])
    try:
        if PVM:
            _out, err = proc.communicate(timeout=300)
        else:  # iPXE goes on and opens the card, its MAC the one hvf derived
            wait_for_text(console, r"net0: 58:9c:fc(:[0-9a-f]{2}){3} using virtio-net on "
                          r"0000:00:03.0", proc, timeout=300, regex=True)
    finally:
        stop(proc, signal.SIGTERM, timeout=30)
    text = console.read_text(errors="replace")
    # SeaBIOS found the ROM behind the ROM BAR and ran its init: iPXE's banner
    assert re.search(r"iPXE \(http://ipxe\.org\) 00:03\.0 [0-9A-F]{4} PCI2\.10 PnP PMM", text)
    assert "iPXE initialising devices...ok" in text, text
    assert re.search(r"PCI: map device bdf=00:03\.0\s+bar 6, addr [0-9a-f]+, size 00020000",
                     debug.read_text(errors="replace"))
    if PVM:
        assert proc.returncode == 4, err
        report = err.decode(errors="replace")
        assert "KVM_EXIT_INTERNAL_ERROR: instruction emulation failed" in report, report
        assert "hint: KVM could not emulate this instruction; this host's KVM is kvm_pvm" in report
        assert "Traceback" not in report
