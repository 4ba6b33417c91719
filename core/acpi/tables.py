# SPDX-License-Identifier: BSD-2-Clause
"""ACPI table encoders (ACPI 6.x §5.2): RSDP, SDT header, FADT, FACS, MADT, MCFG.

Pointers between tables are left for :class:`hvf.acpi.builder.AcpiBuilder` to fill in;
the offsets of the pointer fields are exported for it.
"""

from __future__ import annotations

import struct

import attrs

OEM_ID = b"HVF   "
OEM_TABLE_ID = b"HVFVM   "
OEM_REVISION = 1
CREATOR_ID = b"HVF "
CREATOR_REVISION = 1

#: Signature, length, revision, checksum, OEM ID, OEM table ID, OEM revision, creator
#: ID, creator revision.
HEADER = struct.Struct("<4sIBB6s8sI4sI")
CHECKSUM_OFFSET = 9

# ---- RSDP ----

RSDP_SIGNATURE = b"RSD PTR "
#: Signature, checksum, OEM ID, revision, RSDT address, length, XSDT address, extended
#: checksum, reserved.
RSDP = struct.Struct("<8sB6sBIIQB3x")
RSDP_REVISION = 2
RSDP_CHECKSUM = 8
RSDP_V1_LENGTH = 20
RSDP_RSDT_ADDRESS = 16
RSDP_XSDT_ADDRESS = 24
RSDP_EXTENDED_CHECKSUM = 32

# ---- generic address structure ----

SPACE_SYSTEM_MEMORY = 0
SPACE_SYSTEM_IO = 1
ACCESS_UNDEFINED = 0
ACCESS_BYTE = 1
ACCESS_WORD = 2
ACCESS_DWORD = 3
ACCESS_QWORD = 4
GAS = struct.Struct("<BBBBQ")


@attrs.frozen
class Gas:
    """A Generic Address Structure: where a register is and how it is accessed."""

    space_id: int
    bit_width: int
    address: int
    access_size: int = ACCESS_UNDEFINED
    bit_offset: int = 0

    def pack(self) -> bytes:
        return GAS.pack(self.space_id, self.bit_width, self.bit_offset, self.access_size,
                        self.address)


NO_REGISTER = bytes(GAS.size)

# ---- FADT ----

FADT_REVISION = 6
FADT_MINOR_REVISION = 3
FADT_LENGTH = 276
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_X_FIRMWARE_CTRL = 132
FADT_X_DSDT = 140

# Fixed feature flags.
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set: the power button is a control-method device
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags.
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
#: P_LVL2_LAT above 100 and P_LVL3_LAT above 1000 say C2 and C3 are not supported.
NO_C2_LATENCY = 0x0FFF
NO_C3_LATENCY = 0x0FFF


@attrs.define
class Fadt:
    """The FADT's fixed hardware description; plugins fill in what they own.

    Register blocks are I/O port bases and lengths; the 64-bit ``X_`` copies are
    derived from them. The FACS and DSDT pointers are the builder's.
    """

    preferred_pm_profile: int = 0
    sci_int: int = 0
    smi_cmd: int = 0
    acpi_enable: int = 0
    acpi_disable: int = 0
    pm1a_evt_blk: int = 0
    pm1_evt_len: int = 0
    pm1a_cnt_blk: int = 0
    pm1_cnt_len: int = 0
    pm_tmr_blk: int = 0
    pm_tmr_len: int = 0
    gpe0_blk: int = 0
    gpe0_blk_len: int = 0
    p_lvl2_lat: int = NO_C2_LATENCY
    p_lvl3_lat: int = NO_C3_LATENCY
    century: int = 0
    iapc_boot_arch: int = 0
    flags: int = 0
    reset_reg: Gas | None = None
    reset_value: int = 0


def _io_block(base: int, length: int, access_size: int) -> bytes:
    if not base:
        return NO_REGISTER
    return Gas(SPACE_SYSTEM_IO, length * 8, base, access_size).pack()


