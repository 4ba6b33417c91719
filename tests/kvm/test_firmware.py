# SPDX-License-Identifier: BSD-2-Clause
"""SeaBIOS through ``-l bootrom``: banner, PCI enumeration, BARs where hvf routes them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import popen_hvf, run_hvf, stop, wait_for_text

pytestmark = pytest.mark.kvm

SEABIOS = Path("/usr/share/seabios/bios.bin")


@pytest.fixture(scope="module")
def seabios() -> Path:
    """Debian's SeaBIOS (package seabios), installed by scripts/setup."""
    if not SEABIOS.exists():
        pytest.skip(f"{SEABIOS} is missing: install Debian's seabios package (scripts/setup does)")
    return SEABIOS


def test_seabios_boots_to_no_bootable_device(seabios: Path, tmp_path: Path) -> None:
    console, debug = tmp_path / "com1.log", tmp_path / "debug.log"
    name = "seabios-vm"
    proc = popen_hvf(["-s", "0,hostbridge", "-s", "1,uart", "-s", "3:0,uart",
                      "-s", "31,lpc", "-l", f"com1,file={console}", "-l", f"debugcon,{debug}",
                      "-l", f"bootrom,{seabios}", name])
    try:
        text = wait_for_text(console, "No bootable device", proc, timeout=120)
        assert re.search(r"SeaBIOS \(version [^)]+\)", text)
        log = debug.read_text(errors="replace")
        # every -s device was enumerated by the firmware
        for bdf, ids in (("00:00.0", "1275:1275"), ("00:01.0", "131f:2000"),
                         ("00:03.0", "131f:2000"), ("00:1f.0", "8086:7000")):
            assert f"PCI: init bdf={bdf} id={ids}" in log
        assigned = {
            (m["bdf"], int(m["bar"])): int(m["addr"], 16)
            for m in re.finditer(r"PCI: map device bdf=(?P<bdf>\S+)\s+bar (?P<bar>\d+), "
                                 r"addr (?P<addr>[0-9a-f]+), size [0-9a-f]+ \[io\]", log)
        }
        assert set(assigned) == {("00:01.0", 0), ("00:03.0", 0)}
        ctl = subprocess.run([sys.executable, "-m", "hvf", "ctl", "--vm", name, "--json",
                              "call", "iomap"], capture_output=True, text=True, timeout=30)
        assert ctl.returncode == 0, ctl.stderr
        ports = {r["owner"]: r["base"] for r in json.loads(ctl.stdout)["ports"]}
        # hvf routes the ports the firmware programmed to the devices behind them
        assert ports["uart@pci.0.1.0 BAR0"] == assigned[("00:01.0", 0)]
        assert ports["uart@pci.0.3.0 BAR0"] == assigned[("00:03.0", 0)]
        assert "Found 4 serial ports" in log  # COM1-COM4 on the LPC bus
    finally:
        stop(proc, signal.SIGTERM, timeout=30)


def test_bootrom_errors(tmp_path: Path) -> None:
    odd = tmp_path / "odd.rom"
    odd.write_bytes(b"\0" * 1000)
    r = run_hvf(["-s", "31,lpc", "-l", f"bootrom,{odd}", "vm-badrom"])
    assert r.returncode == 4 and "must be a non-empty multiple of 4096 bytes" in r.stderr
    r = run_hvf(["-s", "31,lpc", "-l", f"bootrom,{tmp_path / 'missing.rom'}", "vm-norom"])
    assert r.returncode == 4 and "cannot read boot ROM" in r.stderr
    r = run_hvf(["-s", "31,lpc", "-l", "bootrom", "vm-x"])
    assert r.returncode == 4 and 'invalid bootrom option "bootrom"' in r.stderr  # hvf.exitcodes


def test_seabios_maps_the_virtio_bars_where_hvf_routes_them(seabios: Path, tmp_path: Path) -> None:
    console, debug = tmp_path / "com1.log", tmp_path / "debug.log"
    name = "seabios-virtio"
    proc = popen_hvf(["-s", "0,hostbridge", "-s", "4,virtio-rnd",
                      "-s", f"5,virtio-console,port0=file={tmp_path / 'port0'}",
                      "-s", "31,lpc", "-l", f"com1,file={console}", "-l", f"debugcon,{debug}",
                      "-l", f"bootrom,{seabios}", name])
    try:
        wait_for_text(console, "No bootable device", proc, timeout=120)
        log = debug.read_text(errors="replace")
        for bdf, ids in (("00:04.0", "1af4:1044"), ("00:05.0", "1af4:1043")):
            assert f"PCI: init bdf={bdf} id={ids}" in log
        assigned = {
            m["bdf"]: int(m["addr"], 16)
            for m in re.finditer(r"PCI: map device bdf=(?P<bdf>\S+)\s+bar 4, "
                                 r"addr (?P<addr>[0-9a-f]+), size 00008000 \[mem\]", log)
        }
        assert set(assigned) == {"00:04.0", "00:05.0"}, log
        ctl = subprocess.run([sys.executable, "-m", "hvf", "ctl", "--vm", name, "--json",
                              "call", "iomap"], capture_output=True, text=True, timeout=30)
        assert ctl.returncode == 0, ctl.stderr
        mmio = {r["owner"]: r["base"] for r in json.loads(ctl.stdout)["mmio"]}
        assert mmio["virtio-rnd@pci.0.4.0 BAR4"] == assigned["00:04.0"]
        assert mmio["virtio-console@pci.0.5.0 BAR4"] == assigned["00:05.0"]
    finally:
        stop(proc, signal.SIGTERM, timeout=30)
