# SPDX-License-Identifier: BSD-2-Clause
"""Bounds-checked DMA into guest RAM, for device models and their back-end threads.

A device is handed guest-physical addresses and lengths by an untrusted guest.
:class:`GuestDma` turns them into views of guest RAM (no copy) only when they lie
wholly inside one RAM region, and raises :class:`~hvf.errors.GuestMemoryError` naming
the address and length otherwise: a range that runs past the end of RAM, into the PCI
hole, past 2^64 or has a negative length never reaches memory. Lists of segments
(scatter/gather lists) are checked in full, and against a caller-given cap on their
total length, before any byte moves.

The module-level helpers copy between views already checked (a virtqueue chain's) and
caller buffers; multi-byte fields are little-endian, as virtio's are.

Ordering: device threads and vCPUs share guest RAM with no lock. On x86 (TSO) stores
become visible in program order and loads are not reordered with older loads, so only
a store followed by a load of another location needs :func:`memory_fence`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from hvf.errors import GuestMemoryError
from hvf.memory import GuestMemory

Buffer = bytes | bytearray | memoryview

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# An uncontended lock's acquire and release are locked read-modify-write instructions
# (sem_trywait/sem_post), each a full barrier on x86.
_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier: earlier stores are visible before later loads are done."""
    _fence_lock.acquire()
    _fence_lock.release()


class Segment(NamedTuple):
    """One guest-physical buffer of a scatter/gather list (a plain tuple, cheap to
    build and unpack; any ``(gpa, length)`` pair will do where a segment is taken)."""

    gpa: int
    length: int


def _outside(gpa: int, length: int) -> GuestMemoryError:
    return GuestMemoryError(
        f"DMA to guest-physical {gpa:#x} length {length:#x} is not inside guest RAM"
    )


class GuestDma:
    """Bounds-checked access to the RAM of one :class:`~hvf.memory.GuestMemory`.

    Safe to use from any thread. The views it hands out keep guest RAM mapped while
    they live, even past :meth:`GuestMemory.close`.
    """

    __slots__ = ("_memory", "_windows")

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        #: (guest base, guest end, view of the region, its file offset) for each region.
        self._windows = tuple(
            (r.guest_base, r.guest_end, memory.view[r.file_offset : r.file_offset + r.size],
             r.file_offset)
            for r in memory.regions
        )

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length) (no copy). While a migration tracks
        what hvf writes, its pages count as written (it may be written any time until
        the VM pauses)."""
        if length >= 0:
            for base, end, window, file_offset in self._windows:
                if base <= gpa and gpa + length <= end:
                    offset = gpa - base
                    if self._memory.written is not None:
                        self._memory.note_written(file_offset + offset, length)
                    return window[offset : offset + length]
        raise _outside(gpa, length)

    def ring(self, gpa: int, length: int, owner: object) -> memoryview:
        """:meth:`view` for a view the device keeps and writes for long (a ring): a
        migration resends its pages when the VM stops. ``owner`` (hashable, unique to
        this ring of this device: the device's and the queue's names, say) replaces
        the ring it had before."""
        view = self.view(gpa, length)
        for base, end, _window, file_offset in self._windows:
            if base <= gpa and gpa + length <= end:
                self._memory.rings[owner] = (file_offset + gpa - base, length)
        return view

    def views(self, segments: Iterable[tuple[int, int]], *, limit: int) -> list[memoryview]:
        """Views of every segment, in order; all are checked, and their total length
        must not exceed ``limit`` bytes."""
        result = []
        total = 0
        for gpa, length in segments:
            result.append(self.view(gpa, length))
            total += length
            if total > limit:
                raise GuestMemoryError(
                    f"DMA list reaching guest-physical {gpa:#x} length {length:#x} "
                    f"is longer than {limit:#x} bytes in total"
                )
        return result

    def gather(self, segments: Iterable[tuple[int, int]], *, limit: int) -> bytes:
        """A copy of the bytes of every segment, concatenated."""
        return b"".join(self.views(segments, limit=limit))

    def gather_into(self, segments: Iterable[tuple[int, int]], buffer: bytearray | memoryview,
                    *, limit: int) -> int:
        """Copy the segments' bytes into ``buffer`` until either side ends; return how
        many were copied."""
        return read_views_into(self.views(segments, limit=limit), buffer)

    def scatter(self, segments: Iterable[tuple[int, int]], data: Buffer, *, limit: int) -> int:
        """Copy ``data`` into the segments in order until either side ends; return how
        many bytes were written. Nothing is written unless every segment is valid."""
        return write_views(self.views(segments, limit=limit), data)

    def read_u16(self, gpa: int) -> int:
        """The little-endian u16 at ``gpa``."""
        return _U16.unpack_from(self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        """The little-endian u32 at ``gpa``."""
        return _U32.unpack_from(self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        """The little-endian u64 at ``gpa``."""
        return _U64.unpack_from(self.view(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        """Store ``value`` as a little-endian u16 at ``gpa``."""
        _U16.pack_into(self.view(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        """Store ``value`` as a little-endian u32 at ``gpa``."""
        _U32.pack_into(self.view(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        """Store ``value`` as a little-endian u64 at ``gpa``."""
        _U64.pack_into(self.view(gpa, 8), 0, value)


def read_views_into(views: Sequence[memoryview], buffer: bytearray | memoryview) -> int:
    """Copy from ``views`` in order into ``buffer`` until either side ends; return how
    many bytes were copied."""
    out = memoryview(buffer).cast("B")
    room = len(out)
    done = 0
    for view in views:
        if done == room:
            break
        count = min(len(view), room - done)
        out[done : done + count] = view[:count]
        done += count
    return done


def write_views(views: Sequence[memoryview], data: Buffer) -> int:
    """Copy ``data`` into ``views`` in order until either side ends; return how many
    bytes were written."""
    source = memoryview(data).cast("B")
    total = len(source)
    done = 0
    for view in views:
        if done == total:
            break
        count = min(len(view), total - done)
        view[:count] = source[done : done + count]
        done += count
    return done
