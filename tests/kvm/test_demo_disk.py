# SPDX-License-Identifier: BSD-2-Clause
"""The demo's disk: SeaBIOS boots GRUB (Debian's grub-pc-bin) from virtio-blk, GRUB's
menu loads the demo kernel from ext2, the kernel prints on COM1 and powers off.

Slow on a kvm_pvm host (GRUB's real-mode BIOS calls are emulated): about a minute."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_hvf
from hvf.testing import bootdisk, grubdisk

pytestmark = pytest.mark.kvm


def test_demo_disk_boots_grub_and_the_kernel(tmp_path: Path) -> None:
    for needed in (bootdisk.SEABIOS, grubdisk.GRUB_DIR / "boot.img"):
        if not needed.exists():
            pytest.skip(f"{needed} is missing: scripts/setup installs seabios and grub-pc-bin")
    image = grubdisk.make_grub_disk(tmp_path / "demo.img", timeout=0)
    console = tmp_path / "com1.log"
    r = run_hvf(["-s", "0,hostbridge", "-s", f"4,virtio-blk,{image}", "-s", "31,lpc",
                 "-l", f"com1,file={console}", "-l", f"debugcon,{tmp_path / 'debug.log'}",
                 "-l", f"bootrom,{bootdisk.SEABIOS}", "vm-demo-disk"], timeout=150)
    text = console.read_text(errors="replace").replace("\r", "")
    assert r.returncode == 1, f"status {r.returncode} (1: powered off)\n{text[-3000:]}"
    for line in ("Booting from Hard Disk...", "GRUB loading.",
                 "Booting `hvf demo kernel (demo_hello, multiboot)'",
                 "hvf demo kernel: hello from a multiboot kernel on COM1\n",
                 "loader GRUB 2.06", "cmdline hvf-demo\n", "powering off\n"):
        assert line in text, text[-3000:]
