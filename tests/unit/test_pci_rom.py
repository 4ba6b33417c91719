# SPDX-License-Identifier: BSD-2-Clause
"""Tests for the expansion ROM BAR (config offset 0x30) and ``romfile=PATH``.

Config space is driven as a guest drives it (mechanism #1 through the bus's handlers) and
the ROM read where the guest reads it (the MMIO registry's handlers); ``romfile=`` goes
through the command line and the PCI plugin's machine build as ``python -m hvf`` does.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import hvf.plugins.pci as pci_plugin
import pytest
from hvf.cli import parse_args
from hvf.errors import ConfigError, DeviceError
from hvf.memory import KiB, MiB
from hvf.pluginmanager import Plugins
from hvf.plugins.pci import BAR_MEM32, PciDevice
from hvf.plugins.pci.bus import ECAM_BASE, PciBus
from hvf.plugins.pci.rom import MAX_ROM_SIZE, load_rom, rom_image
from hvf.registry import Entry
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fakes import FakeVm, cfg_read, cfg_write, mmio_read, mmio_write

BDF = (0, 3, 0)
ROM_REG = 0x30
MEMORY = 0x2


class RomDev(PciDevice):
    """A function with one 4 KiB memory BAR and, when given, an expansion ROM."""

    def __init__(self, name: str, image: bytes | None = None) -> None:
        super().__init__(name)
        self.set_identity(0x1AF4, 0x1044, 0xFF0000)
        self.add_bar(0, BAR_MEM32, 4 * KiB, lambda o, s: 0xB0, lambda o, s, v: None)
        if image is not None:
            self.set_rom(image)


def image_of(size: int) -> bytes:
    """An option ROM image of ``size`` bytes whose every byte says where it is."""
    body = bytes((i * 7 + i // 256) & 0xFF for i in range(size))
    return b"\x55\xaa" + body[2:]


def machine(dev: PciDevice) -> tuple[FakeVm, PciBus]:
    vm = FakeVm()
    bus = PciBus()
    vm.attach(bus)
    bus.add(BDF, dev)
    bus.assign_resources(enable_decoding=False)  # as with a boot ROM: firmware programs it
    return vm, bus


@pytest.fixture
def rom() -> tuple[FakeVm, RomDev, bytes]:
    data = image_of(5000)
    dev = RomDev("romdev", data)
    vm, _bus = machine(dev)
    return vm, dev, rom_image(data)


def test_image_is_padded_to_a_power_of_two_of_at_least_2_kib() -> None:
    assert len(rom_image(b"\x55\xaa")) == 2 * KiB
    assert len(rom_image(bytes(2 * KiB))) == 2 * KiB
    assert len(rom_image(bytes(2 * KiB + 1))) == 4 * KiB
    assert len(rom_image(bytes(75776))) == 128 * KiB
    assert rom_image(b"\x55\xaa\x01") == b"\x55\xaa\x01" + bytes(2 * KiB - 3)


def test_sizing_reads_back_the_size_mask_and_the_enable_bit(rom: Any) -> None:
    vm, dev, image = rom
    assert len(image) == 8 * KiB and dev.rom.size == 8 * KiB
    assert cfg_read(vm, BDF, ROM_REG, 4) == 0  # no address from hvf, as bhyve
    cfg_write(vm, BDF, ROM_REG, 4, 0xFFFF_FFFF)
    assert cfg_read(vm, BDF, ROM_REG, 4) == 0xFFFF_E001
    cfg_write(vm, BDF, ROM_REG, 4, 0xFFFF_F800)  # SeaBIOS's and Linux's probe
    assert cfg_read(vm, BDF, ROM_REG, 4) == 0xFFFF_E000
    cfg_write(vm, BDF, ROM_REG, 4, 0xFFFF_FFFE)
    assert cfg_read(vm, BDF, ROM_REG, 4) == 0xFFFF_E000
    cfg_write(vm, BDF, ROM_REG, 4, 0xC123_47FF)  # reserved bits 1-10 read as zero
    assert cfg_read(vm, BDF, ROM_REG, 4) == 0xC123_4001
    assert cfg_read(vm, BDF, ROM_REG + 2, 2) == 0xC123
    assert not dev.rom.range.mapped  # memory decoding is off


def test_a_function_without_a_rom_has_a_zero_register() -> None:
    dev = RomDev("plain")
    vm, _bus = machine(dev)
    cfg_write(vm, BDF, ROM_REG, 4, 0xFFFF_FFFF)
    assert cfg_read(vm, BDF, ROM_REG, 4) == 0
    assert dev.rom is None


def test_narrow_writes_leave_the_register_alone(rom: Any) -> None:
    vm, _dev, _image = rom
    cfg_write(vm, BDF, ROM_REG, 4, 0xC000_0001)
    for offset, size in ((0x30, 1), (0x30, 2), (0x32, 2), (0x31, 1), (0x33, 1)):
        cfg_write(vm, BDF, offset, size, 0xFFFF)
    assert cfg_read(vm, BDF, ROM_REG, 4) == 0xC000_0001


def test_decodes_only_with_the_enable_bit_and_memory_space(rom: Any) -> None:
    vm, dev, image = rom
    base = 0xC010_0000
    for enable, memory in ((0, 0), (1, 0), (0, 1), (1, 1), (0, 1), (1, 1), (1, 0)):
        cfg_write(vm, BDF, 0x04, 2, MEMORY if memory else 0)
        cfg_write(vm, BDF, ROM_REG, 4, base | enable)
        decodes = bool(enable and memory)
        assert dev.rom.range.mapped is decodes
        assert (vm.mmio.lookup(base) is dev.rom.range) is decodes
        if decodes:
            assert vm.mmio.lookup(base).owner == "romdev ROM"  # type: ignore[union-attr]
            assert mmio_read(vm, base, 2) == 0xAA55
            assert mmio_read(vm, base + 0x1234, 4) == int.from_bytes(image[0x1234:0x1238], "little")
            assert mmio_read(vm, base + len(image) - 1, 1) == image[-1]


def test_the_rom_is_read_only(rom: Any) -> None:
    vm, dev, image = rom
    cfg_write(vm, BDF, 0x04, 2, MEMORY)
    cfg_write(vm, BDF, ROM_REG, 4, 0xC010_0001)
    mmio_write(vm, 0xC010_0000, 4, 0xDEAD_BEEF)
    assert mmio_read(vm, 0xC010_0000, 4) == int.from_bytes(image[:4], "little")


def test_a_moved_rom_decodes_only_at_its_new_address(rom: Any) -> None:
    vm, dev, image = rom
    cfg_write(vm, BDF, 0x04, 2, MEMORY)
    cfg_write(vm, BDF, ROM_REG, 4, 0xC010_0001)
    cfg_write(vm, BDF, ROM_REG, 4, 0xD000_0001)
    assert vm.mmio.lookup(0xC010_0000) is None
    assert vm.mmio.lookup(0xD000_0000) is dev.rom.range
    assert mmio_read(vm, 0xD000_0000 + 0x100, 1) == image[0x100]
    assert dev.rom.address == 0xD000_0000


def test_a_clash_leaves_the_rom_undecoded_until_the_other_range_moves(rom: Any) -> None:
    vm, dev, _image = rom
    bar = dev.bars[0]
    address = bar.address
    cfg_write(vm, BDF, 0x04, 2, MEMORY)
    cfg_write(vm, BDF, ROM_REG, 4, address | 1)  # on top of the device's own BAR
    assert vm.mmio.lookup(address) is bar.range and not dev.rom.range.mapped
    assert len(vm.logged) == 1 and "the ROM not decoded" in vm.logged[0]
    cfg_write(vm, BDF, 0x10, 4, 0xD000_0000)  # the BAR moves away: the ROM decodes
    assert vm.mmio.lookup(address) is dev.rom.range
    cfg_write(vm, BDF, ROM_REG, 4, ECAM_BASE | 1)
    assert not dev.rom.range.mapped


def test_decoding_tells_the_device(rom: Any) -> None:
    vm, dev, _image = rom
    seen: list[tuple[str, bool]] = []
    dev.bar_decoding_changed = lambda bar: seen.append(  # type: ignore[method-assign]
        (bar.kind, bar.range.mapped))
    cfg_write(vm, BDF, ROM_REG, 4, 0xC010_0001)
    cfg_write(vm, BDF, 0x04, 2, MEMORY)
    cfg_write(vm, BDF, ROM_REG, 4, 0xC010_0000)
    assert ("rom", True) in seen and seen[-1] == ("rom", False)


def test_set_rom_is_refused_twice_and_in_a_bridge_header() -> None:
    dev = RomDev("twice", b"\x55\xaa")
    with pytest.raises(DeviceError, match="already set"):
        dev.set_rom(b"\x55\xaa")
    bridge = PciDevice("bridge")
    bridge.set_identity(0x8086, 0x1234, 0x060400, header_type=1)
    with pytest.raises(DeviceError, match="header type"):
        bridge.set_rom(b"\x55\xaa")


# ---- state ----


def test_state_restores_the_register_and_its_decoding(rom: Any) -> None:
    vm, dev, image = rom
    cfg_write(vm, BDF, 0x04, 2, MEMORY)
    cfg_write(vm, BDF, ROM_REG, 4, 0xC010_0001)
    saved = dev.save_state()
    twin = RomDev("romdev", image_of(5000))
    vm2, _bus = machine(twin)
    twin.restore_state(saved, twin.state_version)
    assert cfg_read(vm2, BDF, ROM_REG, 4) == 0xC010_0001
    assert vm2.mmio.lookup(0xC010_0000) is twin.rom.range
    assert mmio_read(vm2, 0xC010_0002, 1) == image[2]
    # restoring a disabled ROM over a decoding one unmaps it
    cfg_write(vm, BDF, ROM_REG, 4, 0xC020_0000)
    twin.restore_state(dev.save_state(), twin.state_version)
    assert not twin.rom.range.mapped and twin.rom.address == 0xC020_0000


def test_state_saved_before_roms_existed_restores() -> None:
    """Register 0x30 was always in the saved config space, and always zero."""
    dev = RomDev("old")
    saved = dev.save_state()
    assert saved["config"][ROM_REG : ROM_REG + 4] == bytes(4)
    twin = RomDev("old", image_of(512))
    vm, _bus = machine(twin)
    twin.restore_state(saved, twin.state_version)
    assert cfg_read(vm, BDF, ROM_REG, 4) == 0 and not twin.rom.range.mapped


@pytest.mark.parametrize("register, rom_size", [
    (0xC010_0003, 512),     # a reserved bit
    (0xC010_0401, 512),     # reserved bit 10
    (0xC010_1000, 8 * KiB),  # not aligned to the 8 KiB ROM
    (0xC010_0000, None),    # a function without a ROM
])
def test_state_with_an_impossible_register_is_refused(register: int, rom_size: int | None) -> None:
    source = RomDev("src")
    fields = source.save_state()
    config = bytearray(fields["config"])
    config[ROM_REG : ROM_REG + 4] = register.to_bytes(4, "little")
    fields["config"] = bytes(config)
    target = RomDev("src", None if rom_size is None else image_of(rom_size))
    machine(target)
    with pytest.raises(DeviceError, match="expansion ROM register"):
        target.restore_state(fields, target.state_version)


# ---- romfile= ----


def test_load_rom_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dev: option ROM '.*missing.rom': cannot open it: "
                                          "No such file"):
        load_rom(str(tmp_path / "missing.rom"), "dev")
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_rom(str(tmp_path), "dev")
    (tmp_path / "empty.rom").write_bytes(b"")
    with pytest.raises(ConfigError, match="'.*empty.rom' is empty"):
        load_rom(str(tmp_path / "empty.rom"), "dev")
    huge = tmp_path / "huge.rom"
    with huge.open("wb") as f:
        f.truncate(MAX_ROM_SIZE + 1)  # sparse: refused unread
    with pytest.raises(ConfigError, match="is 16777217 bytes; an option ROM is at most 16 MiB"):
        load_rom(str(huge), "dev")


def test_load_rom_pads_and_warns_without_a_signature(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "good.rom"
    good.write_bytes(b"\x55\xaa\x08" + bytes(3000))
    with caplog.at_level(logging.WARNING):
        assert load_rom(str(good), "dev") == rom_image(good.read_bytes())
    assert not caplog.records
    odd = tmp_path / "odd.rom"
    odd.write_bytes(b"MZ" + bytes(10))
    with caplog.at_level(logging.WARNING):
        assert len(load_rom(str(odd), "dev")) == 2 * KiB  # loaded anyway, as QEMU does
    assert "does not start with the 0x55AA signature" in caplog.text
    biggest = tmp_path / "biggest.rom"
    with biggest.open("wb") as f:
        f.write(b"\x55\xaa")
        f.truncate(MAX_ROM_SIZE)
    assert len(load_rom(str(biggest), "dev")) == 16 * MiB


def test_romfile_on_the_command_line_reaches_no_device_parse() -> None:
    config = parse_args(["-s", "4,virtio-rnd,romfile=/x/a.rom", "-s", "5,virtio-blk,d.img,"
                         "romfile=/x/b.rom,ro", "vm"], Plugins())
    assert config.get("pci.0.4.0.romfile") == "/x/a.rom"
    assert config.get("pci.0.5.0.romfile") == "/x/b.rom"
    assert config.get("pci.0.5.0.path") == "d.img" and config.get_bool("pci.0.5.0.ro")


def build_with(tmp_path: Path, romfile: str) -> tuple[FakeVm, list[dict[str, Any]]]:
    """The PCI plugin's machine build with one device (``-s 3,romdev,romfile=...``)."""
    seen: list[dict[str, Any]] = []

    def factory(*, vm: Any, slot: tuple[int, int, int], config: dict[str, Any]) -> RomDev:
        seen.append(dict(config))
        return RomDev("romdev@pci.0.3.0")

    vm = FakeVm({"pci.0.3.0.device": "romdev", "pci.0.3.0.romfile": romfile,
                 "pci.0.3.0.other": "1"})
    vm.plugins = types.SimpleNamespace(**{**vars(vm.plugins),
                                          "pci_devices": {"romdev": Entry("romdev", factory)}})
    pci_plugin.hvf_machine_build(vm)  # type: ignore[arg-type]
    return vm, seen


