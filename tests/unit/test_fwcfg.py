# SPDX-License-Identifier: BSD-2-Clause
"""Tests for the QEMU fw_cfg device, driven through its port handlers as a guest would."""

from __future__ import annotations

import re
import struct
import uuid
from typing import Any

import pytest
from hvf.errors import ConfigError, DeviceError, SnapshotError
from hvf.memory import GiB, GuestMemory, MiB
from hvf.plugins.lpc import fwcfg
from hvf.plugins.lpc.fwcfg import (
    DMA_CTL_ERROR,
    DMA_CTL_READ,
    DMA_CTL_SELECT,
    DMA_CTL_SKIP,
    DMA_CTL_WRITE,
    KEY_BOOT_MENU,
    KEY_FILE_DIR,
    KEY_ID,
    KEY_MAX_CPUS,
    KEY_NB_CPUS,
    KEY_NOGRAPHIC,
    KEY_RAM_SIZE,
    KEY_SIGNATURE,
    KEY_UUID,
    FwCfg,
)
from hvf.snapshot import restore_device
from hvf.snapshot_api import Chunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeVm, inp, outp

SEL = 0x510
DATA = 0x511
DMA_HI = 0x514
DMA_LO = 0x518


def machine(ncpus: int = 2, memory: GuestMemory | None = None,
            config: dict[str, str] | None = None) -> FakeVm:
    """A fake machine with its own 16 MiB of RAM unless given some."""
    return FakeVm(config, memory if memory is not None else GuestMemory(16 * MiB), ncpus=ncpus)


# ---- the guest's side: port accesses through the registered handlers (fakes.inp, outp) ----


def select(vm: FakeVm, key: int) -> None:
    outp(vm, SEL, 2, key)


def read_data(vm: FakeVm, n: int) -> bytes:
    return bytes(inp(vm, DATA, 1) for _ in range(n))


def read_item(vm: FakeVm, key: int, n: int) -> bytes:
    select(vm, key)
    return read_data(vm, n)


def bswap32(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "little"), "big")


def kick_dma(vm: FakeVm, desc: int) -> None:
    """Start a transfer the way Linux does: high half, then low half, big-endian."""
    outp(vm, DMA_HI, 4, bswap32(desc >> 32))
    outp(vm, DMA_LO, 4, bswap32(desc & 0xFFFF_FFFF))


def dma(vm: FakeVm, control: int, length: int, address: int, desc: int = 0x1000) -> int:
    """Write a descriptor at ``desc``, run it, return the control word stored back."""
    vm.memory.write(desc, struct.pack(">IIQ", control, length, address))
    kick_dma(vm, desc)
    return int(struct.unpack(">I", vm.memory.read(desc, 4))[0])


def directory(vm: FakeVm) -> dict[str, tuple[int, int]]:
    """name -> (selector, size), read from key 0x19 through the data port."""
    select(vm, KEY_FILE_DIR)
    count = int.from_bytes(read_data(vm, 4), "big")
    entries: dict[str, tuple[int, int]] = {}
    names = []
    for _ in range(count):
        size, sel, reserved, raw = struct.unpack(">IHH56s", read_data(vm, 64))
        assert reserved == 0
        name = raw.split(b"\0", 1)[0].decode()
        names.append(name)
        entries[name] = (sel, size)
    assert names == sorted(names)
    return entries


@pytest.fixture
def vm() -> FakeVm:
    return machine()


@pytest.fixture
def dev(vm: FakeVm) -> FwCfg:
    d = FwCfg()
    d.add_file("etc/b", b"bravo")
    d.add_file("bootorder", b"/pci@i0cf8/\0")
    vm.attach(d)
    d.add_file("etc/a", b"alpha!")
    return d


# ---- registration ----


def test_ports_registered(vm: FakeVm, dev: FwCfg) -> None:
    comb = vm.pio.lookup(SEL)
    assert comb is not None and comb.owner == "fwcfg"
    assert vm.pio.lookup(DATA) is comb
    dmar = vm.pio.lookup(DMA_HI)
    assert dmar is not None and dmar.owner == "fwcfg"
    assert (dmar.base, dmar.length) == (0x514, 8)
    assert vm.pio.lookup(0x512) is None and vm.pio.lookup(0x51C) is None


def test_attach_twice_refused(vm: FakeVm, dev: FwCfg) -> None:
    with pytest.raises(DeviceError, match="already attached"):
        machine().attach(dev)  # a device attaches once, to one machine


# ---- standard items ----


