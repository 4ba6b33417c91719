# SPDX-License-Identifier: BSD-2-Clause
"""SeaBIOS's ``bootorder`` file from ``bootindex``: the device paths, the file, and what
fw_cfg hands the firmware."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakes import FakeVm, inp, outp
from hvf.bootorder import BootEntry, bootorder_file, parse_bootindex, pci_path
from hvf.errors import ConfigError
from hvf.memory import GuestMemory, MiB
from hvf.plugins.lpc import fwcfg
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.virtio import blk


def seabios_glob_prefix(glob: str, text: str) -> bool:
    """SeaBIOS's bootorder match (src/boot.c glob_prefix): ``glob`` is a prefix of
    ``text`` ending at its end or a ``/``; ``*`` matches up to a ``/`` or the glob's next
    character."""
    g = t = 0
    while True:
        if g == len(glob) and (t == len(text) or text[t] == "/"):
            return True
        if g < len(glob) and glob[g] == "*":
            nxt = glob[g + 1] if g + 1 < len(glob) else ""
            if t == len(text) or text[t] == "/" or text[t] == nxt:
                g += 1
            else:
                t += 1
            continue
        if g == len(glob) or t == len(text) or glob[g] != text[t]:
            return False
        g += 1
        t += 1


def seabios_pci_pattern(slot: int, function: int) -> str:
    """What SeaBIOS searches the bootorder for, for a PCI disk (virtio-blk, NVMe)."""
    return f"/pci@i0cf8/*@{slot:x}" + (f",{function:x}" if function else "")


def test_paths() -> None:
    assert pci_path((0, 4, 0), "scsi", "disk@0,0") == "/pci@i0cf8/scsi@4/disk@0,0"
    assert pci_path((0, 0x1F, 2), "sata", "drive@3", "disk@0") == \
        "/pci@i0cf8/sata@1f,2/drive@3/disk@0"
    assert pci_path((0, 5, 0), "nvme", "namespace@1,0") == "/pci@i0cf8/nvme@5/namespace@1,0"
    assert pci_path((2, 1, 0), "scsi") == "/pci@i0cf8,2/scsi@1"


def test_file_lists_paths_by_index() -> None:
    entries = [BootEntry(7, "/pci@i0cf8/scsi@5/disk@0,0", "b"),
               BootEntry(0, "/pci@i0cf8/sata@4/drive@1/disk@0", "a"),
               BootEntry(3, "/pci@i0cf8/nvme@6/namespace@1,0", "c")]
    assert bootorder_file(entries) == (b"/pci@i0cf8/sata@4/drive@1/disk@0\n"
                                       b"/pci@i0cf8/nvme@6/namespace@1,0\n"
                                       b"/pci@i0cf8/scsi@5/disk@0,0\0")
    assert bootorder_file([]) == b""


def test_one_index_twice_names_both_devices() -> None:
    with pytest.raises(ConfigError, match="bootindex 1 is given to both disk-a and disk-b"):
        bootorder_file([BootEntry(1, "/pci@i0cf8/scsi@4", "disk-a"),
                        BootEntry(1, "/pci@i0cf8/scsi@5", "disk-b")])


@pytest.mark.parametrize("text", ["-1", "x", "1.5", "", " 1", "\u0661", str(1 << 31)])
def test_bad_bootindex(text: str) -> None:
    with pytest.raises(ConfigError, match=f"disk0: bootindex '{text}' is not a number"):
        parse_bootindex(text, "disk0")


def test_bootindex_values() -> None:
    assert parse_bootindex(None, "d") is None
    assert parse_bootindex("0", "d") == 0
    assert parse_bootindex(str((1 << 31) - 1), "d") == (1 << 31) - 1


@pytest.mark.parametrize("path", ["scsi@4", "/pci@i0cf8/scsi@4\n/x", "/a b", "/\u00e9"])
def test_entry_refuses_a_path_that_would_break_the_file(path: str) -> None:
    with pytest.raises(ValueError, match="boot path"):
        BootEntry(0, path, "d")


@given(st.integers(0, 31), st.integers(0, 7), st.integers(0, 31), st.integers(0, 7),
       st.sampled_from(["scsi", "nvme", "pci1af4,1042"]))
def test_seabios_finds_exactly_the_function_it_asks_for(
        slot: int, function: int, other_slot: int, other_function: int, name: str) -> None:
    path = pci_path((0, slot, function), name, "disk@0,0")
    pattern = seabios_pci_pattern(other_slot, other_function)
    assert seabios_glob_prefix(pattern, path) == ((slot, function) == (other_slot, other_function))


@given(st.integers(0, 31), st.integers(0, 31))
def test_seabios_finds_the_ahci_port(port: int, other_port: int) -> None:
    path = pci_path((0, 4, 0), "sata", f"drive@{port:x}", "disk@0")
    assert seabios_glob_prefix(f"/pci@i0cf8/*@4/drive@{other_port:x}/disk@0", path) == \
        (port == other_port)


# ---- virtio-blk's bootindex, through fw_cfg as SeaBIOS reads it ----


def read_file(vm: FakeVm, device: fwcfg.FwCfg, name: str) -> bytes:
    outp(vm, fwcfg.SELECTOR_PORT, 2, device.file_selector(name))
    data = bytearray()
    while len(data) < 4096 and (byte := inp(vm, fwcfg.DATA_PORT, 1)):
        data.append(byte)
    return bytes(data)


def machine(tmp_path: Path, disks: dict[int, dict[str, str]]) -> tuple[FakeVm, fwcfg.FwCfg]:
    vm = FakeVm(None, GuestMemory(16 * MiB))
    bus = PciBus()
    vm.attach(bus)
    for slot, options in disks.items():
        image = tmp_path / f"disk{slot}.img"
        image.write_bytes(bytes(4096))
        bdf = (0, slot, 0)
        bus.add(bdf, blk.create(vm=vm, slot=bdf, config={"path": str(image), **options}))
    device = fwcfg.FwCfg()
    vm.attach(device)
    return vm, device


def test_virtio_blk_bootindex_reaches_the_firmware(tmp_path: Path) -> None:
    vm, device = machine(tmp_path, {4: {"bootindex": "2"}, 5: {"bootindex": "1"}, 6: {}})
    fwcfg.add_bootorder(device, vm)
    assert read_file(vm, device, "bootorder") == \
        b"/pci@i0cf8/scsi@5/disk@0,0\n/pci@i0cf8/scsi@4/disk@0,0"
    assert seabios_glob_prefix(seabios_pci_pattern(5, 0),
                               read_file(vm, device, "bootorder").decode().split("\n")[0])
    for disk in vm.devices:
        disk.close()


def test_no_bootindex_no_file(tmp_path: Path) -> None:
    vm, device = machine(tmp_path, {4: {}})
    fwcfg.add_bootorder(device, vm)
    assert "bootorder" not in device.file_names()
    for disk in vm.devices:
        disk.close()


def test_virtio_blk_refuses_a_bad_bootindex(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"virtio-blk@pci.0.4.0: bootindex 'first' is not"):
        machine(tmp_path, {4: {"bootindex": "first"}})
