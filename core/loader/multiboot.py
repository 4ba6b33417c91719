# SPDX-License-Identifier: BSD-2-Clause
"""Multiboot (version 1) loading: ELF32 kernels or the header's load addresses.

As GRUB and QEMU do it: modules are loaded page-aligned after the kernel, and the boot
information (the MBI, the command line ``PATH ARGS``, module strings and list, memory
map) after the last of them, each at the first place in the memory map's RAM where it
fits. The ACPI tables are installed as for Linux (an RSDP in the BIOS area, found by the
usual scan). The boot vCPU enters in 32-bit protected mode with EAX = 0x2BADB002 and
EBX pointing at the MBI, as the Multiboot specification requires.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import attrs

from hvf.acpi import build_for
from hvf.acpi.builder import INSTALL_BASE, INSTALL_LIMIT
from hvf.errors import LoaderError
from hvf.loader.x86 import BOOT_GDT_ADDR, enter_protected_mode
from hvf.memory import E820_RAM, EBDA_BASE, GiB, MiB

if TYPE_CHECKING:
    from hvf.vm import Machine

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH = 8192

FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_ADDRESSES = 1 << 16
SUPPORTED_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO  # bits 0-15 are "required"

INFO_MEM = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9

MBI_SIZE = 88
MBI_LOADER_NAME = 64
LOADER_NAME = b"hvf\0"
PAGE = 4096

#: What hvf itself puts in guest RAM, which loaded images must leave alone.
RESERVED = (
    ("the boot GDT", BOOT_GDT_ADDR, BOOT_GDT_ADDR + 32),
    ("the ACPI tables", INSTALL_BASE, INSTALL_LIMIT),
)


@attrs.frozen
class Header:
    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(image: bytes) -> Header | None:
    """The multiboot header in the first 8 KiB of ``image``, or None."""
    limit = min(len(image), HEADER_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & FLAG_ADDRESSES:
                if off + 32 > len(image):
                    return None
                return Header(off, flags, *struct.unpack_from("<5I", image, off + 12))
            return Header(off, flags)
    return None


def _load_elf(vm: Machine, image: bytes, path: str) -> tuple[int, int, int]:
    """Copy PT_LOAD segments to their physical addresses; (entry, low, high)."""
    if image[:4] != b"\x7fELF":
        raise LoaderError(f"'{path}': multiboot header without load addresses, and not ELF")
    if image[4] != 1 or image[5] != 1:
        raise LoaderError(f"'{path}': only little-endian ELF32 multiboot kernels are supported")
    e_machine, = struct.unpack_from("<H", image, 18)
    if e_machine != 3:
        raise LoaderError(f"'{path}': ELF machine {e_machine} is not i386")
    entry, phoff = struct.unpack_from("<II", image, 24)
    phentsize, phnum = struct.unpack_from("<HH", image, 42)
    low, high = 1 << 64, 0
    for i in range(phnum):
        p = phoff + i * phentsize
        if p + 32 > len(image):
            raise LoaderError(f"'{path}': program header {i} is outside the file")
        p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<6I", image, p)
        if p_type != 1 or p_memsz == 0:  # PT_LOAD
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(image):
            raise LoaderError(f"'{path}': segment {i} has inconsistent sizes")
        _check_placement(vm, p_paddr, p_memsz, f"'{path}' segment {i}")
        vm.memory.write(p_paddr, image[p_offset : p_offset + p_filesz])
        vm.memory.write(p_paddr + p_filesz, bytes(p_memsz - p_filesz))
        low, high = min(low, p_paddr), max(high, p_paddr + p_memsz)
    if high == 0:
        raise LoaderError(f"'{path}': no loadable segments")
    return entry, low, high


def _load_addresses(vm: Machine, image: bytes, header: Header, path: str) -> tuple[int, int, int]:
    """The a.out kludge: load the file at the header's addresses."""
    start = header.offset - (header.header_addr - header.load_addr)
    if start < 0 or header.header_addr < header.load_addr:
        raise LoaderError(f"'{path}': multiboot load address is after the header address")
    end = len(image) if header.load_end_addr == 0 else start + header.load_end_addr - header.load_addr
    if end > len(image) or end < start:
        raise LoaderError(f"'{path}': multiboot load_end_addr is beyond the file")
    bss_end = max(header.bss_end_addr, header.load_addr + end - start)
    _check_placement(vm, header.load_addr, bss_end - header.load_addr, f"'{path}'")
    vm.memory.write(header.load_addr, image[start:end])
    vm.memory.write(header.load_addr + end - start, bytes(bss_end - (header.load_addr + end - start)))
    return header.entry_addr, header.load_addr, bss_end