def test_signature_and_id(vm: FakeVm, dev: FwCfg) -> None:
    # A device starts with key 0 selected, as after reset.
    assert read_data(vm, 4) == b"QEMU"
    assert read_item(vm, KEY_SIGNATURE, 4) == b"QEMU"
    assert int.from_bytes(read_item(vm, KEY_ID, 4), "little") == 0x3


def test_cpus_ram_and_flags() -> None:
    vm = machine(ncpus=3)
    vm.attach(FwCfg())
    assert int.from_bytes(read_item(vm, KEY_NB_CPUS, 2), "little") == 3
    assert int.from_bytes(read_item(vm, KEY_MAX_CPUS, 2), "little") == 3
    assert int.from_bytes(read_item(vm, KEY_RAM_SIZE, 8), "little") == 16 * MiB
    assert int.from_bytes(read_item(vm, KEY_NOGRAPHIC, 2), "little") == 1
    assert int.from_bytes(read_item(vm, KEY_BOOT_MENU, 2), "little") == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12345678-9abc-def0-1234-56789abcdef0", bytes.fromhex("123456789abcdef0123456789abcdef0")),
        ("not-a-uuid", bytes(16)),
        (None, bytes(16)),
    ],
)
def test_uuid(text: str | None, expected: bytes) -> None:
    vm = machine(config={"uuid": text} if text else {})
    vm.attach(FwCfg())
    assert read_item(vm, KEY_UUID, 16) == expected
    if text and expected != bytes(16):
        assert uuid.UUID(bytes=expected) == uuid.UUID(text)


def test_item_set_before_attach_wins(vm: FakeVm) -> None:
    d = FwCfg()
    d.add_item(KEY_BOOT_MENU, (1).to_bytes(2, "little"))
    vm.attach(d)
    assert read_item(vm, KEY_BOOT_MENU, 2) == b"\x01\x00"
    with pytest.raises(DeviceError, match="already holds"):
        d.add_item(KEY_BOOT_MENU, b"\0\0")
    d.add_item(KEY_BOOT_MENU, b"\0\0", replace=True)
    assert read_item(vm, KEY_BOOT_MENU, 2) == b"\0\0"


def test_arch_local_item(vm: FakeVm, dev: FwCfg) -> None:
    dev.add_item(0x8003, b"e820")
    assert read_item(vm, 0x8003, 4) == b"e820"
    # The old write-channel bit does not change which item is read.
    assert read_item(vm, 0x4000 | KEY_SIGNATURE, 4) == b"QEMU"


def test_unknown_key_reads_zero(vm: FakeVm, dev: FwCfg) -> None:
    assert read_item(vm, 0x0042, 4) == bytes(4)
    assert read_item(vm, 0x1234, 4) == bytes(4)


# ---- data port ----


def test_read_past_end_returns_zero(vm: FakeVm, dev: FwCfg) -> None:
    assert read_item(vm, KEY_SIGNATURE, 8) == b"QEMU\0\0\0\0"
    assert dev.save_state()["offset"] == 4  # the position stops at the end


def test_select_rewinds(vm: FakeVm, dev: FwCfg) -> None:
    select(vm, KEY_SIGNATURE)
    assert read_data(vm, 2) == b"QE"
    select(vm, KEY_SIGNATURE)
    assert read_data(vm, 4) == b"QEMU"


def test_data_writes_and_odd_sizes_ignored(vm: FakeVm, dev: FwCfg) -> None:
    select(vm, KEY_SIGNATURE)
    assert read_data(vm, 1) == b"Q"
    outp(vm, DATA, 1, 0x41)  # the removed legacy write path
    outp(vm, SEL, 4, KEY_ID)  # only 16-bit writes select
    assert inp(vm, DATA, 2) == 0  # only byte reads stream data
    assert read_data(vm, 3) == b"EMU"


def test_directory_and_file_by_selector(vm: FakeVm, dev: FwCfg) -> None:
    entries = directory(vm)
    assert list(entries) == ["bootorder", "etc/a", "etc/b"]
    assert [sel for sel, _ in entries.values()] == [0x20, 0x21, 0x22]
    assert entries["etc/a"][1] == 6 and entries["etc/b"][1] == 5
    assert dev.file_names() == ["bootorder", "etc/a", "etc/b"]
    assert dev.file_selector("etc/b") == 0x22
    for name, data in (("etc/a", b"alpha!"), ("etc/b", b"bravo"), ("bootorder", b"/pci@i0cf8/\0")):
        sel, size = entries[name]
        assert read_item(vm, sel, size + 2) == data + b"\0\0"
    assert read_item(vm, 0x23, 4) == bytes(4)  # no fourth file


