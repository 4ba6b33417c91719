# SPDX-License-Identifier: BSD-2-Clause
"""The AHCI controller's command line and configuration tree (bhyve's names), the
refusals of bad settings, and the boot entries ``bootindex`` gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hvf.cli import main
from hvf.errors import ConfigError, ImageError
from hvf.plugins.ahci import config, factory, spec
from test_ahci import BDF, disk_config, hba


def dump(capsys: pytest.CaptureFixture[str], *slot: str) -> list[str]:
    status = main([*(a for s in slot for a in ("-s", s)), "-o", "config.dump=1", "vm0"])
    assert status == 1
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("pci.")]


def test_command_line_builds_bhyve_tree(capsys: pytest.CaptureFixture[str]) -> None:
    assert dump(capsys, "4,ahci,hd:/vm/a.img,nocache,ser=A1,cd:/vm/b.iso,bootindex=1,"
                        "hd:/vm/c.img,sectorsize=512/4096") == [
        "pci.0.4.0.device=ahci",
        "pci.0.4.0.port.0.nocache=true", "pci.0.4.0.port.0.path=/vm/a.img",
        "pci.0.4.0.port.0.ser=A1", "pci.0.4.0.port.0.type=hd",
        "pci.0.4.0.port.1.bootindex=1", "pci.0.4.0.port.1.path=/vm/b.iso",
        "pci.0.4.0.port.1.type=cd",
        "pci.0.4.0.port.2.path=/vm/c.img", "pci.0.4.0.port.2.sectorsize=512/4096",
        "pci.0.4.0.port.2.type=hd"]
    assert dump(capsys, "5,ahci-hd,/vm/a.img,ro", "6:1,ahci-cd,/vm/b.iso") == [
        "pci.0.5.0.device=ahci-hd", "pci.0.5.0.port.0.path=/vm/a.img",
        "pci.0.5.0.port.0.ro=true", "pci.0.5.0.port.0.type=hd",
        "pci.0.6.1.device=ahci-cd", "pci.0.6.1.port.0.path=/vm/b.iso",
        "pci.0.6.1.port.0.type=cd"]


@pytest.mark.parametrize("slot,message", [
    ("4,ahci,/vm/a.img", "missing or invalid type for port 0"),
    ("4,ahci,hd:", "no disk image given"),
    ("4,ahci,hd:/a,ro=", "invalid option 'ro='"),
    ("4,ahci-hd", "no disk image given"),
])
def test_command_line_refusals(slot: str, message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-s", slot, "vm0"]) == 4
    assert message in capsys.readouterr().err


def test_parse_many_ports() -> None:
    values = config.parse_ahci([f"hd:/d{i}" for i in range(32)])
    assert values["port.31.path"] == "/d31"
    with pytest.raises(ConfigError, match="at most 32"):
        config.parse_ahci([f"hd:/d{i}" for i in range(33)])


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 1024))
    return path


@pytest.mark.parametrize("options,message", [
    ({"colour": "red"}, "port 0: unknown option 'colour'"),
    ({"type": "tape"}, "type 'tape' is not hd or cd"),
    ({"ser": "x" * 21}, "ser= takes at most 20"),
    ({"model": "m\x01"}, "model= takes at most 40 printable"),
    ({"rev": "123456789"}, "rev= takes at most 8"),
    ({"nmrr": "2"}, "nmrr=2 is not a rotation rate"),
    ({"nmrr": "fast"}, "invalid integer value 'fast'"),
    ({"bootindex": "-1"}, "bootindex '-1'"),
    ({"ro": "maybe"}, "invalid boolean value 'maybe'"),
    ({"sectorsize": "1000"}, "invalid sector size '1000'"),
])
def test_bad_port_settings_name_the_setting(image: Path, options: dict[str, str],
                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        factory.build("ahci", BDF, disk_config(image, **options))


def test_bad_tree_shapes(image: Path) -> None:
    good = {"type": "hd", "path": str(image)}
    for tree, message in (
            ({"port": {"32": good}}, r"'port.32' is not a port \(0 to 31\)"),
            ({"port": {"x": good}}, "'port.x' is not a port"),
            ({"port": "1"}, "'port' must hold the ports"),
            ({"path": str(image)}, "'path' belongs under a port"),
            ({"port": {"0": {"type": "hd"}}}, "port 0: no image given"),
            ({"port": {"0": {"path": str(image)}}}, "port 0: no type"),
            ({"port": {"0": {**good, "sub": {"x": "1"}}}}, "unexpected configuration"),
            ({"port": {"0": good}, "bogus": "1"}, "unknown option 'bogus'"),
            ({"port": {"0": {"type": "cd", "path": str(image), "sectorsize": "4096"}}},
             "sectorsize does not apply to a CD")):
        with pytest.raises(ConfigError, match=message):
            factory.build("ahci", BDF, tree)


def test_bad_images_are_refused_and_nothing_stays_open(image: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    for path, message in ((tmp_path / "missing.img", "no such file"),
                          (tmp_path, "is a directory"),
                          (odd, "not a multiple of the 512-byte sector size")):
        with pytest.raises(ImageError, match=message):
            factory.build("ahci", BDF, {"port": {"0": {"type": "hd", "path": str(image)},
                                                 "1": {"type": "hd", "path": str(path)}}})
    tiny = tmp_path / "tiny.iso"
    tiny.write_bytes(bytes(512))
    with pytest.raises(ImageError, match="less than one 2048-byte CD block"):
        factory.build("ahci-cd", BDF, {"path": str(tiny)})
    # port 0's image was closed again: a read-write user may take it now
    with hba(disk_config(image)):
        pass


def test_image_in_use_read_write_is_refused(image: Path) -> None:
    with hba(disk_config(image)), pytest.raises(ImageError, match="in use"):
        factory.build("ahci-hd", BDF, {"path": str(image)})
    with hba(disk_config(image, ro="true")), hba(disk_config(image, ro="true")):
        pass  # two read-only users
    with hba({"path": str(image)}, "ahci-cd"), hba({"path": str(image)}, "ahci-cd"):
        pass  # CDs are read-only


def test_direct_settings_and_boot_entries(image: Path, tmp_path: Path) -> None:
    iso = tmp_path / "cd.iso"
    iso.write_bytes(bytes(4 * 2048))
    with hba({"path": str(image), "bootindex": "3"}, "ahci-hd") as h:
        (entry,) = h.device.boot_entries()
        assert entry.index == 3 and entry.path == "/pci@i0cf8/sata@4/drive@0/disk@0"
        assert h.port_read(0, spec.P_SIG) == spec.SIG_ATA
    tree: dict[str, Any] = {"port": {"0": {"type": "hd", "path": str(image)},
                                     "5": {"type": "cd", "path": str(iso), "bootindex": "0"}}}
    with hba(tree) as h:
        assert [(e.index, e.path) for e in h.device.boot_entries()] == [
            (0, "/pci@i0cf8/sata@4/drive@5/disk@0")]
        assert h.read(spec.PI) == 0b100001 and h.read(spec.CAP) & 0x1F == 5
    with hba({"port": {}}) as h:
        assert h.read(spec.PI) == 0 and not h.device.boot_entries()
