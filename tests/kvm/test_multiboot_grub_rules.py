# SPDX-License-Identifier: BSD-2-Clause
"""Multiboot as GRUB and QEMU do it: the boot information after the loaded image (so an
image linked low boots), ``PATH ARGS`` as the command line, ACPI tables with the PM
timer, and pc-testdev's page-flush port."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from conftest import run_guest
from hvf.testing.plugin import GuestBuilder, HvfRunner

pytestmark = pytest.mark.kvm

PAGE = 4096


def _lowload(stdout: str) -> tuple[int, int, int]:
    m = re.search(r"^lowload main ([0-9a-f]{8}) end ([0-9a-f]{8}) mbi ([0-9a-f]{8})$",
                  stdout, re.M)
    assert m, stdout
    main, end, mbi = (int(x, 16) for x in m.groups())
    return main, end, mbi


def test_an_image_linked_at_0x8000_boots(guests: dict[str, Path]) -> None:
    kernel = guests["lowload"]
    r = run_guest(kernel, append="exit=3")
    assert r.returncode == (3 << 1) | 1, r.stderr
    main, end, mbi = _lowload(r.stdout)
    assert 0x8000 <= main < end < 0x10000
    # The boot information lies after the image, on the next page.
    assert mbi == -(-end // PAGE) * PAGE


def test_boot_information_follows_the_modules(guests: dict[str, Path], tmp_path: Path) -> None:
    module = tmp_path / "mod.bin"
    module.write_bytes(b"M" * 5000)
    r = run_guest(guests["lowload"], "--initrd", str(module))
    assert r.returncode == 1, r.stderr
    _main, end, mbi = _lowload(r.stdout)
    module_start = -(-end // PAGE) * PAGE
    assert mbi == module_start + 2 * PAGE  # 5000 bytes of module, page-aligned after


def test_the_command_line_is_the_kernel_path_then_the_arguments(
    guests: dict[str, Path],
) -> None:
    kernel = guests["hello"]
    r = run_guest(kernel, append="exit=5 console=none")
    assert r.returncode == (5 << 1) | 1, r.stderr
    assert r.stdout.splitlines()[1] == f"cmdline {kernel} exit=5 console=none"
    r = run_guest(kernel)
    assert r.stdout.splitlines()[1] == f"cmdline {kernel}"  # GRUB: no trailing space


def test_a_multiboot_guest_finds_the_rsdp_and_reads_the_pm_timer(
    guests: dict[str, Path],
) -> None:
    r = run_guest(guests["acpi_pmtimer"])
    lines = r.stdout.splitlines()
    assert r.returncode == 1, (lines, r.stderr)  # main returned 0
    rsdp = int(lines[0].removeprefix("rsdp "), 16)
    assert 0xE0000 <= rsdp < 0x100000 and rsdp % 16 == 0
    assert lines[1].startswith("fadt ")
    assert lines[2] == "pm_tmr 0608 bits 32"  # the LPC plugin's PM block at 0x600
    t0, t1 = (int(x, 16) for x in lines[3].split()[1:])
    # 3.579545 MHz: two reads a few exits apart differ by a little, never by a wrap.
    assert 0 < (t1 - t0) % (1 << 32) < 3_579_545, lines


def test_the_page_flush_port_takes_a_32_bit_address(hvf_guest: GuestBuilder,
                                                    hvf_run: HvfRunner) -> None:
    guest = hvf_guest("""
        .include "guest.inc"
        .text
        .globl main
    main:
        movl $0x100000, %eax
        outl %eax, $0xe4
        PUTS_LIT "flushed\\n"
        xorl %eax, %eax
        ret
    """, name="flushpage")
    r = hvf_run.guest(guest, "-e")  # strict I/O: an unhandled port would stop it (4)
    assert (r.returncode, r.stdout) == (1, "flushed\n"), r.stderr


def test_an_image_over_the_acpi_tables_is_refused(tmp_path: Path) -> None:
    """The a.out kludge: the header names the load addresses (0xE0000 here)."""
    flags = (1 << 16) | 3
    magic = 0x1BADB002
    header = struct.pack("<3I5I", magic, flags, -(magic + flags) & 0xFFFFFFFF,
                         0xE0000, 0xE0000, 0, 0, 0xE0020)
    kernel = tmp_path / "acpi-clash.bin"
    kernel.write_bytes(header + b"\xf4" * 64)
    r = run_guest(kernel)
    assert r.returncode == 4
    assert "overlaps the ACPI tables at 0xe0000-0xf0000" in r.stderr, r.stderr
