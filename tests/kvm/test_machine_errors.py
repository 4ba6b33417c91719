# SPDX-License-Identifier: BSD-2-Clause
"""Configurations that parse but cannot be built: exit 4 with a message naming the fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_hvf

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize(("args", "message"), [
    (["-s", "0,hostbridge", "-l", "pc-testdev"],
     "LPC device(s) pc-testdev configured, but there is no LPC bridge (add -s 31,lpc)"),
    (["-s", "1:31:0,lpc"], "LPC bridge can be present only on bus 0."),
    (["-s", "30,lpc", "-s", "31,lpc"], "Only one LPC bridge is allowed."),
    (["-s", "0,hostbridge"], "virtual machine cannot be booted"),
    (["-c", "100000", "-s", "0,hostbridge"], "100000 vCPUs requested but only"),
    (["-o", "pci.0.5.0.vendor=1"], 'pci slot 0:5:0: missing "device" value'),
    (["-o", "pci.0.5.0.device=nosuch"], 'pci slot 0:5:0: unknown device "nosuch"'),
    (["-o", "x86.strictio=perhaps"], "invalid boolean value 'perhaps' for 'x86.strictio'"),
    (["-s", "3,hostbridge,pcireg.vendor=0x12345"], "hostbridge: vendor '0x12345' is not a 16-bit ID"),
])
def test_unbuildable_machine(args: list[str], message: str) -> None:
    r = run_hvf([*args, "vm"])
    assert r.returncode == 4, r.stderr
    assert message in r.stderr


def test_kernel_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 10000)
    r = run_hvf(["--kernel", str(junk), "vm"])
    assert r.returncode == 4 and f"'{junk}' is not a kernel hvf can boot" in r.stderr
    r = run_hvf(["--kernel", str(tmp_path / "missing.elf"), "vm"])
    assert r.returncode == 4 and "cannot read kernel" in r.stderr and "missing.elf" in r.stderr


def test_module_that_does_not_fit(guests: dict[str, Path], tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with big.open("wb") as f:
        f.truncate(64 << 20)
    r = run_hvf(["-m", "32M", "--kernel", str(guests["hello"]), "--initrd", str(big), "vm"])
    assert r.returncode == 4  # refused before it is read: larger than guest RAM
    assert f"module '{big}' is 64 MiB, larger than the guest's 32 MiB of RAM" in r.stderr
