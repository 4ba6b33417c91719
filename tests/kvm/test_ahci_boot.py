# SPDX-License-Identifier: BSD-2-Clause
"""SeaBIOS boots from the AHCI controller: the boot program on an AHCI disk (1 MiB read
through int 13h and checked, a pattern written and found in the image) and as the El
Torito image of an ISO on an AHCI CD-ROM; ``bootindex`` choosing between the ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_hvf
from hvf.testing import bootdisk

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module", autouse=True)
def seabios() -> None:
    if not bootdisk.SEABIOS.exists():
        pytest.skip(f"{bootdisk.SEABIOS} is missing: install Debian's seabios package "
                    "(scripts/setup does)")


def boot(tmp_path: Path, slot: str, name: str) -> tuple[str, str]:
    """Boot SeaBIOS with the AHCI controller ``slot`` (a -s option); COM1's output and
    SeaBIOS's log."""
    console, debug = tmp_path / "com1.log", tmp_path / "debug.log"
    r = run_hvf([*bootdisk.seabios_args(console, debug=debug), "-s", slot, name], timeout=180)
    text = console.read_text(errors="replace")
    log = debug.read_text(errors="replace")
    # pc-testdev exit: 1 when the boot program passed, 3 when it failed
    assert r.returncode == 1, f"status {r.returncode}\n{text}\n{log[-3000:]}\n{r.stderr[-2000:]}"
    return text, log


def test_seabios_boots_an_ahci_disk(tmp_path: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "boot.img", tag="ahci-hd")
    text, log = boot(tmp_path, f"4,ahci-hd,{disk.path}", "vm-ahci-hd")
    report = disk.report(text)
    assert report.passed, text
    assert (report.drive, report.sector, report.wrote) == (0x80, 512, 16)
    disk.check_written()  # the guest's int 13h write is in the image file
    assert "AHCI/0: registering" in log and "ATA-" in log


def test_seabios_boots_an_el_torito_iso_on_an_ahci_cd(tmp_path: Path) -> None:
    iso = bootdisk.make_iso(tmp_path / "boot.iso", tag="ahci-cd")
    text, log = boot(tmp_path, f"4,ahci-cd,{iso.path}", "vm-ahci-cd")
    report = iso.report(text)
    assert report.passed, text
    assert report.sector == 2048 and report.drive is not None and report.drive >= 0xE0
    assert "DVD/CD [AHCI/0" in log


@pytest.mark.parametrize("first", ["disk", "cd"])
def test_bootindex_picks_the_port(tmp_path: Path, first: str) -> None:
    disk = bootdisk.make_disk(tmp_path / "boot.img", tag="port-hd")
    iso = bootdisk.make_iso(tmp_path / "boot.iso", tag="port-cd")
    hd_index, cd_index = (0, 1) if first == "disk" else (1, 0)
    text, log = boot(tmp_path, f"4,ahci,hd:{disk.path},bootindex={hd_index},"
                               f"cd:{iso.path},bootindex={cd_index}", f"vm-ahci-{first}")
    booted, other = (disk, iso) if first == "disk" else (iso, disk)
    assert booted.report(text).passed, text
    assert not other.report(text).booted, text
    port = 0 if first == "disk" else 1
    assert f"1: /pci@i0cf8/sata@4/drive@{port}/disk@0" in log  # SeaBIOS's boot order list


def test_bad_ahci_options_exit_4(tmp_path: Path) -> None:
    disk = bootdisk.make_disk(tmp_path / "boot.img", tag="bad")
    base = ["-s", "0,hostbridge", "-s", "31,lpc"]
    for slot, message in (
            (f"4,ahci,hd:{disk.path},speed=9", "ahci@pci.0.4.0 port 0: unknown option 'speed'"),
            (f"4,ahci,{disk.path}", "missing or invalid type for port 0"),
            (f"4,ahci-cd,{tmp_path / 'none.iso'}", "none.iso: no such file"),
            (f"4,ahci-hd,{disk.path},bootindex=x", "bootindex 'x' is not a number")):
        r = run_hvf([*base, "-s", slot, "vm-ahci-bad"])
        assert r.returncode == 4, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
