# SPDX-License-Identifier: BSD-2-Clause
"""The ACPI table builder: collects each plugin's part, lays the tables out and links
them, then hands them to the guest.

Two ways to hand them over:

* :meth:`AcpiBuilder.install` writes them into guest RAM below 1 MiB, for direct kernel
  boot (the RSDP's address goes in the boot parameters; a legacy scan finds it too).
* :meth:`AcpiBuilder.to_fw_cfg` publishes them as QEMU's table-loader files, which
  SeaBIOS and OVMF read through fw_cfg: ``etc/acpi/tables`` (every table),
  ``etc/acpi/rsdp``, and ``etc/table-loader``, a list of 128-byte commands telling the
  firmware where to allocate each file, which pointer fields to relocate and which
  checksums to compute.

Both come from one unlinked layout (:class:`AcpiTables`): pointer fields hold offsets
into the tables blob and checksum bytes are zero until :meth:`AcpiTables.link` (or the
firmware) fills them in.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Protocol

import attrs

from hvf.acpi import aml, tables
from hvf.errors import ConfigError

if TYPE_CHECKING:
    from hvf.vm import Machine

#: Where :meth:`AcpiBuilder.install` puts the tables, and the BIOS area they stay below.
INSTALL_BASE = 0xE0000
INSTALL_LIMIT = 0xF0000
RSDP_ALIGN = 16
TABLES_ALIGN = tables.FACS_ALIGN
TABLE_ALIGN = 8

TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"

# QEMU's table-loader commands: a u32 command, then its fields, zero-padded to 128 bytes.
LOADER_ENTRY_SIZE = 128
CMD_ALLOCATE = 1
CMD_ADD_POINTER = 2
CMD_ADD_CHECKSUM = 3
ZONE_HIGH = 1  # anywhere in 32-bit memory
ZONE_FSEG = 2  # the 0xE0000-0xFFFFF BIOS area, where a legacy scan finds the RSDP
#: ALLOCATE: file, alignment, zone.
ALLOCATE = struct.Struct("<56sIB")
#: ADD_POINTER: file holding the pointer, file pointed into, field offset, field size.
ADD_POINTER = struct.Struct("<56s56sIB")
#: ADD_CHECKSUM: file, checksum byte offset, start and length of the summed range.
ADD_CHECKSUM = struct.Struct("<56sIII")

SB = "\\_SB"
ROOT = "\\"


class FileSink(Protocol):
    """Where :meth:`AcpiBuilder.to_fw_cfg` puts its files (the fw_cfg device)."""

    def add_file(self, name: str, data: bytes) -> None: ...


@attrs.frozen
class Pointer:
    """A ``size``-byte field at ``offset`` in ``file`` that holds an offset into the
    tables blob; linking adds the blob's guest address."""

    file: str
    offset: int
    size: int


@attrs.frozen
class Checksum:
    """The byte at ``offset`` in ``file`` makes ``length`` bytes from ``start`` sum to 0."""

    file: str
    offset: int
    start: int
    length: int


def _entry(command: int, fields: bytes) -> bytes:
    return struct.pack("<I", command) + fields.ljust(LOADER_ENTRY_SIZE - 4, b"\0")


def _name(file: str) -> bytes:
    return file.encode("ascii")


@attrs.frozen
class AcpiTables:
    """The tables laid out but not linked: pointers relative, checksums zero."""

    tables: bytes
    rsdp: bytes
    pointers: tuple[Pointer, ...]
    checksums: tuple[Checksum, ...]

    def link(self, tables_address: int) -> tuple[bytes, bytes]:
        """The tables blob and RSDP as they read once the blob is at ``tables_address``."""
        blobs = {TABLES_FILE: bytearray(self.tables), RSDP_FILE: bytearray(self.rsdp)}
        for p in self.pointers:
            blob = blobs[p.file]
            value = int.from_bytes(blob[p.offset : p.offset + p.size], "little") + tables_address
            blob[p.offset : p.offset + p.size] = value.to_bytes(p.size, "little")
        for c in self.checksums:
            blob = blobs[c.file]
            blob[c.offset] = 0
            blob[c.offset] = tables.checksum(blob[c.start : c.start + c.length])
        return bytes(blobs[TABLES_FILE]), bytes(blobs[RSDP_FILE])

    def table_loader(self) -> bytes:
        """The ``etc/table-loader`` commands: allocate both files, relocate every pointer,
        then compute every checksum."""
        commands = [
            _entry(CMD_ALLOCATE, ALLOCATE.pack(_name(TABLES_FILE), TABLES_ALIGN, ZONE_HIGH)),
            _entry(CMD_ALLOCATE, ALLOCATE.pack(_name(RSDP_FILE), RSDP_ALIGN, ZONE_FSEG)),
        ]
        commands += [
            _entry(CMD_ADD_POINTER,
                   ADD_POINTER.pack(_name(p.file), _name(TABLES_FILE), p.offset, p.size))
            for p in self.pointers
        ]
        commands += [
            _entry(CMD_ADD_CHECKSUM, ADD_CHECKSUM.pack(_name(c.file), c.offset, c.start, c.length))
            for c in self.checksums
        ]
        return b"".join(commands)


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _scope_depth(path: str) -> int:
    return 0 if path == ROOT else path.count(".") + 1


