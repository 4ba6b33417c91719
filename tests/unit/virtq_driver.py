# SPDX-License-Identifier: BSD-2-Clause
"""A tiny virtio "guest driver" for tests: it lays out one split virtqueue in guest
RAM, makes buffers available as direct or indirect chains, decides whether to notify
the device as a driver must, and reads used elements back."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs

from hvf.memory import GuestMemory
from hvf.plugins.virtio.queue import (
    DESC_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    QueueState,
    avail_ring_bytes,
    desc_table_bytes,
)

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
PAGE = 4096


@attrs.frozen
class Used:
    """A used element as the driver reads it: the head, the length the device wrote
    and that many bytes from the chain's device-writable buffers."""

    head: int
    length: int
    data: bytes


@attrs.define
class _Posted:
    descriptors: list[int]  # main-table indices
    slots: list[int]  # buffer (and indirect table) slots
    writable: list[tuple[int, int]]  # (gpa, length) of the device-writable buffers


class VirtqDriver:
    """One queue of ``size`` entries at ``base`` (descriptor table, then the available
    ring, then the used ring), buffers in ``slots`` slots of ``slot_size`` bytes after
    it. Ring indices start at ``start`` (near 65535 to test wrap-around)."""

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool = False,
                 start: int = 0, base: int = 0x10000, slot_size: int = PAGE,
                 slots: int | None = None) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.desc_addr = base
        self.avail_addr = base + desc_table_bytes(size)
        self.used_addr = -(-(self.avail_addr + avail_ring_bytes(size)) // 4) * 4
        self.slot_size = slot_size
        self.slot_base = -(-(self.used_addr + 6 + 8 * size) // PAGE) * PAGE
        self._free_slots = list(range((slots or 4 * size) - 1, -1, -1))
        self._free_descriptors = list(range(size - 1, -1, -1))
        self._posted: dict[int, _Posted] = {}
        self.start = start
        self.avail_idx = start
        self.used_seen = start
        #: Whether the last :meth:`add` had to notify the device.
        self.notify = False
        self._write16(self.avail_addr, 0)  # flags
        self._write16(self.avail_addr + 2, start)
        self._write16(self.avail_addr + 4 + 2 * size, start)  # used_event: the first one
        self._write16(self.used_addr, 0)
        self._write16(self.used_addr + 2, start)
        self._write16(self.used_addr + 4 + 8 * size, start)

    def state(self) -> QueueState:
        """The transport state as this driver enabled the queue (at :attr:`start`)."""
        return QueueState(size=self.size, ready=True, desc_addr=self.desc_addr,
                          avail_addr=self.avail_addr, used_addr=self.used_addr,
                          next_avail=self.start, next_used=self.start)

    def can_add(self, buffers: int, *, indirect: bool = False) -> bool:
        descriptors = 1 if indirect else buffers
        slots = buffers + indirect
        return (0 < buffers <= self.size and len(self._free_descriptors) >= descriptors
                and len(self._free_slots) >= slots)

    def add(self, readable: Sequence[bytes], writable: Sequence[int], *,
            indirect: bool = False) -> int:
        """Make a chain available: buffers holding ``readable``, then device-writable
        buffers of the ``writable`` lengths; return its head. :attr:`notify` says
        whether the device must now be notified."""
        count = len(readable) + len(writable)
        assert self.can_add(count, indirect=indirect)
        slots = [self._free_slots.pop() for _ in range(count + indirect)]
        buffers: list[tuple[int, int, int]] = []  # (gpa, length, flags)
        for i, slot in enumerate(slots[:count]):
            gpa = self._slot_addr(slot)
            if i < len(readable):
                assert len(readable[i]) <= self.slot_size
                self.memory.write(gpa, readable[i])
                buffers.append((gpa, len(readable[i]), 0))
            else:
                length = writable[i - len(readable)]
                assert length <= self.slot_size
                buffers.append((gpa, length, VIRTQ_DESC_F_WRITE))
        if indirect:
            table = self._slot_addr(slots[-1])
            assert DESC_SIZE * count <= self.slot_size
            for i, (gpa, length, flags) in enumerate(buffers):
                more = VIRTQ_DESC_F_NEXT if i + 1 < count else 0
                self.write_descriptor(table + DESC_SIZE * i, gpa, length, flags | more, i + 1)
            descriptors = [self._free_descriptors.pop()]
            self.write_descriptor(self.desc_gpa(descriptors[0]), table, DESC_SIZE * count,
                             VIRTQ_DESC_F_INDIRECT, 0)
        else:
            descriptors = [self._free_descriptors.pop() for _ in range(count)]
            for i, (gpa, length, flags) in enumerate(buffers):
                last = i + 1 == count
                self.write_descriptor(self.desc_gpa(descriptors[i]), gpa, length,
                                 flags | (0 if last else VIRTQ_DESC_F_NEXT),
                                 0 if last else descriptors[i + 1])
        head = descriptors[0]
        self._posted[head] = _Posted(descriptors, slots, [(g, n) for g, n, f in buffers if f])
        self.publish(head)
        return head

    def used(self) -> list[Used]:
        """The used elements the device added since the last call, in order; their
        descriptors and buffers are free again."""
        found = []
        used_idx = self._read16(self.used_addr + 2)
        while self.used_seen != used_idx:
            slot = self.used_seen % self.size
            head, length = _USED_ELEM.unpack(self.memory.read(self.used_addr + 4 + 8 * slot, 8))
            posted = self._posted.pop(head)
            data = b"".join(self.memory.read(g, n) for g, n in posted.writable)[:length]
            found.append(Used(head, length, data))
            self._free_descriptors.extend(posted.descriptors)
            self._free_slots.extend(posted.slots)
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return found

    def set_used_event(self, value: int) -> None:
        """EVENT_IDX: ask for an interrupt once the used index passes ``value``."""
        self._write16(self.avail_addr + 4 + 2 * self.size, value)

    def set_interrupts(self, enabled: bool) -> None:
        """Without EVENT_IDX: clear or set VIRTQ_AVAIL_F_NO_INTERRUPT."""
        self._write16(self.avail_addr, 0 if enabled else VIRTQ_AVAIL_F_NO_INTERRUPT)

    def used_event(self) -> int:
        return self._read16(self.avail_addr + 4 + 2 * self.size)

    def interrupts_enabled(self) -> bool:
        return not self._read16(self.avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and advance its index (:meth:`add` does;
        tests call it for chains they wrote by hand)."""
        old = self.avail_idx
        self._write16(self.avail_addr + 4 + 2 * (old % self.size), head)
        self.avail_idx = (old + 1) & 0xFFFF
        self._write16(self.avail_addr + 2, self.avail_idx)
        if self.event_idx:
            avail_event = self._read16(self.used_addr + 4 + 8 * self.size)
            # The device asked to hear once the entry at avail_event is written.
            self.notify = (avail_event - old) & 0xFFFF < (self.avail_idx - old) & 0xFFFF
        else:
            self.notify = not self._read16(self.used_addr) & VIRTQ_USED_F_NO_NOTIFY

    def desc_gpa(self, index: int) -> int:
        return self.desc_addr + DESC_SIZE * index

    def _slot_addr(self, slot: int) -> int:
        return self.slot_base + slot * self.slot_size

    def write_descriptor(self, gpa: int, addr: int, length: int, flags: int,
                         next_index: int) -> None:
        """Write one descriptor at ``gpa`` (in the table, :meth:`desc_gpa`, or elsewhere)."""
        self.memory.write(gpa, _DESC.pack(addr, length, flags, next_index))

    def _write16(self, gpa: int, value: int) -> None:
        self.memory.write(gpa, _U16.pack(value))

    def _read16(self, gpa: int) -> int:
        return _U16.unpack(self.memory.read(gpa, 2))[0]