def test_romfile_is_taken_out_before_the_factory_and_given_to_the_device(tmp_path: Path) -> None:
    path = tmp_path / "dev.rom"
    path.write_bytes(image_of(3000))
    vm, seen = build_with(tmp_path, str(path))
    assert seen == [{"device": "romdev", "other": "1"}]
    dev = pci_plugin.pci_bus(vm).functions[BDF]  # type: ignore[arg-type]
    assert dev.rom is not None and dev.rom.size == 4 * KiB
    pci_plugin.pci_bus(vm).assign_resources(enable_decoding=True)  # type: ignore[arg-type]
    cfg_write(vm, BDF, ROM_REG, 4, 0xC800_0001)
    assert mmio_read(vm, 0xC800_0000, 2) == 0xAA55


def test_a_bad_romfile_names_the_device_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pci slot 0:3:0 \(romdev\): option ROM "
                                          r"'/nonexistent/x.rom': cannot open it"):
        build_with(tmp_path, "/nonexistent/x.rom")


# ---- random guest writes to the register ----


class RomRegisterMachine(RuleBasedStateMachine):
    """Random writes of register 0x30 (every width and offset) and of the command
    register, against a model: the register holds the address bits the ROM can hold and
    the enable bit; the ROM decodes there exactly while enabled with memory space on,
    unless it clashes with a range decoding already; a saved state restores as it was."""

    values = st.one_of(
        st.integers(0, 0xFFFF_FFFF),
        st.sampled_from([0xFFFF_FFFF, 0xFFFF_F800, 0xFFFF_FFFE, ECAM_BASE | 1, 0xC000_0001,
                         0xC000_0801, 0xDFFF_F001, 0x0000_0001, 0xFFF0_0001]))

    @initialize(size=st.sampled_from([1, 2048, 2049, 8192, 75776]))
    def build(self, size: int) -> None:
        self.image = rom_image(image_of(size))
        self.dev = RomDev("fuzz", self.image)
        self.vm, _bus = machine(self.dev)
        self.register = 0
        self.memory = False

    @rule(offset=st.integers(0x2E, 0x35), size=st.sampled_from([1, 2, 4]), value=values)
    def write_rom(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        cfg_write(self.vm, BDF, offset, size, value)
        if offset == ROM_REG and size == 4:
            self.register = value & ~(len(self.image) - 1) & 0xFFFF_F800 | value & 1

    @rule(value=st.integers(0, 0xFFFF))
    def write_command(self, value: int) -> None:
        cfg_write(self.vm, BDF, 0x04, 2, value)
        self.memory = bool(value & MEMORY)

    @rule()
    def restore_into_a_twin(self) -> None:
        twin = RomDev("fuzz", self.image)
        vm, _bus = machine(twin)
        twin.restore_state(self.dev.save_state(), twin.state_version)
        assert cfg_read(vm, BDF, ROM_REG, 4) == self.register
        assert twin.rom.address == self.register & ~1
        # the same layout (BAR 0 never moves): the same clashes
        assert twin.rom.range.mapped is self.dev.rom.range.mapped
        if twin.rom.range.mapped:
            assert vm.mmio.lookup(twin.rom.address) is twin.rom.range

    @invariant()
    def register_and_decoding_follow_the_model(self) -> None:
        assert cfg_read(self.vm, BDF, ROM_REG, 4) == self.register
        assert cfg_read(self.vm, BDF, ROM_REG + 2, 2) == self.register >> 16
        rom = self.dev.rom
        address = self.register & ~1
        assert rom.address == address
        if not (self.register & 1 and self.memory):
            assert not rom.range.mapped
        elif rom.range.mapped:
            assert rom.range.base == address
            offset = (address * 31) % len(self.image) & ~3
            assert mmio_read(self.vm, address + offset, 4) == int.from_bytes(
                self.image[offset : offset + 4], "little")
        else:
            assert self.vm.mmio.overlapping(address, len(self.image)) is not None


RomRegisterMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=25,
                                                deadline=None)
test_rom_register_machine = RomRegisterMachine.TestCase
