# SPDX-License-Identifier: BSD-2-Clause
"""Guest RAM: one file laid out as a PC, with bounds-checked guest-physical access.

RAM below :data:`LOWMEM_LIMIT` starts at guest address 0; whatever does not fit below
the PCI hole is mapped from 4 GiB up. Both pieces are windows onto one mapping laid out
as a single file (anonymous memory, a memfd or a snapshot's RAM file), so a snapshot
backend can write or map the whole of guest RAM as one file.
"""

from __future__ import annotations

import mmap
import os
import re
import resource
from collections.abc import Iterator
from typing import Any

import attrs

from hvf import extents
from hvf._kvm import ffi
from hvf.errors import ConfigError, GuestMemoryError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

PAGE_SHIFT = 12

#: Top of low RAM: the 32-bit PCI window begins here (bhyve's lowmem limit).
LOWMEM_LIMIT = 0xC000_0000
#: Where RAM above the PCI hole begins.
HIGHMEM_BASE = 4 * GiB

#: Conventional memory ends at the EBDA; 0xF0000-0xFFFFF is the BIOS area.
EBDA_BASE = 0x9FC00
BIOS_BASE = 0xF0000
E820_RAM = 1
E820_RESERVED = 2

#: <sys/mman.h> (Linux), which Python 3.11's mmap lacks: no commit charge for the whole
#: size up front, as for a memfd's pages (guest RAM is sparse; it may exceed host RAM).
MAP_NORESERVE = 0x4000


def _mlock(addr: int, length: int) -> None:
    """``mlock(2)``: fault the range in and keep it out of swap (libc through cffi's
    ABI mode, declared here: parsing a declaration costs every start-up otherwise)."""
    from cffi import FFI

    libc_ffi = FFI()
    libc_ffi.cdef("int mlock(const void *addr, size_t len);")
    libc: Any = libc_ffi.dlopen(None)
    if libc.mlock(libc_ffi.cast("void *", addr), length) != 0:
        raise OSError(libc_ffi.errno, os.strerror(libc_ffi.errno))


def _wire_error(size: int, e: OSError) -> str:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else describe_size(soft)
    return (f"-S: cannot wire {describe_size(size)} of guest memory ({e.strerror}): "
            f"RLIMIT_MEMLOCK is {limit} (raise it with 'ulimit -l' or the memlock limit "
            "in limits.conf, or run without -S)")

TiB = 1024 * GiB
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*([kKmMgGtT]?)[bB]?\s*$")
_SUFFIX = {"k": KiB, "m": MiB, "g": GiB, "t": TiB}


def is_memsize(text: str) -> bool:
    """Whether ``text`` has the form of a memory size (``-m``), whatever its value."""
    return _SIZE_RE.match(text) is not None


def parse_size(text: str) -> int:
    """A bhyve memory size in bytes: ``512M``, ``2G``, ``65536K``; a bare number below
    1 MiB counts MiB and from 1 MiB on bytes (bhyverun.c ``vm_parse_memsize``), so
    ``1024`` is 1 GiB and ``268435456`` is 256 MiB. Guest RAM is at least 1 MiB, in
    whole host pages."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"invalid memsize '{text}'")
    number, suffix = int(m.group(1), 0), m.group(2).lower()
    if suffix:
        size = number * _SUFFIX[suffix]
    else:
        size = number * MiB if number < MiB else number
    if size < MiB:
        raise ConfigError(f"invalid memsize '{text}': out of range (at least 1 MiB)")
    if size % mmap.PAGESIZE:
        raise ConfigError(f"invalid memsize '{text}': not a multiple of "
                          f"{describe_size(mmap.PAGESIZE)}")
    return size


def describe_size(size: int) -> str:
    """``size`` bytes for people: ``16 MiB``, ``976.6 TiB``."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit:
            return f"{size // unit} {name}" if size % unit == 0 else f"{size / unit:.1f} {name}"
    return f"{size} bytes"