def test_lazy_file(vm: FakeVm, dev: FwCfg) -> None:
    calls: list[int] = []
    layout = [b"first"]

    def build() -> bytes:
        calls.append(1)
        return layout[0]

    dev.add_file("etc/e820", build)
    assert not calls  # nothing is built until the guest asks
    layout[0] = b"final layout"
    entries = directory(vm)
    assert entries["etc/e820"][1] == len(b"final layout")
    sel = entries["etc/e820"][0]
    assert read_item(vm, sel, 12) == b"final layout"


def test_failing_callable_names_the_file(vm: FakeVm, dev: FwCfg) -> None:
    def broken() -> bytes:
        raise RuntimeError("no layout yet")

    dev.add_file("etc/broken", broken)
    with pytest.raises(DeviceError, match=r"etc/broken.*no layout yet"):
        select(vm, dev.file_selector("etc/broken"))


# ---- DMA ----


def test_dma_port_signature(vm: FakeVm, dev: FwCfg) -> None:
    assert inp(vm, DMA_HI, 4).to_bytes(4, "little") == b"QEMU"
    assert inp(vm, DMA_LO, 4).to_bytes(4, "little") == b" CFG"
    # Big-endian 0x51454d5520434647, as two byte-swapped 32-bit halves.
    assert (bswap32(inp(vm, DMA_HI, 4)) << 32 | bswap32(inp(vm, DMA_LO, 4))) == 0x51454D5520434647
    assert bytes(inp(vm, p, 1) for p in range(0x514, 0x51C)) == b"QEMU CFG"
    assert inp(vm, 0x516, 2).to_bytes(2, "little") == b"MU"


