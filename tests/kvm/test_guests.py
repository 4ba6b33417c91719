# SPDX-License-Identifier: BSD-2-Clause
"""Test kernels on real KVM: multiboot loading, port I/O, PCI, exits and errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import PVM, run_guest

pytestmark = pytest.mark.kvm


def test_multiboot_info_and_exit_status(guests: dict[str, Path], tmp_path: Path) -> None:
    mod_a = tmp_path / "a.bin"
    mod_a.write_bytes(b"A" * 5000)
    mod_b = tmp_path / "b.bin"
    mod_b.write_bytes(b"xyz")
    r = run_guest(
        guests["hello"], "-m", "512M",
        "--initrd", f"{mod_a} first arg,{mod_b}",
        append="console=none exit=21",
    )
    lines = r.stdout.splitlines()
    assert r.returncode == (21 << 1) | 1, r.stderr
    assert lines[0] == "hello"
    assert lines[1] == f"cmdline {guests['hello']} console=none exit=21"
    assert lines[2] == "mem lower 639 upper 523264"  # 512 MiB - 1 MiB, in KiB
    mmap = [tuple(int(x, 16) for x in l.split()[1:3]) + (int(l.split()[3]),)
            for l in lines if l.startswith("mmap ")]
    assert mmap == [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2), (0x100000, 511 << 20, 1),
    ]
    modules = [l.split(maxsplit=3) for l in lines if l.startswith("module ")]
    assert [(int(m[2], 16) - int(m[1], 16), m[3]) for m in modules] == [
        (5000, f"{mod_a} first arg"), (3, str(mod_b)),
    ]
    assert all(int(m[1], 16) % 4096 == 0 for m in modules)  # page-aligned, as asked


def test_memory_above_the_pci_hole(guests: dict[str, Path]) -> None:
    r = run_guest(guests["hello"], "-m", "4G")
    mmap = [l.split() for l in r.stdout.splitlines() if l.startswith("mmap ")]
    assert ["mmap", "0000000100000000", "0000000040000000", "1"] in mmap
    assert ["mmap", "0000000000100000", "00000000bff00000", "1"] in mmap


def test_port_io_of_every_width_and_string_io(guests: dict[str, Path]) -> None:
    r = run_guest(guests["io"])
    assert r.stdout.splitlines() == [
        "io ok", "rep outsb through the debug console ok!", "string io ok",
    ], r.stderr
    assert r.returncode == 1


def test_unhandled_ports_read_all_ones_and_are_logged(guests: dict[str, Path]) -> None:
    r = run_guest(guests["strictio"])
    assert r.stdout.splitlines() == ["read 1234 ff", "wrote 1234"]
    assert r.returncode == 1
    assert "unhandled inb port 0x1234" in r.stderr
    assert "unhandled outb port 0x1234" in r.stderr


def test_strict_io_stops_with_status_4_naming_port_and_rip(guests: dict[str, Path]) -> None:
    r = run_guest(guests["strictio"], "-e")
    assert r.returncode == 4
    assert r.stdout == ""
    assert re.search(r"Unhandled inb 0x1234 at 0x10[0-9a-f]{4}\b", r.stderr), r.stderr


def test_pci_scan_finds_exactly_the_configured_devices(guests: dict[str, Path]) -> None:
    r = run_guest(guests["pciscan"], "-s", "4,hostbridge")
    found = re.findall(r"^pci (\S+) (\S+) class (\S+)", r.stdout, re.M)
    assert found == [
        ("00:00.0", "1275:1275", "060000"),
        ("00:04.0", "1275:1275", "060000"),
        ("00:1f.0", "8086:7000", "060100"),
    ]
    assert "narrow 75 1275" in r.stdout  # byte and word reads through 0xCFC
    assert r.stdout.endswith("scan done\n") and r.returncode == 1


def test_multifunction_slot_sets_header_bit(guests: dict[str, Path]) -> None:
    r = run_guest(guests["pciscan"], "-s", "5:0,amd_hostbridge", "-s", "5:3,hostbridge")
    assert re.search(r"^pci 00:05\.0 1022:7432 class 060000 hdr 80", r.stdout, re.M)
    assert re.search(r"^pci 00:05\.3 1275:1275 class 060000 hdr 80", r.stdout, re.M)


def test_smp_start_with_init_sipi_and_fw_cfg_cpu_count(guests: dict[str, Path]) -> None:
    r = run_guest(guests["smp"], "-c", "4", "-l", "fwcfg")
    lines = r.stdout.splitlines()
    assert lines[0] == "fwcfg QEMU cpus 4", r.stderr
    assert sorted(l for l in lines if l.startswith("ap ")) == [
        "ap apic id 1", "ap apic id 2", "ap apic id 3",
    ]
    assert lines[-2:] == ["bsp apic id 0", "cpus up 4"]
    assert r.returncode == 1


def test_triple_fault_exits_3(guests: dict[str, Path]) -> None:
    """On kvm_pvm KVM cannot emulate the int3 itself; hvf injects the #BP in its place."""
    r = run_guest(guests["triplefault"])
    assert r.stdout == "about to fault\n"
    assert r.returncode == 3, r.stderr


@pytest.mark.skipif(not PVM, reason="only kvm_pvm fails to emulate int3; hardware runs it")
def test_emulation_failure_without_user_space_help_is_reported(guests: dict[str, Path]) -> None:
    r = run_guest(guests["triplefault"], "-o", "x86.emulate=false")
    assert r.returncode == 4
    assert "instruction emulation failed" in r.stderr
    assert "instruction bytes: cc" in r.stderr
    assert re.search(r"rip=0000000000100[0-9a-f]{3}", r.stderr)
    assert "hint: KVM could not emulate this instruction; this host's KVM is kvm_pvm" in r.stderr


def test_emulation_failure_stops_with_status_4_and_a_report(guests: dict[str, Path]) -> None:
    r = run_guest(guests["mmioexec"])
    assert r.stdout == "jumping into mmio\n"
    assert r.returncode == 4
    assert "KVM_EXIT_INTERNAL_ERROR: instruction emulation failed" in r.stderr
    assert "rip=00000000d0000000" in r.stderr
    assert "hint: the guest is executing at 0xd0000000, which is not RAM" in r.stderr


def test_halt_with_interrupts_disabled_exits_2(guests: dict[str, Path]) -> None:
    r = run_guest(guests["halt"], timeout=60)
    assert r.stdout == "halting\n"
    assert r.returncode == 2
