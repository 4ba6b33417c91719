# SPDX-License-Identifier: BSD-2-Clause
"""An AML encoder for the part of ACPI Machine Language hvf's tables use (ACPI 6.x §20).

Every function returns encoded AML as ``bytes``. Where a data object is expected, plain
Python values are accepted and encoded by :func:`data`: ``int`` is an Integer in its
shortest encoding, ``str`` a String, ``list``/``tuple`` a Package, and ``bytes`` are
taken to be AML already encoded (a :func:`buffer`, say).

Resource descriptors (ACPI 6.x §6.4) are bytes too; :func:`resource_template` puts them
in a Buffer with the end tag, as ASL's ``ResourceTemplate ()`` does.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import TypeAlias

#: A value :func:`data` accepts.
Data: TypeAlias = "int | str | bytes | Sequence[Data]"

ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
NULL_NAME = 0x00
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
ROOT_CHAR = "\\"
PARENT_PREFIX = "^"

#: Integers are 64-bit in a table of revision 2 or later (hvf's DSDT).
ONES = (1 << 64) - 1
#: The largest value a PkgLength of 1, 2, 3 and 4 bytes can hold.
_PKG_LENGTH_LIMITS = (0x3F, 0xFFF, 0xF_FFFF, 0xFFF_FFFF)
_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
_EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")

# ---- names ----


def name_seg(seg: str) -> bytes:
    """A NameSeg: one to four characters, padded to four with ``_``."""
    if not _NAME_SEG.fullmatch(seg):
        raise ValueError(f"invalid AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: ``\\`` (root) or any number of ``^`` (parent), then dotted segments."""
    rest = path
    prefix = b""
    if rest.startswith(ROOT_CHAR):
        prefix, rest = b"\\", rest[1:]
    else:
        while rest.startswith(PARENT_PREFIX):
            prefix, rest = prefix + b"^", rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        if prefix == b"":
            raise ValueError("empty AML name")
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError(f"AML name {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# ---- lengths ----


def pkg_length(value: int) -> bytes:
    """Encode a PkgLength of ``value`` (a value that counts the encoding's own bytes)."""
    if not 0 <= value <= _PKG_LENGTH_LIMITS[-1]:
        raise ValueError(f"AML package length {value} out of range")
    if value <= _PKG_LENGTH_LIMITS[0]:
        return bytes([value])
    follow = next(n for n, limit in enumerate(_PKG_LENGTH_LIMITS) if value <= limit)
    return bytes([follow << 6 | value & 0xF]) + (value >> 4).to_bytes(follow, "little")


def _with_length(body: bytes) -> bytes:
    """``body`` preceded by the PkgLength that covers it and itself."""
    for size, limit in enumerate(_PKG_LENGTH_LIMITS, 1):
        if len(body) + size <= limit:
            return pkg_length(len(body) + size) + body
    raise ValueError(f"AML package body of {len(body)} bytes is too long")


# ---- data objects ----


def integer(value: int) -> bytes:
    """An Integer: Zero, One, Ones or the shortest of Byte/Word/DWord/QWord."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == ONES:
        return bytes([ONES_OP])
    for prefix, fmt, limit in (
        (BYTE_PREFIX, "<B", 0xFF),
        (WORD_PREFIX, "<H", 0xFFFF),
        (DWORD_PREFIX, "<I", 0xFFFF_FFFF),
        (QWORD_PREFIX, "<Q", ONES),
    ):
        if 0 <= value <= limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value} out of range")


def string(text: str) -> bytes:
    """A String (ASCII, no NUL)."""
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise ValueError("an AML string cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def buffer(content: bytes) -> bytes:
    """A Buffer holding ``content``."""
    return bytes([BUFFER_OP]) + _with_length(integer(len(content)) + bytes(content))


def package(*elements: Data) -> bytes:
    """A Package of up to 255 elements."""
    if len(elements) > 255:
        raise ValueError(f"an AML package holds at most 255 elements, not {len(elements)}")
    body = bytes([len(elements)]) + b"".join(data(e) for e in elements)
    return bytes([PACKAGE_OP]) + _with_length(body)


def data(value: Data) -> bytes:
    """Encode a data object from a Python value (see the module documentation)."""
    if isinstance(value, bool):
        raise TypeError("use 0 or 1 for AML integers, not bool")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return package(*value)


def eisaid(text: str) -> int:
    """The compressed EISA ID of ``text`` (``"PNP0A03"`` → 0x030AD041)."""
    if not _EISA_ID.fullmatch(text):
        raise ValueError(f"invalid EISA ID {text!r}")
    letters = 0
    for char in text[:3]:
        letters = letters << 5 | (ord(char) - 0x40)
    raw = letters.to_bytes(2, "big") + bytes.fromhex(text[3:])
    return int.from_bytes(raw, "little")


def hardware_id(text: str) -> bytes:
    """A _HID/_CID value: a compressed EISA ID (``PNP0501``) or an ACPI ID string
    (``ACPI0007``, ``QEMU0002``)."""
    return integer(eisaid(text)) if len(text) == 7 else string(text)


# ---- named objects and statements ----


def name(path: str, value: Data) -> bytes:
    """``Name (path, value)``."""
    return bytes([NAME_OP]) + name_string(path) + data(value)


def scope(path: str, *terms: bytes) -> bytes:
    """``Scope (path) { terms }``."""
    return bytes([SCOPE_OP]) + _with_length(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """``Device (path) { terms }``."""
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + _with_length(name_string(path) + b"".join(terms))


def method(path: str, *terms: bytes, args: int = 0, serialized: bool = False) -> bytes:
    """``Method (path, args, Serialized|NotSerialized) { terms }`` (sync level 0)."""
    if not 0 <= args <= 7:
        raise ValueError(f"an AML method takes 0 to 7 arguments, not {args}")
    flags = args | (0x08 if serialized else 0)
    return bytes([METHOD_OP]) + _with_length(name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: Data) -> bytes:
    """``Return (value)``."""
    return bytes([RETURN_OP]) + data(value)


# ---- resource descriptors ----

END_TAG = 0x79
IRQ_NO_FLAGS_TAG = 0x22
IRQ_TAG = 0x23
IO_TAG = 0x47
FIXED_IO_TAG = 0x4B
MEMORY32_FIXED_TAG = 0x86
DWORD_ADDRESS_TAG = 0x87
WORD_ADDRESS_TAG = 0x88
EXTENDED_INTERRUPT_TAG = 0x89
QWORD_ADDRESS_TAG = 0x8A

RESOURCE_MEMORY = 0
RESOURCE_IO = 1
RESOURCE_BUS_NUMBER = 2
#: Address space general flags: the minimum and maximum addresses are fixed.
_MIN_FIXED = 0x04
_MAX_FIXED = 0x08
#: General flag bit 0: the device consumes the resource (clear: it produces it).
_CONSUMER = 0x01
#: I/O type-specific flags: the range covers ISA and non-ISA addresses.
_IO_ENTIRE_RANGE = 0x03
#: Memory type-specific flags.
_MEM_READ_WRITE = 0x01
_MEM_CACHEABLE = 0x02


def resource_template(*descriptors: bytes) -> bytes:
    """A Buffer holding ``descriptors`` and the end tag (checksum 0: not checked)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def _irq_mask(irqs: Sequence[int]) -> int:
    if not irqs or any(not 0 <= i <= 15 for i in irqs):
        raise ValueError(f"ISA IRQ descriptor needs IRQs 0-15, not {list(irqs)}")
    return sum(1 << i for i in set(irqs))


def irq_noflags(*irqs: int) -> bytes:
    """``IRQNoFlags () {irqs}``: edge-triggered, active-high, exclusive ISA IRQs."""
    return struct.pack("<BH", IRQ_NO_FLAGS_TAG, _irq_mask(irqs))


def irq(*irqs: int, level: bool = False, active_low: bool = False, shared: bool = False) -> bytes:
    """``IRQ (Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {irqs}``."""
    flags = (0 if level else 0x01) | (0x08 if active_low else 0) | (0x10 if shared else 0)
    return struct.pack("<BHB", IRQ_TAG, _irq_mask(irqs), flags)


def io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """``IO (Decode16, minimum, maximum, alignment, length)``."""
    return struct.pack("<BBHHBB", IO_TAG, 0x01, minimum, maximum, alignment, length)


def fixed_io(base: int, length: int) -> bytes:
    """``FixedIO (base, length)`` (10-bit decode)."""
    if not 0 <= base <= 0x3FF:
        raise ValueError(f"FixedIO base {base:#x} is above 0x3FF")
    return struct.pack("<BHB", FIXED_IO_TAG, base, length)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """``Memory32Fixed (ReadWrite|ReadOnly, base, length)``."""
    return struct.pack("<BHBII", MEMORY32_FIXED_TAG, 9, 1 if writable else 0, base, length)


def extended_interrupt(
    *gsis: int, consumer: bool = True, level: bool = True, active_low: bool = False,
    shared: bool = False,
) -> bytes:
    """``Interrupt (ResourceConsumer|Producer, Edge|Level, ActiveHigh|Low, Exclusive|Shared)
    {gsis}``."""
    if not 1 <= len(gsis) <= 255:
        raise ValueError("an extended interrupt descriptor lists 1 to 255 interrupts")
    flags = ((_CONSUMER if consumer else 0) | (0 if level else 0x02)
             | (0x04 if active_low else 0) | (0x08 if shared else 0))
    body = struct.pack("<BB", flags, len(gsis)) + b"".join(struct.pack("<I", g) for g in gsis)
    return struct.pack("<BH", EXTENDED_INTERRUPT_TAG, len(body)) + body


def _address(tag: int, fmt: str, kind: int, type_flags: int, minimum: int, maximum: int) -> bytes:
    """A producer's address space descriptor: fixed minimum and maximum, positive
    decode, granularity and translation 0."""
    if maximum < minimum:
        raise ValueError(f"address range {minimum:#x}-{maximum:#x} is empty")
    body = struct.pack("<BBB", kind, _MIN_FIXED | _MAX_FIXED, type_flags) + struct.pack(
        "<" + fmt * 5, 0, minimum, maximum, 0, maximum - minimum + 1
    )
    return struct.pack("<BH", tag, len(body)) + body


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """``WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, minimum,
    maximum, 0, length)``."""
    return _address(WORD_ADDRESS_TAG, "H", RESOURCE_BUS_NUMBER, 0, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    """``WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)``."""
    return _address(WORD_ADDRESS_TAG, "H", RESOURCE_IO, _IO_ENTIRE_RANGE, minimum, maximum)


def _memory_flags(cacheable: bool, writable: bool) -> int:
    return (_MEM_CACHEABLE if cacheable else 0) | (_MEM_READ_WRITE if writable else 0)


def dword_memory(minimum: int, maximum: int, *, cacheable: bool = False,
                 writable: bool = True) -> bytes:
    """``DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable|
    NonCacheable, ReadWrite|ReadOnly, 0, minimum, maximum, 0, length)``."""
    return _address(DWORD_ADDRESS_TAG, "I", RESOURCE_MEMORY,
                    _memory_flags(cacheable, writable), minimum, maximum)


def qword_memory(minimum: int, maximum: int, *, cacheable: bool = False,
                 writable: bool = True) -> bytes:
    """``QWordMemory (...)``, as :func:`dword_memory` with 64-bit addresses."""
    return _address(QWORD_ADDRESS_TAG, "Q", RESOURCE_MEMORY,
                    _memory_flags(cacheable, writable), minimum, maximum)