def test_dma_select_read(vm: FakeVm, dev: FwCfg) -> None:
    sel = dev.file_selector("etc/a")
    assert dma(vm, (sel << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 6, 0x2000) == 0
    assert vm.memory.read(0x2000, 6) == b"alpha!"


def test_dma_read_continues_from_data_port(vm: FakeVm, dev: FwCfg) -> None:
    select(vm, dev.file_selector("etc/a"))
    assert read_data(vm, 2) == b"al"
    assert dma(vm, DMA_CTL_READ, 2, 0x2000) == 0
    assert dma(vm, DMA_CTL_READ, 2, 0x2002) == 0
    assert vm.memory.read(0x2000, 4) == b"pha!"


def test_dma_skip(vm: FakeVm, dev: FwCfg) -> None:
    sel = dev.file_selector("etc/b")
    assert dma(vm, (sel << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP, 3, 0) == 0
    assert read_data(vm, 2) == b"vo"
    # Skipping past the end is not an error.
    assert dma(vm, DMA_CTL_SKIP, 100, 0) == 0


def test_dma_read_past_end_zero_fills(vm: FakeVm, dev: FwCfg) -> None:
    vm.memory.write(0x3000, b"\xaa" * 32)
    sel = dev.file_selector("etc/b")
    assert dma(vm, (sel << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 16, 0x3000) == 0
    assert vm.memory.read(0x3000, 17) == b"bravo" + bytes(11) + b"\xaa"


def test_dma_bad_buffer_sets_error(vm: FakeVm, dev: FwCfg) -> None:
    sel = dev.file_selector("etc/a")
    ctl = (sel << 16) | DMA_CTL_SELECT | DMA_CTL_READ
    assert dma(vm, ctl, 6, 16 * MiB) == DMA_CTL_ERROR  # just past the end of RAM
    assert dma(vm, ctl, 6, 16 * MiB - 3) == DMA_CTL_ERROR  # straddling it
    assert dma(vm, ctl, 6, (1 << 64) - 2) == DMA_CTL_ERROR  # wrapping
    # The zero-filled tail must fit too.
    assert dma(vm, ctl, 0xFFFF_FFFF, 0x2000) == DMA_CTL_ERROR


def test_dma_bad_descriptor_is_harmless(vm: FakeVm, dev: FwCfg) -> None:
    kick_dma(vm, 16 * MiB - 8)  # the descriptor straddles the end of RAM
    # Its control word is in RAM, so the failure is reported there.
    assert vm.memory.read(16 * MiB - 8, 8) == b"\0\0\0\x01" + bytes(4)
    kick_dma(vm, 1 << 40)  # not RAM at all: nowhere to report, nothing happens
    assert dev.save_state()["dma_high"] == 0


def test_dma_write_refused(vm: FakeVm, dev: FwCfg) -> None:
    sel = dev.file_selector("etc/a")
    assert dma(vm, (sel << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 2, 0x2000) == DMA_CTL_ERROR
    assert dma(vm, DMA_CTL_WRITE, 0, 0x2000) == 0  # nothing to write: no error
    select(vm, sel)
    assert read_data(vm, 6) == b"alpha!"


def test_dma_select_only(vm: FakeVm, dev: FwCfg) -> None:
    assert dma(vm, (KEY_ID << 16) | DMA_CTL_SELECT, 4, 0x2000) == 0
    assert int.from_bytes(read_data(vm, 4), "little") == 3


def test_dma_64bit_address() -> None:
    try:
        memory = GuestMemory(5 * GiB)  # sparse memfd: 3 GiB low, 2 GiB from 4 GiB
    except (OSError, ValueError) as e:  # pragma: no cover - depends on the host's limits
        pytest.skip(f"cannot map 5 GiB of sparse memory: {e}")
    vm = machine(memory=memory)
    d = FwCfg()
    vm.attach(d)
    desc = 4 * GiB + 0x1000
    ctl = (KEY_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_READ
    assert dma(vm, ctl, 4, 4 * GiB + 0x2000, desc=desc) == 0
    assert vm.memory.read(4 * GiB + 0x2000, 4) == b"QEMU"
    # The high half resets after a transfer: a lone low write addresses low memory.
    vm.memory.write(0x1000, struct.pack(">IIQ", ctl, 4, 0x3000))
    outp(vm, DMA_LO, 4, bswap32(0x1000))
    assert vm.memory.read(0x3000, 4) == b"QEMU"
    assert vm.memory.read(0x1000, 4) == bytes(4)


# ---- state ----


def test_save_restore(vm: FakeVm, dev: FwCfg) -> None:
    sel = dev.file_selector("etc/a")
    select(vm, sel)
    assert read_data(vm, 3) == b"alp"
    outp(vm, DMA_HI, 4, bswap32(0))
    state = dev.save_state()
    assert state == {"selector": sel, "offset": 3, "dma_high": 0}

    vm2 = machine()
    d2 = FwCfg()
    for name in ("etc/b", "bootorder", "etc/a"):
        d2.add_file(name, {"etc/a": b"alpha!", "etc/b": b"bravo", "bootorder": b"x"}[name])
    vm2.attach(d2)
    d2.restore_state(state, FwCfg.state_version)
    assert read_data(vm2, 3) == b"ha!"
    assert d2.save_state() == {"selector": sel, "offset": 6, "dma_high": 0}


def test_restore_keeps_dma_high_half(vm: FakeVm, dev: FwCfg) -> None:
    dev.restore_state({"selector": 0, "offset": 0, "dma_high": 7}, 1)
    assert dev.save_state()["dma_high"] == 7
    vm.memory.write(0x1000, struct.pack(">IIQ", DMA_CTL_READ, 4, 0x2000))
    outp(vm, DMA_LO, 4, bswap32(0x1000))  # goes to 7 << 32 | 0x1000: not RAM
    assert vm.memory.read(0x2000, 4) == bytes(4)
    assert dev.save_state()["dma_high"] == 0


@pytest.mark.parametrize(
    ("fields", "version", "message"),
    [
        ({"selector": 0, "offset": 0, "dma_high": 0}, 2, "newer hvf (state version 2; this "
                                                          "hvf reads up to 1)"),
        ({"selector": 0x10000, "offset": 0, "dma_high": 0}, 1, "'selector' is not an unsigned"),
        ({"selector": 0, "offset": -1, "dma_high": 0}, 1, "'offset' is not an unsigned"),
        ({"selector": 0, "offset": 0}, 1, "'dma_high' is missing"),
        ({"selector": "0", "offset": 0, "dma_high": 0}, 1, "'selector' is not an unsigned"),
        ({"selector": 0, "offset": 0, "dma_high": 0, "key": 0}, 1, "'key' is unknown"),
    ],
)
def test_restore_rejects_bad_state(dev: FwCfg, fields: dict[str, Any], version: int,
                                   message: str) -> None:
    before = dev.save_state()
    with pytest.raises(SnapshotError, match=r"device\.fwcfg.*" + re.escape(message)):
        restore_device(dev, Chunk("device.fwcfg", "hvf.plugins.lpc.fwcfg", version, fields))
    assert dev.save_state() == before


# ---- API checks ----


def test_add_file_rejects_duplicates_and_long_names(dev: FwCfg) -> None:
    with pytest.raises(DeviceError, match="'etc/a' already exists"):
        dev.add_file("etc/a", b"again")
    dev.add_file("x" * 55, b"")
    with pytest.raises(DeviceError, match="56 bytes long; at most 55"):
        dev.add_file("y" * 56, b"")
    with pytest.raises(DeviceError, match="non-empty"):
        dev.add_file("", b"")
    with pytest.raises(DeviceError, match="NUL"):
        dev.add_file("a\0b", b"")
    with pytest.raises(DeviceError, match="bytes or a callable"):
        dev.add_file("etc/str", "text")  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [KEY_FILE_DIR, 0x20, 0x3FFF, 0x4000, 0x10000, -1])
def test_add_item_rejects_reserved_keys(dev: FwCfg, key: int) -> None:
    with pytest.raises(DeviceError):
        dev.add_item(key, b"")


def test_parse() -> None:
    assert fwcfg.parse([]) == {"fwcfg": "qemu"}
    assert fwcfg.parse(["qemu"]) == {"fwcfg": "qemu"}
    with pytest.raises(ConfigError, match="'bhyve' flavour is not supported"):
        fwcfg.parse(["bhyve"])
    with pytest.raises(ConfigError, match="unknown flavour 'ovmf'"):
        fwcfg.parse(["ovmf"])
    with pytest.raises(ConfigError, match="unexpected"):
        fwcfg.parse(["qemu", "extra"])


def test_create() -> None:
    vm = machine(config={"lpc.fwcfg": "qemu"})
    d = fwcfg.create(vm, vm.config)
    assert isinstance(d, FwCfg) and d.name == "fwcfg"
    vm = machine()
    assert fwcfg.create(vm, vm.config) is None
    vm = machine(config={"lpc.fwcfg": "bhyve"})
    with pytest.raises(ConfigError, match="bhyve"):
        fwcfg.create(vm, vm.config)


def test_find() -> None:
    vm = machine()
    assert fwcfg.find(vm) is None
    d = FwCfg()
    vm.devices.append(d)
    assert fwcfg.find(vm) is d


# ---- hostile guests ----

SMALL_RAM = GuestMemory(64 * 1024)

#: The ports the device decodes (0x512-0x513 are not its own).
PORTS = [0x510, 0x511, *range(0x514, 0x51C)]

port_access = st.tuples(
    st.just("io"),
    st.sampled_from(PORTS),
    st.sampled_from([1, 2, 4]),
    st.booleans(),
    st.integers(0, 0xFFFF_FFFF),
)
dma_access = st.tuples(
    st.just("dma"),
    st.one_of(
        st.sampled_from([0x20000A, 0x21000A, 0x21000C, 0x21001A, 0x02, 0x12, 0x0B]),
        st.integers(0, 0xFFFF_FFFF),
    ),
    st.one_of(st.integers(0, 300), st.integers(0, 0xFFFF_FFFF)),
    st.one_of(st.integers(0, 80 * 1024), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 70 * 1024), st.integers(0, 0xFFFF_FFFF)),
    st.one_of(st.just(0), st.integers(0, 0xFFFF_FFFF)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(port_access, dma_access), max_size=40))
def test_random_accesses_never_raise(ops: list[tuple[Any, ...]]) -> None:
    SMALL_RAM.view[:] = bytes(len(SMALL_RAM.view))
    vm = machine(memory=SMALL_RAM)
    d = FwCfg()
    d.add_file("etc/static", bytes(range(200)))
    d.add_file("etc/lazy", lambda: b"lazy" * 10)
    vm.attach(d)
    for op in ops:
        if op[0] == "io":
            _, port, size, is_write, value = op
            if is_write:
                outp(vm, port, size, value & ((1 << (8 * size)) - 1))
            else:
                assert 0 <= inp(vm, port, size) < 1 << (8 * size)
        else:
            _, control, length, address, desc, high = op
            if vm.memory.contains(desc, 16):
                vm.memory.write(desc, struct.pack(">IIQ", control, length, address))
            outp(vm, DMA_HI, 4, bswap32(high))
            outp(vm, DMA_LO, 4, bswap32(desc))
            target = high << 32 | desc
            if vm.memory.contains(target, 16):
                status = int.from_bytes(vm.memory.read(target, 4), "big")
                assert status in (0, DMA_CTL_ERROR)
        state = d.save_state()
        assert 0 <= state["offset"] <= max(len(d._data), 0)
        assert 0 <= state["selector"] <= 0xFFFF