@attrs.frozen
class Region:
    """A contiguous piece of guest RAM: guest-physical base, size, file offset."""

    guest_base: int
    size: int
    file_offset: int

    @property
    def guest_end(self) -> int:
        return self.guest_base + self.size


def pc_layout(size: int) -> tuple[Region, ...]:
    """Split ``size`` bytes of RAM around the PCI hole below 4 GiB."""
    low = min(size, LOWMEM_LIMIT)
    regions = [Region(0, low, 0)]
    if size > low:
        regions.append(Region(HIGHMEM_BASE, size - low, low))
    return tuple(regions)


class GuestMemory:
    """Guest RAM: new anonymous memory with transparent huge pages asked for
    (``MADV_HUGEPAGE``, as QEMU's and cloud-hypervisor's guest RAM: the host and KVM
    map it in 2 MiB pages where the host allows), or a snapshot's RAM file
    (``ram_file``, an open descriptor this object takes over) mapped copy-on-write, so
    that pages load from the file on first touch and the file is never modified. With
    ``shared``, RAM is a new memfd mapped shared (a snapshot's RAM file loaded into it),
    so that other processes can map it too: vhost-user back ends, and another hvf
    process taking the guest over (``hvf ctl migrate --local``). ``wired`` locks it in
    host memory (``-S``, ``mlock``); ``in_core`` keeps it in core dumps (``-C``). With
    ``adopt``, ``ram_file`` is the memfd of a guest handed over by another hvf process,
    mapped shared as it is."""

    def __init__(self, size: int, ram_file: int | None = None, *, shared: bool = False,
                 wired: bool = False, in_core: bool = False, adopt: bool = False) -> None:
        if size % mmap.PAGESIZE:
            raise ConfigError(f"memory size {size} is not a multiple of the page size")
        self.size = size
        self.regions = pc_layout(size)
        #: Whether :attr:`map` is a private (copy-on-write) mapping of :attr:`fd`.
        self.private = ram_file is not None and not shared and not adopt
        #: Pages hvf itself wrote (one byte each) while a migration tracks them, else None.
        self.written: bytearray | None = None
        #: Long-lived views devices write (rings), by owner: file offset and length.
        self.rings: dict[object, tuple[int, int]] = {}
        #: Whether RAM is anonymous memory (no file: ``fd`` is -1).
        self.anonymous = ram_file is None and not shared
        new_file = not self.anonymous and (ram_file is None or (shared and not adopt))
        self.fd = -1
        self._closed = False
        try:
            if self.anonymous:
                self.map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                     | MAP_NORESERVE)
                self.map.madvise(mmap.MADV_HUGEPAGE)
            else:
                self.fd = (os.memfd_create("hvf-guest-ram", os.MFD_CLOEXEC) if new_file
                           else ram_file)
                if new_file:
                    os.ftruncate(self.fd, size)
                self.map = mmap.mmap(self.fd, size, mmap.MAP_PRIVATE if self.private else
                                     mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError) as e:
            if self.fd >= 0:
                os.close(self.fd)
            if ram_file is not None and new_file:
                os.close(ram_file)
            reason = e.strerror if isinstance(e, OSError) else "too large"
            raise ConfigError(
                f"-m: cannot map {describe_size(size)} of guest memory ({reason}); "
                "memory.size must be at least 1 MiB and fit in this host's address space "
                "and memory") from None
        self.view = memoryview(self.map)
        self.host_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.map)))
        if not in_core:  # as bhyve, guest RAM stays out of core dumps unless -C
            self.map.madvise(mmap.MADV_DONTDUMP)
        if ram_file is not None and new_file:
            self._load(ram_file)
        if wired:
            self._wire()

    def _wire(self) -> None:
        """Lock guest RAM into host memory (``-S``), or close it and say why not."""
        host_ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if self.size > host_ram:  # mlock would try, with CAP_IPC_LOCK, until the OOM killer
            self.close()
            raise ConfigError(f"-S: cannot wire {describe_size(self.size)} of guest memory: "
                              f"the host has {describe_size(host_ram)} of RAM")
        try:
            _mlock(self.host_addr, self.size)
        except OSError as e:
            self.close()
            raise ConfigError(_wire_error(self.size, e)) from None

    def _load(self, ram_file: int) -> None:
        """Copy the data of a snapshot's RAM file (holes stay holes) and close it."""
        try:
            for start, end in extents.file_extents(ram_file, self.size):
                while start < end:
                    done = os.preadv(ram_file, [self.view[start:end]], start)
                    if done <= 0:
                        raise GuestMemoryError(f"the RAM file ends at {start:#x}, before "
                                               f"{self.size:#x}")
                    start += done
        finally:
            os.close(ram_file)

    @property
    def shareable(self) -> bool:
        """Whether other processes can map this RAM as the guest sees it (a memfd
        mapped shared: :attr:`fd`)."""
        return not self.anonymous and not self.private

    def close(self) -> None:
        """Unmap guest RAM and close its file (again: nothing). Call it once no vCPU
        runs; a view of it still held elsewhere keeps the mapping until it goes."""
        if self._closed:
            return
        self._closed = True
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """Page-aligned ``(start, end)`` offsets, sorted, outside of which guest RAM
        is zero (see :mod:`hvf.extents`): the pages anonymous RAM holds, or a file's
        data (and a copy-on-write mapping's private pages)."""
        if self.anonymous:
            return iter(extents.private_extents(self.host_addr, self.size))
        in_file = extents.file_extents(self.fd, self.size)
        if not self.private:
            return in_file
        return extents.union(in_file, extents.private_extents(self.host_addr, self.size))

    @property
    def lowmem_size(self) -> int:
        return self.regions[0].size

    @property
    def highmem_size(self) -> int:
        return self.regions[1].size if len(self.regions) > 1 else 0

    def _offset(self, gpa: int, length: int) -> int:
        """The file offset of [gpa, gpa+length), which must lie inside one region."""
        for r in self.regions:
            if r.guest_base <= gpa and gpa + length <= r.guest_end:
                return r.file_offset + gpa - r.guest_base
        raise GuestMemoryError(
            f"guest-physical range {gpa:#x}..{gpa + length:#x} is not inside guest RAM"
        )

    def e820(self) -> list[tuple[int, int, int]]:
        """The PC memory map as (base, length, type) entries."""
        low = self.lowmem_size
        entries = [(0, min(low, EBDA_BASE), E820_RAM)]
        if low > EBDA_BASE:
            entries.append((EBDA_BASE, 0xA0000 - EBDA_BASE, E820_RESERVED))
        entries.append((BIOS_BASE, 0x100000 - BIOS_BASE, E820_RESERVED))
        if low > MiB:
            entries.append((MiB, low - MiB, E820_RAM))
        if self.highmem_size:
            entries.append((HIGHMEM_BASE, self.highmem_size, E820_RAM))
        return entries

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.guest_base <= gpa and gpa + length <= r.guest_end for r in self.regions)

    def note_written(self, offset: int, length: int) -> None:
        """Record that hvf wrote [offset, offset+length) of the RAM file's layout (KVM's
        dirty log sees only the guest's writes); nothing unless :attr:`written` is set."""
        written = self.written
        if written is not None and length > 0:
            first, end = offset >> PAGE_SHIFT, ((offset + length - 1) >> PAGE_SHIFT) + 1
            written[first:end] = b"\1" * (end - first)

    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        return bytes(self.view[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = self._offset(gpa, len(data))
        self.view[off : off + len(data)] = data
        self.note_written(off, len(data))

    def slice(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM (no copy)."""
        off = self._offset(gpa, length)
        self.note_written(off, length)
        return self.view[off : off + length]

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))