def _check_placement(vm: Machine, addr: int, size: int, what: str) -> None:
    for name, start, end in RESERVED:
        if addr < end and addr + size > start:
            raise LoaderError(f"{what} at {addr:#x}+{size:#x} overlaps {name} at "
                              f"{start:#x}-{end:#x}")
    if not vm.memory.contains(addr, size):
        raise LoaderError(f"{what} at {addr:#x}+{size:#x} does not fit in guest RAM")


def _page_align(value: int) -> int:
    return -(-value // PAGE) * PAGE


def _place(vm: Machine, after: int, size: int, what: str) -> int:
    """The first page-aligned address from ``after`` on where ``size`` bytes lie inside
    one RAM entry of the memory map, below 4 GiB (multiboot addresses are 32-bit)."""
    for base, length, kind in vm.memory.e820():
        addr = _page_align(max(after, base))
        if kind == E820_RAM and addr + size <= min(base + length, 4 * GiB):
            return addr
    raise LoaderError(f"{what} ({size} bytes) does not fit in guest RAM above {after:#x}")


class _InfoLayout:
    """The boot information as one block: the MBI first, then what it points to, at
    offsets from the block's start (its address is chosen once its size is known)."""

    def __init__(self) -> None:
        self.data = bytearray(MBI_SIZE)

    def add(self, data: bytes, align: int = 1) -> int:
        offset = -(-len(self.data) // align) * align
        self.data += bytes(offset - len(self.data)) + data
        return offset


def _load_modules(vm: Machine, specs: list[str], after: int) -> tuple[list[tuple[int, int]], int]:
    """Load each module (``PATH [ARGS]``) page-aligned after ``after``: their
    (start, end) addresses, and the end of the last one."""
    from hvf.loader import read_image

    placed = []
    for spec in specs:
        mod_path = spec.split()[0]
        data = read_image(mod_path, "multiboot module", limit=vm.memory.size)
        start = _place(vm, after, max(len(data), 1), f"module '{mod_path}'")
        vm.memory.write(start, data)
        placed.append((start, start + len(data)))
        after = start + max(len(data), 1)
    return placed, after


def load(
    vm: Machine, image: bytes, header: Header, *, path: str, modules: str | None, cmdline: str
) -> None:
    """Load a multiboot kernel, its modules, the boot information and the ACPI tables,
    and prepare the boot vCPU; the kernel's command line is ``PATH ARGS``."""
    unsupported = header.flags & 0xFFFF & ~SUPPORTED_REQUIRED
    if unsupported & FLAG_VIDEO_MODE:
        raise LoaderError(f"'{path}' requires a video mode, which hvf does not provide")
    if unsupported:
        raise LoaderError(f"'{path}' requires unsupported multiboot features {unsupported:#x}")
    if header.flags & FLAG_ADDRESSES:
        entry, _low, high = _load_addresses(vm, image, header, path)
    else:
        entry, _low, high = _load_elf(vm, image, path)
    build_for(vm).install(vm)

    specs = [m.strip() for m in (modules or "").split(",") if m.strip()]
    placed, end = _load_modules(vm, specs, high)

    info = _InfoLayout()
    flags = INFO_MEM | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME
    kernel_cmdline = f"{path} {cmdline}" if cmdline else path
    cmdline_at = info.add(kernel_cmdline.encode() + b"\0")
    name_at = info.add(LOADER_NAME)
    strings_at = [info.add(spec.encode() + b"\0") for spec in specs]
    mods_at = info.add(bytes(16 * len(specs)), align=4)
    if specs:
        flags |= INFO_MODS
    mmap = b"".join(struct.pack("<IQQI", 20, b, n, t) for b, n, t in vm.memory.e820())
    mmap_at = info.add(mmap, align=4)

    base = _place(vm, end, len(info.data), "the multiboot information")
    entries = b"".join(struct.pack("<4I", start, stop, base + string, 0)
                       for (start, stop), string in zip(placed, strings_at))
    info.data[mods_at : mods_at + len(entries)] = entries
    mem_lower = min(vm.memory.lowmem_size, EBDA_BASE) // 1024
    mem_upper = max(vm.memory.lowmem_size - MiB, 0) // 1024
    struct.pack_into(
        "<13I", info.data, 0,
        flags, mem_lower, mem_upper, 0, base + cmdline_at, len(specs),
        base + mods_at if specs else 0, 0, 0, 0, 0, len(mmap), base + mmap_at,
    )
    struct.pack_into("<I", info.data, MBI_LOADER_NAME, base + name_at)
    vm.memory.write(base, info.data)
    enter_protected_mode(vm.vcpus[0].fd, vm.memory, entry, eax=BOOTLOADER_MAGIC, ebx=base)
