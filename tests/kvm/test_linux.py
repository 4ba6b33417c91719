# SPDX-License-Identifier: BSD-2-Clause
"""Debian's own cloud kernel, booted directly (bzImage, 64-bit entry, ACPI)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import PVM, PVM_REASON, popen_hvf, stop, wait_for_text
from hvf.memory import GuestMemory, parse_size
from hvf.testing import guestkit

pytestmark = pytest.mark.kvm

#: How long the kernel may take to print its e820 map here (decompression runs as
#: emulated supervisor code on kvm_pvm: minutes, not milliseconds).
EARLY_BOOT_TIMEOUT = 900 if PVM else 120


@pytest.fixture(scope="module")
def guest() -> guestkit.Guest:
    try:
        return guestkit.ensure_guest()
    except guestkit.GuestKitError as e:
        pytest.skip(f"cannot fetch the Debian guest kernel: {e}")


def boot(guest: guestkit.Guest, console: Path, append: str, *extra: str,
         name: str) -> subprocess.Popen[bytes]:
    return popen_hvf([*extra, "-s", "0,hostbridge", "-s", "31,lpc", "-l", f"com1,file={console}",
                      "--kernel", str(guest.kernel), "--append", append, name])


def test_debian_kernel_prints_banner_and_hvfs_e820_map(guest: guestkit.Guest, tmp_path: Path) -> None:
    console = tmp_path / "com1.log"
    append = "earlyprintk=serial console=ttyS0 noxsave hvf.test=e820"
    proc = boot(guest, console, append, "-m", "512M", name="linux-e820")
    try:
        text = wait_for_text(console, r"^\[ *[0-9.]+\] printk: bootconsole", proc,
                             EARLY_BOOT_TIMEOUT, regex=True)
    finally:
        stop(proc)
    assert re.search(rf"Linux version {re.escape(guest.kernel_version)} ", text)
    assert re.search(rf"Command line: {re.escape(append)}\s*$", text, re.M)
    printed = [
        (int(m[1], 16), int(m[2], 16) + 1, m[3])
        for m in re.finditer(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)", text)
    ]
    built = [(base, base + length, "usable" if kind == 1 else "reserved")
             for base, length, kind in GuestMemory(parse_size("512M")).e820()]
    assert printed == built


@pytest.mark.skipif(PVM, reason=f"needs hardware-backed KVM: {PVM_REASON}; a full Linux boot "
                    "runs for hours here")
def test_debian_kernel_boots_to_init_with_pci_uart(guest: guestkit.Guest, tmp_path: Path) -> None:
    console = tmp_path / "com1.log"
    base = ["-c", "2", "-m", "512M", "-s", "1,uart"]
    proc = boot(guest, console, "console=ttyS0 hvf.action=poweroff", *base,
                "--initrd", str(guest.initramfs), name="linux-full")
    try:
        status = proc.wait(timeout=300)
    finally:
        stop(proc)
    report = guestkit.parse_report(console.read_text(errors="replace"))
    assert status == 1  # poweroff
    assert report["cpus"] == ["2"]
    pci = "\n".join(report["pci"])
    assert re.search(r"0000:00:01\.0 vendor=0x131f device=0x2000 .*driver=serial", pci)
    assert re.search(r"0000:00:1f\.0 vendor=0x8086 device=0x7000", pci)
    serial = "\n".join(report["serial"])
    assert re.search(r"0: uart:16550A port:000003F8 irq:4", serial)
    interrupts = "\n".join(report["interrupts"])
    assert re.search(r"^\s*\d+:\s+\d+\s+\d+.*serial", interrupts, re.M)

    reboot = boot(guest, tmp_path / "reboot.log", "console=ttyS0 hvf.action=reboot", *base,
                  "--initrd", str(guest.initramfs), name="linux-reboot")
    try:
        assert reboot.wait(timeout=300) == 0
    finally:
        stop(reboot)
