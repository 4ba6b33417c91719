# SPDX-License-Identifier: BSD-2-Clause
"""Tests for the ACPI tables: the AML encoder, every table's layout and checksums, the
plugins' DSDT content, installation in guest RAM and QEMU's table-loader files.

No KVM: a fake machine carries a real PCI bus, LPC bridge and plugin manager, and the
tables are read back the way a guest finds them (legacy RSDP scan, then pointers).
Content is checked against ACPICA's disassembler (``iasl``, Debian's acpica-tools);
those tests are skipped where it is not installed.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hvf.acpi import aml, build_for, tables
from hvf.acpi.builder import (
    CMD_ADD_CHECKSUM,
    CMD_ADD_POINTER,
    CMD_ALLOCATE,
    LOADER_FILE,
    RSDP_FILE,
    TABLES_FILE,
    ZONE_FSEG,
    ZONE_HIGH,
    AcpiBuilder,
)
from hvf.errors import ConfigError
from hvf.memory import GuestMemory, MiB
from hvf.pluginmanager import Plugins
from hvf.plugins.uart import com
from hvf.plugins.lpc.bridge import LpcBridge, attach_isa_devices
from hvf.plugins.lpc.fwcfg import FwCfg
from hvf.plugins.pci.bus import ECAM_BASE, PciBus
from hvf.plugins.pci import BAR_MEM64, PciDevice
from hvf.plugins.pci.intx import pirq_for

import fakes

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(
    IASL is None, reason="iasl not found (install Debian's acpica-tools)"
)

LPC = (0, 31, 0)
SCAN_START, SCAN_END = 0xE0000, 0x100000

# ---- a machine with a PCI bus and an LPC bridge, no KVM ----


class FakeVm(fakes.FakeVm):
    """The fake machine with its own RAM and the real plugin manager (whose hooks the
    tables come from)."""

    def __init__(self, ncpus: int, config: dict[str, str]) -> None:
        super().__init__(config, GuestMemory(64 * MiB), ncpus=ncpus)
        self.plugins = Plugins()
        self.hook = self.plugins.hook


class BigBar(PciDevice):
    """A function with a 256 MiB 64-bit BAR, which goes in the 64-bit window."""

    def __init__(self) -> None:
        super().__init__("big")
        self.set_identity(0x1AF4, 0x1000, 0x020000)
        self.add_bar(0, BAR_MEM64, 256 * MiB, lambda o, s: 0, lambda o, s, v: None,
                     prefetchable=True)


def machine(ncpus: int = 1, *, fwcfg: bool = False, big_bar: bool = False) -> FakeVm:
    vm = FakeVm(ncpus, {"lpc.fwcfg": "qemu"} if fwcfg else {})
    bus = PciBus()
    vm.attach(bus)
    bus.add(LPC, LpcBridge("lpc@pci.0.31.0", vm.config))
    attach_isa_devices(vm)  # type: ignore[arg-type]
    if big_bar:
        bus.add((0, 4, 0), BigBar())
    bus.assign_resources(enable_decoding=True)
    return vm


# ---- reading the tables back as a guest does ----


def u(data: bytes | bytearray, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def scan_rsdp(vm: FakeVm) -> int:
    """The legacy scan: a 16-byte aligned "RSD PTR " in 0xE0000-0xFFFFF."""
    area = vm.memory.read(SCAN_START, SCAN_END - SCAN_START)
    for offset in range(0, len(area), 16):
        if area[offset : offset + 8] == b"RSD PTR ":
            return SCAN_START + offset
    raise AssertionError("no RSDP in 0xE0000-0xFFFFF")


def sdt_at(vm: FakeVm, address: int) -> bytes:
    length = vm.memory.read_u32(address + 4)
    table = vm.memory.read(address, length)
    assert sum(table) % 256 == 0, f"{table[:4]!r} checksum is wrong"
    return table


def installed(vm: FakeVm) -> dict[str, bytes]:
    """Every table reachable from the RSDP, by signature (the RSDP as "RSDP")."""
    rsdp = vm.memory.read(scan_rsdp(vm), 36)
    found = {"RSDP": rsdp}
    xsdt = sdt_at(vm, u(rsdp, 24, 8))
    found["XSDT"] = xsdt
    found["RSDT"] = sdt_at(vm, u(rsdp, 16, 4))
    for i in range(36, len(xsdt), 8):
        table = sdt_at(vm, u(xsdt, i, 8))
        found[table[:4].decode()] = table
    fadt = found["FACP"]
    found["DSDT"] = sdt_at(vm, u(fadt, 140, 8))
    found["FACS"] = vm.memory.read(u(fadt, 132, 8), 64)
    return found


def tables_of(vm: FakeVm) -> dict[str, bytes]:
    build_for(vm).install(vm)
    return installed(vm)


# ---- iasl ----


def iasl(*args: str, cwd: Path) -> str:
    assert IASL is not None
    result = subprocess.run([IASL, *args], cwd=cwd, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def disassemble(table: bytes, tmp_path: Path) -> str:
    name = table[:4].decode().lower()
    (tmp_path / f"{name}.dat").write_bytes(table)
    output = iasl("-d", f"{name}.dat", cwd=tmp_path)
    assert not re.search(r"\berror", output, re.IGNORECASE), output
    return (tmp_path / f"{name}.dsl").read_text()


def compile_asl(source: str, tmp_path: Path, name: str = "t") -> bytes:
    """AML that iasl makes of ``source``, optimizations off, without the header."""
    (tmp_path / f"{name}.asl").write_text(source)
    iasl("-oa", "-p", name, f"{name}.asl", cwd=tmp_path)
    return (tmp_path / f"{name}.aml").read_bytes()[36:]


def device_block(dsl: str, name: str) -> str:
    """The disassembled text of ``Device (name) { ... }``."""
    start = dsl.index(f"Device ({name})")
    depth, i = 0, dsl.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(dsl[i], 0)
        if depth == 0:
            return dsl[start : i + 1]
        i += 1


def io_ranges(block: str) -> list[tuple[int, int]]:
    """(minimum, length) of every ``IO (Decode16, ...)`` in ``block``."""
    found = re.findall(r"IO \(Decode16,\s*0x(\w+),\s*// Range Minimum\s*0x\w+,\s*// Range "
                       r"Maximum\s*0x\w+,\s*// Alignment\s*0x(\w+),", block)
    return [(int(a, 16), int(n, 16)) for a, n in found]


def irqs(block: str) -> list[int]:
    return [int(i) for i in re.findall(r"IRQNoFlags \(\)\s*\{(\d+)\}", block)]


# ==== 1. the AML encoder ====


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, encoded size) of the PkgLength at the start of ``data``."""
    follow = data[0] >> 6
    if not follow:
        return data[0] & 0x3F, 1
    value = data[0] & 0xF
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