class _Layout:
    """The tables blob as it is filled, with its pointer fields and checksums."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.pointers: list[Pointer] = []
        self.checksums: list[Checksum] = []

    def put(self, table: bytes, *, checksummed: bool = True) -> int:
        offset = _align(len(self.blob), TABLE_ALIGN)
        self.blob += bytes(offset - len(self.blob)) + table
        if checksummed:
            self.blob[offset + tables.CHECKSUM_OFFSET] = 0
            self.checksums.append(Checksum(TABLES_FILE, offset + tables.CHECKSUM_OFFSET,
                                           offset, len(table)))
        return offset

    def point(self, offset: int, size: int, target: int) -> None:
        """Make the field at ``offset`` of the blob a pointer to blob offset ``target``."""
        self.blob[offset : offset + size] = target.to_bytes(size, "little")
        self.pointers.append(Pointer(TABLES_FILE, offset, size))


class AcpiBuilder:
    """What goes in the guest's ACPI tables, added to by the core and each plugin.

    :attr:`fadt` holds the fixed hardware (PM blocks, SCI, reset register, flags);
    :meth:`dsdt` adds AML, :meth:`madt` interrupt controller entries and
    :meth:`add_table` whole tables (listed in the XSDT and RSDT).
    """

    def __init__(self) -> None:
        self.fadt = tables.Fadt()
        self._scopes: dict[str, list[bytes]] = {}
        self._madt: list[bytes] = []
        self._tables: list[bytes] = []

    def dsdt(self, *terms: bytes, scope: str = SB) -> None:
        """Add AML ``terms`` to the DSDT inside ``scope``, an absolute path (``\\`` is the
        root). Shallower scopes come first in the DSDT, so a plugin may extend a device
        that another plugin defines (the LPC's ``Device (ISA)`` in ``\\_SB.PC00``)."""
        if not scope.startswith(ROOT):
            raise ValueError(f"DSDT scope {scope!r} is not an absolute path")
        aml.name_string(scope)
        self._scopes.setdefault(scope, []).extend(terms)

    def madt(self, *entries: bytes) -> None:
        """Add MADT entries (:func:`hvf.acpi.tables.local_apic` and the like)."""
        self._madt.extend(entries)

    def add_table(self, table: bytes) -> None:
        """Add a whole table, made with :func:`hvf.acpi.tables.sdt`."""
        signature, length = struct.unpack_from("<4sI", table)
        if length != len(table):
            raise ValueError(f"ACPI table {signature!r} says {length} bytes but has {len(table)}")
        self._tables.append(bytes(table))

    def dsdt_aml(self) -> bytes:
        """The DSDT's AML: root terms, then one ``Scope`` per other scope."""
        parts = []
        for path in sorted(self._scopes, key=_scope_depth):
            terms = self._scopes[path]
            parts.append(b"".join(terms) if path == ROOT else aml.scope(path, *terms))
        return b"".join(parts)

    def build(self) -> AcpiTables:
        """Lay out FACS, DSDT, FADT, MADT, the added tables, XSDT and RSDT, and the RSDP."""
        layout = _Layout()
        facs = layout.put(tables.facs(), checksummed=False)  # offset 0: 64-byte aligned
        dsdt = layout.put(tables.sdt(b"DSDT", tables.DSDT_REVISION, self.dsdt_aml()))
        fadt = layout.put(tables.fadt(self.fadt))
        layout.point(fadt + tables.FADT_FIRMWARE_CTRL, 4, facs)
        layout.point(fadt + tables.FADT_DSDT, 4, dsdt)
        layout.point(fadt + tables.FADT_X_FIRMWARE_CTRL, 8, facs)
        layout.point(fadt + tables.FADT_X_DSDT, 8, dsdt)
        listed = [fadt, layout.put(tables.madt(self._madt))]
        listed += [layout.put(t) for t in self._tables]

        roots = {}
        for signature, revision, size in ((b"XSDT", tables.XSDT_REVISION, 8),
                                          (b"RSDT", tables.RSDT_REVISION, 4)):
            root = layout.put(tables.sdt(signature, revision, bytes(size * len(listed))))
            for i, target in enumerate(listed):
                layout.point(root + tables.HEADER.size + size * i, size, target)
            roots[signature] = root

        rsdp = tables.rsdp(roots[b"RSDT"], roots[b"XSDT"])
        rsdp[tables.RSDP_CHECKSUM] = rsdp[tables.RSDP_EXTENDED_CHECKSUM] = 0
        return AcpiTables(
            tables=bytes(layout.blob),
            rsdp=bytes(rsdp),
            pointers=(*layout.pointers,
                      Pointer(RSDP_FILE, tables.RSDP_RSDT_ADDRESS, 4),
                      Pointer(RSDP_FILE, tables.RSDP_XSDT_ADDRESS, 8)),
            checksums=(*layout.checksums,
                       Checksum(RSDP_FILE, tables.RSDP_CHECKSUM, 0, tables.RSDP_V1_LENGTH),
                       Checksum(RSDP_FILE, tables.RSDP_EXTENDED_CHECKSUM, 0, len(rsdp))),
        )

    def install(self, vm: Machine, base: int = INSTALL_BASE, limit: int = INSTALL_LIMIT) -> int:
        """Write the linked tables into guest RAM from ``base`` (RSDP first, 16-byte
        aligned) up to ``limit``; returns the RSDP's guest-physical address."""
        built = self.build()
        rsdp_address = _align(base, RSDP_ALIGN)
        tables_address = _align(rsdp_address + len(built.rsdp), TABLES_ALIGN)
        end = tables_address + len(built.tables)
        if end > limit:
            raise ConfigError(
                f"the ACPI tables ({end - rsdp_address} bytes) do not fit between "
                f"{rsdp_address:#x} and {limit:#x}"
            )
        linked_tables, linked_rsdp = built.link(tables_address)
        vm.memory.write(tables_address, linked_tables)
        vm.memory.write(rsdp_address, linked_rsdp)
        return rsdp_address

    def to_fw_cfg(self, fwcfg: FileSink) -> None:
        """Publish the tables as QEMU's table-loader files for the firmware."""
        built = self.build()
        fwcfg.add_file(TABLES_FILE, built.tables)
        fwcfg.add_file(RSDP_FILE, built.rsdp)
        fwcfg.add_file(LOADER_FILE, built.table_loader())


#: Processor devices are named C000, C001, ... (three hex digits).
MAX_PROCESSOR_DEVICES = 0x1000
#: The NMI input of every local APIC, as on a PC.
LAPIC_NMI_LINT = 1


def describe_machine(vm: Machine, acpi: AcpiBuilder) -> None:
    """The core's part: the vCPUs' local APICs and processor devices, KVM's I/O APIC,
    and the FADT flags that hold for any hvf machine."""
    if vm.ncpus > MAX_PROCESSOR_DEVICES:
        raise ConfigError(f"ACPI tables describe at most {MAX_PROCESSOR_DEVICES} vCPUs")
    acpi.fadt.flags |= tables.FADT_WBINVD | tables.FADT_PROC_C1 | tables.FADT_SLP_BUTTON
    acpi.madt(*(tables.local_apic(i, i) for i in range(vm.ncpus)))
    acpi.madt(tables.io_apic(vm.ncpus & 0xFF, tables.IO_APIC_ADDRESS, 0),
              tables.local_apic_nmi(tables.ALL_PROCESSORS, LAPIC_NMI_LINT))
    acpi.dsdt(*(aml.device(f"C{i:03X}", aml.name("_HID", aml.hardware_id("ACPI0007")),
                           aml.name("_UID", i))
                for i in range(vm.ncpus)))


def build_for(vm: Machine) -> AcpiBuilder:
    """A builder holding the core's part and every plugin's (``hvf_acpi_tables``).

    Call it once the machine is ready (PCI windows are assigned in
    ``hvf_machine_ready``).
    """
    acpi = AcpiBuilder()
    describe_machine(vm, acpi)
    vm.hook.hvf_acpi_tables(vm=vm, acpi=acpi)
    return acpi
