# SPDX-License-Identifier: BSD-2-Clause
"""Multiboot (version 1) loading: ELF32 kernels or the header's load addresses.

The boot information (memory map, command line, module list) is written at
:data:`INFO_BASE`, and the boot vCPU enters in 32-bit protected mode with
EAX = 0x2BADB002 and EBX pointing at it, as the Multiboot specification requires.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import attrs

from hvf.errors import LoaderError
from hvf.loader.x86 import enter_protected_mode
from hvf.memory import EBDA_BASE, MiB

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

#: Boot information area: [INFO_BASE, INFO_END).
INFO_BASE = 0x9000
INFO_END = 0x9F000
LOADER_NAME = b"hvf\0"


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
    if addr < INFO_END and addr + size > INFO_BASE:
        raise LoaderError(
            f"{what} at {addr:#x}+{size:#x} overlaps the boot information area "
            f"{INFO_BASE:#x}-{INFO_END:#x}"
        )
    if not vm.memory.contains(addr, size):
        raise LoaderError(f"{what} at {addr:#x}+{size:#x} does not fit in guest RAM")


class _InfoWriter:
    """Bump allocator over the boot information area."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.next = INFO_BASE

    def put(self, data: bytes, align: int = 8) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + len(data) > INFO_END:
            raise LoaderError(
                "the multiboot information (command line, module strings, memory map) "
                f"does not fit in {INFO_END - INFO_BASE} bytes"
            )
        self.vm.memory.write(addr, data)
        self.next = addr + len(data)
        return addr


def load(
    vm: Machine, image: bytes, header: Header, *, path: str, modules: str | None, cmdline: str
) -> None:
    """Load a multiboot kernel and its modules and prepare the boot vCPU."""
    unsupported = header.flags & 0xFFFF & ~SUPPORTED_REQUIRED
    if unsupported & FLAG_VIDEO_MODE:
        raise LoaderError(f"'{path}' requires a video mode, which hvf does not provide")
    if unsupported:
        raise LoaderError(f"'{path}' requires unsupported multiboot features {unsupported:#x}")
    if header.flags & FLAG_ADDRESSES:
        entry, _low, high = _load_addresses(vm, image, header, path)
    else:
        entry, _low, high = _load_elf(vm, image, path)

    info = _InfoWriter(vm)
    mbi = info.put(bytes(88), align=4)
    flags = INFO_MEM | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME
    cmdline_addr = info.put(cmdline.encode() + b"\0", align=1)
    name_addr = info.put(LOADER_NAME, align=1)

    mods = [m.strip() for m in (modules or "").split(",") if m.strip()]
    module_entries = b""
    next_load = (high + 0xFFF) & ~0xFFF
    for spec in mods:
        mod_path = spec.split()[0]
        from hvf.loader import read_image

        data = read_image(mod_path, "multiboot module")
        _check_placement(vm, next_load, max(len(data), 1), f"module '{mod_path}'")
        vm.memory.write(next_load, data)
        string = info.put(spec.encode() + b"\0", align=1)
        module_entries += struct.pack("<4I", next_load, next_load + len(data), string, 0)
        next_load = (next_load + len(data) + 0xFFF) & ~0xFFF
    mods_addr = info.put(module_entries, align=4) if module_entries else 0
    if mods:
        flags |= INFO_MODS

    mmap = b"".join(struct.pack("<IQQI", 20, b, n, t) for b, n, t in vm.memory.e820())
    mmap_addr = info.put(mmap, align=4)

    mem_lower = min(vm.memory.lowmem_size, EBDA_BASE) // 1024
    mem_upper = max(vm.memory.lowmem_size - MiB, 0) // 1024
    fields = struct.pack(
        "<12I",
        flags, mem_lower, mem_upper, 0, cmdline_addr, len(mods), mods_addr,
        0, 0, 0, 0, len(mmap),
    )
    vm.memory.write(mbi, fields + struct.pack("<I", mmap_addr))
    vm.memory.write(mbi + 64, struct.pack("<I", name_addr))
    enter_protected_mode(vm.vcpus[0].fd, vm.memory, entry, eax=BOOTLOADER_MAGIC, ebx=mbi)