PKG_LENGTH_LIMITS = (63, 4095, 2**20 - 1, 2**28 - 1)


@pytest.mark.parametrize(("value", "encoded"), [
    (0, "00"), (63, "3f"), (64, "4004"), (4095, "4fff"), (4096, "800001"),
    (0xF_FFFF, "8fffff"), (0x10_0000, "c0000001"), (0xFFF_FFFF, "cfffffff"),
])
def test_pkg_length_encodings(value: int, encoded: str) -> None:
    assert aml.pkg_length(value) == bytes.fromhex(encoded)
    assert decode_pkg_length(aml.pkg_length(value)) == (value, len(encoded) // 2)


@pytest.mark.parametrize("value", [-1, 0x1000_0000])
def test_pkg_length_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        aml.pkg_length(value)


@pytest.mark.parametrize("size", [*range(58, 66), *range(4088, 4100), *range(2**20 - 8, 2**20 + 2)])
def test_package_length_covers_itself_and_is_minimal(size: int) -> None:
    term = aml.scope("\\", bytes(size))  # ScopeOp PkgLength RootChar NullName body
    value, length_size = decode_pkg_length(term[1:])
    assert value == len(term) - 1
    body = value - length_size
    assert all(body + n > PKG_LENGTH_LIMITS[n - 1] for n in range(1, length_size))


@pytest.mark.parametrize(("value", "encoded"), [
    (0, "00"), (1, "01"), (2, "0a02"), (0xFF, "0aff"), (0x100, "0b0001"), (0xFFFF, "0bffff"),
    (0x1_0000, "0c00000100"), (0xFFFF_FFFF, "0cffffffff"),
    (0x1_0000_0000, "0e0000000001000000"), ((1 << 64) - 2, "0efeffffffffffffff"),
    ((1 << 64) - 1, "ff"),
])
def test_integer_encodings(value: int, encoded: str) -> None:
    assert aml.integer(value) == bytes.fromhex(encoded)


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        aml.integer(value)


@pytest.mark.parametrize(("path", "encoded"), [
    ("_SB", b"_SB_"),
    ("PC00", b"PC00"),
    ("\\", b"\\\x00"),
    ("\\_S5", b"\\_S5_"),
    ("\\_SB.PC00", b"\\\x2e_SB_PC00"),
    ("^^ISA", b"^^ISA_"),
    ("^", b"^\x00"),
    ("\\_SB.PC00.ISA", b"\\\x2f\x03_SB_PC00ISA_"),
    ("A.B.C.D", b"\x2f\x04A___B___C___D___"),
])
def test_name_strings(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["", "1ABC", "ABCDE", "_sb", "\\_SB..X", "A^B"])
def test_bad_names_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        aml.name_string(path)


@pytest.mark.parametrize(("text", "value"), [
    ("PNP0A03", 0x030AD041), ("PNP0A08", 0x080AD041), ("PNP0501", 0x0105D041),
    ("PNP0000", 0x0000D041),
])
def test_eisaid(text: str, value: int) -> None:
    assert aml.eisaid(text) == value


@pytest.mark.parametrize("text", ["PNP0A0", "pnp0a03", "PNP0A0G", "ACPI0007"])
def test_bad_eisaid(text: str) -> None:
    with pytest.raises(ValueError):
        aml.eisaid(text)


def test_data_objects() -> None:
    assert aml.string("ACPI0007") == b"\x0dACPI0007\x00"
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.package(5, 5, 0, 0) == b"\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"
    assert aml.data([1, "A", [2]]) == b"\x12\x0b\x03\x01\x0dA\x00\x12\x04\x01\x0a\x02"
    assert aml.hardware_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    assert aml.hardware_id("QEMU0002") == b"\x0dQEMU0002\x00"
    with pytest.raises(ValueError):
        aml.package(*range(256))
    with pytest.raises(ValueError):
        aml.string("a\0b")
    with pytest.raises(TypeError):
        aml.data(True)


def test_named_objects() -> None:
    assert aml.name("_UID", 1) == b"\x08_UID\x01"
    assert aml.method("_STA", aml.return_(0x0F)) == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.method("M", args=2, serialized=True)[-1] == 0x0A
    assert aml.device("ISA") == b"\x5b\x82\x05ISA_"
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"
    with pytest.raises(ValueError):
        aml.method("M", args=8)


def test_resource_descriptors() -> None:
    assert aml.io(0x3F8, 0x3F8, 1, 8) == bytes.fromhex("4701f803f8030108")
    assert aml.irq_noflags(4) == bytes.fromhex("221000")
    assert aml.fixed_io(0x60, 1) == bytes.fromhex("4b600001")
    assert aml.resource_template()[-2:] == bytes([aml.END_TAG, 0])
    for bad in ((), (16,)):
        with pytest.raises(ValueError):
            aml.irq_noflags(*bad)
    with pytest.raises(ValueError):
        aml.word_io(0x100, 0xFF)


RESOURCES_ASL = """
DefinitionBlock ("", "DSDT", 2, "HVF", "TEST", 1)
{
    Name (RT, ResourceTemplate ()
    {
        IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, )
        FixedIO (0x0060, 0x01, )
        IRQNoFlags () {1}
        IRQ (Level, ActiveLow, Shared, ) {5, 10}
        IRQ (Edge, ActiveHigh, Exclusive, ) {3}
        Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) {9}
        Interrupt (ResourceConsumer, Edge, ActiveLow, Shared, ,, ) {16, 23}
        WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
            0x0000, 0x0000, 0x00FF, 0x0000, 0x0100, ,, )
        WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
            0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300, ,, , TypeStatic, DenseTranslation)
        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
            0x00000000, 0x10000000, 0xDFFFFFFF, 0x00000000, 0xD0000000, ,, ,
            AddressRangeMemory, TypeStatic)
        QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,
            0x0, 0x800000000, 0x80FFFFFFF, 0x0, 0x10000000, ,, , AddressRangeMemory, TypeStatic)
        Memory32Fixed (ReadWrite, 0xE0000000, 0x10000000, )
    })
    Device (\\_SB.DEV)
    {
        Name (_HID, EisaId ("PNP0C02"))
        Method (_STA, 0, Serialized) { Return (0x0F) }
    }
}
"""


@needs_iasl
def test_encoder_matches_iasl(tmp_path: Path) -> None:
    ours = aml.name("RT", aml.resource_template(
        aml.io(0xCF8, 0xCF8, 1, 8),
        aml.fixed_io(0x60, 1),
        aml.irq_noflags(1),
        aml.irq(5, 10, level=True, active_low=True, shared=True),
        aml.irq(3),
        aml.extended_interrupt(9),
        aml.extended_interrupt(16, 23, level=False, active_low=True, shared=True),
        aml.word_bus_number(0, 0xFF),
        aml.word_io(0xD00, 0xFFFF),
        aml.dword_memory(0x1000_0000, 0xDFFF_FFFF),
        aml.qword_memory(0x8_0000_0000, 0x8_0FFF_FFFF, cacheable=True),
        aml.memory32_fixed(ECAM_BASE, 0x1000_0000),
    )) + aml.device("\\_SB.DEV", aml.name("_HID", aml.hardware_id("PNP0C02")),
                    aml.method("_STA", aml.return_(0x0F), serialized=True))
    assert ours == compile_asl(RESOURCES_ASL, tmp_path)


# ==== 2. tables: layout, checksums, pointers ====


@pytest.mark.parametrize("ncpus", [1, 4])
def test_rsdp_and_root_tables(ncpus: int) -> None:
    vm = machine(ncpus)
    address = build_for(vm).install(vm)
    assert address == scan_rsdp(vm) == 0xE0000
    found = installed(vm)
    rsdp = found["RSDP"]
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert rsdp[15] == 2 and u(rsdp, 20, 4) == 36
    xsdt, rsdt = found["XSDT"], found["RSDT"]
    listed_x = [u(xsdt, i, 8) for i in range(36, len(xsdt), 8)]
    listed_r = [u(rsdt, i, 4) for i in range(36, len(rsdt), 4)]
    assert listed_x == listed_r
    assert [vm.memory.read(a, 4) for a in listed_x] == [b"FACP", b"APIC", b"MCFG"]
    facs = found["FACS"]
    assert facs[:4] == b"FACS" and u(facs, 4, 4) == 64 and facs[32] == 2
    assert u(found["FACP"], 132, 8) % 64 == 0  # the FACS is 64-byte aligned
    every_table_end = max(a + u(vm.memory.read(a, 8), 4, 4) for a in listed_x)
    assert every_table_end <= 0xF0000


@pytest.mark.parametrize("ncpus", [1, 4])
def test_madt(ncpus: int) -> None:
    madt = tables_of(machine(ncpus))["APIC"]
    assert madt[8] == tables.MADT_REVISION
    assert u(madt, 36, 4) == 0xFEE0_0000 and u(madt, 40, 4) == 1  # PCAT_COMPAT
    entries = []
    i = 44
    while i < len(madt):
        entries.append(madt[i : i + madt[i + 1]])
        i += madt[i + 1]
    assert i == len(madt)
    lapics = [(e[2], e[3], u(e, 4, 4)) for e in entries if e[0] == 0]
    assert lapics == [(n, n, 1) for n in range(ncpus)]
    ioapics = [(e[2], u(e, 4, 4), u(e, 8, 4)) for e in entries if e[0] == 1]
    assert ioapics == [(ncpus, 0xFEC0_0000, 0)]
    overrides = [(e[2], e[3], u(e, 4, 4), u(e, 8, 2)) for e in entries if e[0] == 2]
    assert overrides == [(0, 9, 9, 0x000D)]  # ISA IRQ 9 → GSI 9, level, active high
    nmis = [(e[2], u(e, 3, 2), e[5]) for e in entries if e[0] == 4]
    assert nmis == [(0xFF, 0, 1)]


def test_fadt() -> None:
    found = tables_of(machine())
    fadt = found["FACP"]
    assert len(fadt) == 276 and fadt[8] == 6
    assert u(fadt, 36, 4) == u(fadt, 132, 8) and found["FACS"][:4] == b"FACS"
    assert u(fadt, 40, 4) == u(fadt, 140, 8)
    assert u(fadt, 46, 2) == 9  # SCI_INT
    assert (u(fadt, 48, 4), fadt[52], fadt[53]) == (0xB2, 0xA0, 0xA1)
    blocks = [u(fadt, o, 4) for o in (56, 60, 64, 68, 72, 76, 80, 84)]
    assert blocks == [0x600, 0, 0x604, 0, 0, 0x608, 0x60C, 0]
    assert list(fadt[88:94]) == [4, 2, 0, 4, 2, 0]
    assert fadt[108] == 0x32  # CMOS century register
    assert u(fadt, 109, 2) == 0x3  # legacy devices, 8042
    flags = u(fadt, 112, 4)
    for bit in (tables.FADT_WBINVD, tables.FADT_TMR_VAL_EXT, tables.FADT_RESET_REG_SUP,
                tables.FADT_SLP_BUTTON):
        assert flags & bit
    assert not flags & tables.FADT_PWR_BUTTON  # the fixed-feature power button
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0xCF9)
    assert fadt[128] == 6
    x_blocks = [struct.unpack_from("<BBBBQ", fadt, o) for o in (148, 172, 208, 220)]
    assert x_blocks == [(1, 32, 0, 2, 0x600), (1, 16, 0, 2, 0x604), (1, 32, 0, 3, 0x608),
                        (1, 16, 0, 1, 0x60C)]
    assert found["DSDT"][:4] == b"DSDT" and found["DSDT"][8] == 2