def fadt(f: Fadt) -> bytearray:
    """The FADT (revision 6), its FACS and DSDT pointers zero."""
    body = struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        0,  # FIRMWARE_CTRL
        0,  # DSDT
        0,  # reserved
        f.preferred_pm_profile,
        f.sci_int,
        f.smi_cmd,
        f.acpi_enable,
        f.acpi_disable,
        0,  # S4BIOS_REQ
        0,  # PSTATE_CNT
        f.pm1a_evt_blk,
        0,  # PM1b_EVT_BLK
        f.pm1a_cnt_blk,
        0,  # PM1b_CNT_BLK
        0,  # PM2_CNT_BLK
        f.pm_tmr_blk,
        f.gpe0_blk,
        0,  # GPE1_BLK
        f.pm1_evt_len,
        f.pm1_cnt_len,
        0,  # PM2_CNT_LEN
        f.pm_tmr_len,
        f.gpe0_blk_len,
        0,  # GPE1_BLK_LEN
        0,  # GPE1_BASE
        0,  # CST_CNT
        f.p_lvl2_lat,
        f.p_lvl3_lat,
        0,  # FLUSH_SIZE
        0,  # FLUSH_STRIDE
        0,  # DUTY_OFFSET
        0,  # DUTY_WIDTH
        0,  # DAY_ALRM
        0,  # MON_ALRM
        f.century,
        f.iapc_boot_arch,
        0,  # reserved
        f.flags,
    )
    body += f.reset_reg.pack() if f.reset_reg is not None else NO_REGISTER
    body += struct.pack("<BHBQQ", f.reset_value, 0, FADT_MINOR_REVISION, 0, 0)
    body += b"".join((
        _io_block(f.pm1a_evt_blk, f.pm1_evt_len, ACCESS_WORD),
        NO_REGISTER,  # X_PM1b_EVT_BLK
        _io_block(f.pm1a_cnt_blk, f.pm1_cnt_len, ACCESS_WORD),
        NO_REGISTER,  # X_PM1b_CNT_BLK
        NO_REGISTER,  # X_PM2_CNT_BLK
        _io_block(f.pm_tmr_blk, f.pm_tmr_len, ACCESS_DWORD),
        _io_block(f.gpe0_blk, f.gpe0_blk_len, ACCESS_BYTE),
        NO_REGISTER,  # X_GPE1_BLK
        NO_REGISTER,  # SLEEP_CONTROL_REG
        NO_REGISTER,  # SLEEP_STATUS_REG
    ))
    body += bytes(8)  # hypervisor vendor identity
    table = sdt(b"FACP", FADT_REVISION, body)
    assert len(table) == FADT_LENGTH
    return table


# ---- FACS ----

FACS_LENGTH = 64
FACS_VERSION = 2
#: The FACS must start on a 64-byte boundary.
FACS_ALIGN = 64


def facs() -> bytes:
    """The FACS (no checksum; hardware signature 0, no waking vector)."""
    # Signature, length, hardware signature, waking vector, global lock, flags, 64-bit
    # waking vector, version; reserved to the end.
    head = struct.pack("<4sIIIIIQB", b"FACS", FACS_LENGTH, 0, 0, 0, 0, 0, FACS_VERSION)
    return head.ljust(FACS_LENGTH, b"\0")


# ---- MADT ----

MADT_REVISION = 5
LOCAL_APIC_ADDRESS = 0xFEE0_0000
IO_APIC_ADDRESS = 0xFEC0_0000
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LOCAL_X2APIC = 9
LAPIC_ENABLED = 1 << 0
#: An x2APIC ID from here up has no xAPIC (8-bit) form; 0xFF is the broadcast ID.
X2APIC_ONLY = 0xFF
#: Processor UID meaning "every processor" in a Local APIC NMI entry.
ALL_PROCESSORS = 0xFF
# MPS INTI flags (interrupt overrides and NMI entries).
POLARITY_HIGH = 0b01
POLARITY_LOW = 0b11
TRIGGER_EDGE = 0b01 << 2
TRIGGER_LEVEL = 0b11 << 2


def local_apic(uid: int, apic_id: int) -> bytes:
    """A processor's enabled local APIC (an x2APIC entry when the ID needs it)."""
    if apic_id < X2APIC_ONLY and uid <= 0xFF:
        return struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, uid, apic_id, LAPIC_ENABLED)
    return struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, apic_id, LAPIC_ENABLED, uid)


def io_apic(ioapic_id: int, address: int, gsi_base: int) -> bytes:
    return struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id, 0, address, gsi_base)


def interrupt_override(source: int, gsi: int, flags: int) -> bytes:
    """ISA IRQ ``source`` arrives on ``gsi`` with MPS INTI ``flags``."""
    return struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, source, gsi, flags)


def local_apic_nmi(uid: int, lint: int, flags: int = 0) -> bytes:
    return struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, uid, flags, lint)


def madt(entries: list[bytes], lapic_address: int = LOCAL_APIC_ADDRESS,
         flags: int = MADT_PCAT_COMPAT) -> bytearray:
    return sdt(b"APIC", MADT_REVISION, struct.pack("<II", lapic_address, flags) + b"".join(entries))


# ---- MCFG ----

MCFG_REVISION = 1


def mcfg(base: int, segment: int = 0, start_bus: int = 0, end_bus: int = 255) -> bytearray:
    """One ECAM region: ``base`` covers buses ``start_bus``-``end_bus`` of ``segment``."""
    return sdt(b"MCFG", MCFG_REVISION,
               bytes(8) + struct.pack("<QHBBI", base, segment, start_bus, end_bus, 0))


# ---- SDT header, RSDP ----

DSDT_REVISION = 2  # 64-bit AML integers
XSDT_REVISION = 1
RSDT_REVISION = 1


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The byte that makes ``data`` (with that byte 0) sum to zero."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytearray:
    """A system description table: header (checksummed) and ``body``."""
    table = bytearray(HEADER.pack(signature, HEADER.size + len(body), revision, 0, OEM_ID,
                                  OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION))
    table += body
    table[CHECKSUM_OFFSET] = checksum(table)
    return table


def rsdp(rsdt_address: int, xsdt_address: int) -> bytearray:
    """The revision 2 RSDP, both checksums set."""
    table = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, rsdt_address,
                                RSDP.size, xsdt_address, 0))
    table[RSDP_CHECKSUM] = checksum(table[:RSDP_V1_LENGTH])
    table[RSDP_EXTENDED_CHECKSUM] = checksum(table)
    return table