def test_mcfg() -> None:
    mcfg = tables_of(machine())["MCFG"]
    assert len(mcfg) == 60
    assert struct.unpack_from("<QHBB", mcfg, 44) == (ECAM_BASE, 0, 0, 255)


def test_machine_without_pci_or_lpc() -> None:
    vm = FakeVm(2, {})
    found = tables_of(vm)
    assert set(found) == {"RSDP", "XSDT", "RSDT", "FACP", "APIC", "DSDT", "FACS"}
    assert u(found["FACP"], 56, 4) == 0  # no PM block without the LPC
    assert found["DSDT"].count(b"ACPI0007") == 2


def test_install_refuses_tables_that_do_not_fit() -> None:
    vm = machine()
    acpi = build_for(vm)
    acpi.add_table(tables.sdt(b"SSDT", 2, bytes(0x10000)))
    with pytest.raises(ConfigError, match="do not fit"):
        acpi.install(vm)


def test_add_table_checks_the_length() -> None:
    table = tables.sdt(b"SSDT", 2, b"\x00")
    with pytest.raises(ValueError):
        AcpiBuilder().add_table(table[:-1])


def test_deeper_scopes_follow_the_ones_that_define_them() -> None:
    acpi = AcpiBuilder()
    acpi.dsdt(aml.device("ISA"), scope="\\_SB.PC00")
    acpi.dsdt(aml.name("_S5", [5, 5, 0, 0]), scope="\\")
    acpi.dsdt(aml.device("PC00"))
    assert acpi.dsdt_aml() == (aml.name("_S5", [5, 5, 0, 0])
                               + aml.scope("\\_SB", aml.device("PC00"))
                               + aml.scope("\\_SB.PC00", aml.device("ISA")))
    with pytest.raises(ValueError):
        acpi.dsdt(b"", scope="_SB")


# ==== 3. the plugins' DSDT content, read by iasl ====


@pytest.fixture(scope="module")
def dsl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every table of a 2-vCPU machine with fw_cfg and a 64-bit BAR, disassembled."""
    if IASL is None:
        pytest.skip("iasl not found (install Debian's acpica-tools)")
    tmp_path = tmp_path_factory.mktemp("acpi")
    found = tables_of(machine(2, fwcfg=True, big_bar=True))
    return {sig: disassemble(table, tmp_path) for sig, table in found.items()
            if sig not in ("RSDP",)}


@needs_iasl
def test_iasl_reads_every_table(dsl: dict[str, str]) -> None:
    assert set(dsl) == {"XSDT", "RSDT", "FACP", "APIC", "MCFG", "DSDT", "FACS"}
    assert "Processor Local APIC" in dsl["APIC"]
    assert "Base Address : 00000000E0000000" in dsl["MCFG"]
    assert re.search(r"Reset Register .*\n.*SystemIO.*\n.*\n.*\n.*Byte Access.*\n"
                     r".*Address : 0000000000000CF9", dsl["FACP"])


@needs_iasl
@pytest.mark.parametrize("ncpus", [1, 4])
def test_dsdt_recompiles_to_the_same_aml(ncpus: int, tmp_path: Path) -> None:
    dsdt = tables_of(machine(ncpus, fwcfg=True, big_bar=True))["DSDT"]
    source = disassemble(dsdt, tmp_path)
    assert compile_asl(source, tmp_path, "re") == dsdt[36:]


@needs_iasl
def test_root_bridge(dsl: dict[str, str]) -> None:
    pc00 = device_block(dsl["DSDT"], "PC00")
    assert 'EisaId ("PNP0A03")' in pc00 and 'EisaId ("PNP0A08")' in pc00
    for name in ("_UID", "_BBN", "_ADR"):
        assert f"Name ({name}, Zero)" in pc00
    crs = pc00[pc00.index("Name (_CRS") : pc00.index("Name (_PRT")]
    ranges = re.findall(r"(\w+) \(ResourceProducer.*?\n\s*0x\w+,\s*// Granularity\s*"
                        r"0x(\w+),\s*// Range Minimum\s*0x(\w+),", crs, re.S)
    assert [(kind, int(lo, 16), int(hi, 16)) for kind, lo, hi in ranges] == [
        ("WordBusNumber", 0, 0xFF),
        ("WordIO", 0, 0xCF7),
        ("WordIO", 0xD00, 0xFFFF),
        ("DWordMemory", 64 * MiB, 0xDFFF_FFFF),
        ("QWordMemory", 0x8_0000_0000, 0x8_0FFF_FFFF),
    ]
    assert io_ranges(crs) == [(0xCF8, 8)]


@needs_iasl
def test_pci_routing_table(dsl: dict[str, str]) -> None:
    prt = device_block(dsl["DSDT"], "PC00")
    prt = prt[prt.index("Name (_PRT") :]
    entries = re.findall(r"\{\s*(\w+),\s*(\w+),\s*(\w+),\s*(\w+)\s*\}", prt)
    value = {"Zero": 0, "One": 1}
    decoded = [tuple(value[x] if x in value else int(x, 16) for x in e) for e in entries]
    assert len(decoded) == 32 * 4
    expected = [(slot << 16 | 0xFFFF, pin, 0, 16 + pirq_for(slot, pin + 1))
                for slot in range(32) for pin in range(4)]
    assert decoded == expected
    assert decoded[0] == (0xFFFF, 0, 0, 21)  # slot 0 INTA: PIRQ (4 + 0 + 1) % 8 = 5


@needs_iasl
def test_isa_devices(dsl: dict[str, str]) -> None:
    dsdt = dsl["DSDT"]
    isa = device_block(dsdt, "ISA")
    assert "Name (_ADR, 0x001F0000)" in isa
    for n, (name, (base, irq)) in enumerate(com.COM_PORTS.items(), 1):
        block = device_block(dsdt, name.upper())  # the UART plugin's, in \_SB
        assert 'EisaId ("PNP0501")' in block
        assert f"Name (_UID, {['One', '0x02', '0x03', '0x04'][n - 1]})" in block
        assert io_ranges(block) == [(base, 8)] and irqs(block) == [irq]
    for name, hid, ports, irq in (
        ("RTC", "PNP0B00", [(0x70, 2)], 8),
        ("KBD", "PNP0303", [(0x60, 1), (0x64, 1)], 1),
        ("PIC", "PNP0000", [(0x20, 2), (0xA0, 2)], 2),
        ("TIMR", "PNP0100", [(0x40, 4)], 0),
    ):
        block = device_block(isa, name)
        assert f'EisaId ("{hid}")' in block
        assert io_ranges(block) == ports and irqs(block) == [irq]
    sysr = device_block(isa, "SYSR")
    assert 'EisaId ("PNP0C02")' in sysr
    assert io_ranges(sysr) == [(0x600, 16), (0xB2, 1), (0xCF9, 1), (0x92, 1), (0x4D0, 2)]
    assert re.search(r"Memory32Fixed \(ReadWrite,\s*0xE0000000,\s*// Address Base\s*"
                     r"0x10000000,", sysr)
    fwcf = device_block(isa, "FWCF")
    assert '"QEMU0002"' in fwcf and io_ranges(fwcf) == [(0x510, 12)]
    assert re.search(r"Name \(_S5, Package \(0x04\).*?\{\s*0x05,\s*0x05,\s*Zero,\s*Zero\s*\}",
                     dsdt, re.S)
    assert [device_block(dsdt, f"C00{i}").count('"ACPI0007"') for i in range(2)] == [1, 1]


@needs_iasl
def test_no_fw_cfg_device_without_fw_cfg(tmp_path: Path) -> None:
    dsdt = disassemble(tables_of(machine())["DSDT"], tmp_path)
    assert "QEMU0002" not in dsdt and "QWordMemory" not in dsdt


# ==== 4. QEMU's table loader ====


def file_name(entry: bytes, offset: int) -> str:
    """A loader command's file name: 56 bytes, NUL-terminated."""
    raw = entry[offset : offset + 56]
    assert b"\0" in raw
    return raw.split(b"\0")[0].decode()


def loader_commands(blob: bytes) -> list[tuple[Any, ...]]:
    """Decode ``etc/table-loader`` into (command, fields...) tuples."""
    assert len(blob) % 128 == 0
    commands: list[tuple[Any, ...]] = []
    for i in range(0, len(blob), 128):
        entry = blob[i : i + 128]
        command = u(entry, 0, 4)
        if command == CMD_ALLOCATE:
            commands.append(("allocate", file_name(entry, 4), u(entry, 60, 4), entry[64]))
            assert not any(entry[65:])
        elif command == CMD_ADD_POINTER:
            commands.append(("pointer", file_name(entry, 4), file_name(entry, 60),
                             u(entry, 116, 4), entry[120]))
            assert not any(entry[121:])
        elif command == CMD_ADD_CHECKSUM:
            commands.append(("checksum", file_name(entry, 4), u(entry, 60, 4), u(entry, 64, 4),
                             u(entry, 68, 4)))
            assert not any(entry[72:])
        else:
            raise AssertionError(f"unknown table-loader command {command}")
    return commands


def run_loader(files: dict[str, bytes], commands: list[tuple[Any, ...]],
               where: dict[str, int], *, assign: bool) -> dict[str, bytearray]:
    """Execute the commands as firmware does: SeaBIOS subtracts the range's sum from the
    checksum byte, OVMF assigns the checksum of the range (``assign``)."""
    memory: dict[str, bytearray] = {}
    for command in commands:
        if command[0] == "allocate":
            _, file, align, _zone = command
            assert where[file] % align == 0
            memory[file] = bytearray(files[file])
        elif command[0] == "pointer":
            _, dest, src, offset, size = command
            assert size in (1, 2, 4, 8) and src in memory and dest in memory
            value = u(memory[dest], offset, size) + where[src]
            memory[dest][offset : offset + size] = value.to_bytes(size, "little")
        else:
            _, file, offset, start, length = command
            data = memory[file]
            total = sum(data[start : start + length]) & 0xFF
            data[offset] = (-total & 0xFF) if assign else (data[offset] - total) & 0xFF
    return memory


def test_table_loader() -> None:
    vm = machine(4, fwcfg=True)
    acpi = build_for(vm)
    fwcfg = next(d for d in vm.devices if isinstance(d, FwCfg))
    acpi.to_fw_cfg(fwcfg)
    assert {TABLES_FILE, RSDP_FILE, LOADER_FILE} <= set(fwcfg.file_names())
    built = acpi.build()
    commands = loader_commands(built.table_loader())
    assert commands[:2] == [("allocate", TABLES_FILE, 64, ZONE_HIGH),
                            ("allocate", RSDP_FILE, 16, ZONE_FSEG)]
    kinds = [c[0] for c in commands[2:]]
    assert kinds == sorted(kinds, key=["pointer", "checksum"].index)  # relocate, then sum
    pointers = [c for c in commands if c[0] == "pointer"]
    checksums = [c for c in commands if c[0] == "checksum"]
    assert all(c[2] == TABLES_FILE for c in pointers)
    # FADT: FACS and DSDT (32- and 64-bit); XSDT and RSDT: 3 tables each; RSDP: 2.
    assert len(pointers) == 4 + 3 + 3 + 2
    assert ("pointer", RSDP_FILE, TABLES_FILE, 16, 4) in pointers
    assert ("pointer", RSDP_FILE, TABLES_FILE, 24, 8) in pointers
    assert checksums[-2:] == [("checksum", RSDP_FILE, 8, 0, 20),
                              ("checksum", RSDP_FILE, 32, 0, 36)]
    files = {TABLES_FILE: built.tables, RSDP_FILE: built.rsdp}
    for _, file, offset, _start, _length in checksums:
        assert files[file][offset] == 0  # OVMF assigns: the byte must start as zero
    where = {TABLES_FILE: 0x7FF_0000, RSDP_FILE: 0xF5A40}
    expected = built.link(where[TABLES_FILE])
    for assign in (False, True):
        loaded = run_loader(files, commands, where, assign=assign)
        assert (bytes(loaded[TABLES_FILE]), bytes(loaded[RSDP_FILE])) == expected
    # The loaded tables are what install() writes, only elsewhere.
    tables_blob, rsdp = expected
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt = u(rsdp, 24, 8) - where[TABLES_FILE]
    for i in range(xsdt + 36, xsdt + u(tables_blob, xsdt + 4, 4), 8):
        table = u(tables_blob, i, 8) - where[TABLES_FILE]
        assert sum(tables_blob[table : table + u(tables_blob, table + 4, 4)]) % 256 == 0
