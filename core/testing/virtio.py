# SPDX-License-Identifier: BSD-2-Clause
"""The guest's side of virtio, for driving a virtio device's registers from the host
side in tests.

:class:`VirtqDriver` is a tiny driver for one split virtqueue in guest RAM: it makes
buffers available as direct or indirect chains, decides whether to notify the device
as a driver must, and reads used elements back. :class:`Driver` is the guest's view of
one virtio-pci function (capabilities, then the common configuration's registers),
through :mod:`hvf.testing.fakes`' accesses.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs

from hvf.memory import GuestMemory
from hvf.plugins.pci import CAP_ID_MSIX
from hvf.plugins.virtio.pci import CAP_VENDOR, CFG_COMMON, CFG_NOTIFY
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
from hvf.plugins.virtio.spec import ACKNOWLEDGE, DRIVER, FEATURES_OK, NO_VECTOR
from hvf.testing.fakes import Buses, cfg_read, mmio_read, mmio_write

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

    def add_raw(self, descriptors: Sequence[tuple[int, int, int, int]],
                data: bytes = b"") -> int | None:
        """Make a chain written by hand available, as a hostile driver may: each
        (address, length, flags, next) from a free descriptor on, the first pointing at
        ``data`` (in the first buffer slot) when given and its address lies in RAM.
        Its descriptors stay taken. Returns its head, or None when none is free."""
        if not self._free_descriptors:
            return None
        head = self._free_descriptors.pop()
        self.memory.write(self.slot_base, data)
        for i, (addr, length, flags, next_index) in enumerate(descriptors):
            if i == 0 and addr < self.memory.size and data:
                addr, length = self.slot_base, len(data)
            self.write_descriptor(self.desc_gpa((head + i) % self.size), addr, length, flags,
                                  next_index)
        self.publish(head)
        return head

    def used_elements(self) -> list[tuple[int, int, bytes | None]]:
        """As :meth:`used`, chains written by hand included: (head, length, and the
        data of a chain :meth:`add` made, else None)."""
        found: list[tuple[int, int, bytes | None]] = []
        used_idx = self._read16(self.used_addr + 2)
        while self.used_seen != used_idx:
            slot = self.used_seen % self.size
            head, length = _USED_ELEM.unpack(self.memory.read(self.used_addr + 4 + 8 * slot, 8))
            posted = self._posted.pop(head, None)
            data = None
            if posted is not None:
                data = b"".join(self.memory.read(g, n) for g, n in posted.writable)[:length]
                self._free_descriptors.extend(posted.descriptors)
                self._free_slots.extend(posted.slots)
            found.append((head, length, data))
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


#: Common configuration register offsets (virtio 1.x, 4.1.4.3).
DFSELECT, DF, GFSELECT, GF, MSIX_CONFIG, NUM_QUEUES, STATUS, GENERATION = (
    0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15)
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOTIFY_OFF, Q_DESC, Q_DRIVER, Q_DEVICE = (
    0x16, 0x18, 0x1A, 0x1C, 0x1E, 0x20, 0x28, 0x30)


class Driver:
    """The guest's view of one virtio-pci function: capabilities, then registers."""

    def __init__(self, vm: Buses, bdf: tuple[int, int, int]) -> None:
        self.vm = vm
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (bar, offset, cap)
        pointer = cfg_read(vm, bdf, 0x34, 1)
        while pointer:
            cap_id = cfg_read(vm, bdf, pointer, 1)
            if cap_id == CAP_VENDOR:
                cfg_type, bar = cfg_read(vm, bdf, pointer + 3, 1), cfg_read(vm, bdf, pointer + 4, 1)
                self.caps[cfg_type] = (bar, cfg_read(vm, bdf, pointer + 8, 4), pointer)
            elif cap_id == CAP_ID_MSIX:
                self.msix_cap = pointer
            pointer = cfg_read(vm, bdf, pointer + 1, 1)
        self.bdf = bdf
        bar = self.caps[CFG_COMMON][0]
        self.bar = (cfg_read(vm, bdf, 0x10 + 4 * bar, 4) & ~0xF) | cfg_read(
            vm, bdf, 0x14 + 4 * bar, 4) << 32
        self.multiplier = cfg_read(vm, bdf, self.caps[CFG_NOTIFY][2] + 16, 4)

    def addr(self, cfg_type: int, offset: int) -> int:
        """The guest-physical address of ``offset`` in the ``cfg_type`` structure."""
        return self.bar + self.caps[cfg_type][1] + offset

    def read(self, offset: int, size: int) -> int:
        """Read a common-configuration register (offsets: ``DFSELECT``, …)."""
        return mmio_read(self.vm, self.addr(CFG_COMMON, offset), size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Write a common-configuration register."""
        mmio_write(self.vm, self.addr(CFG_COMMON, offset), size, value)

    def features(self) -> int:
        """The 64 device feature bits."""
        self.write(DFSELECT, 4, 0)
        low = self.read(DF, 4)
        self.write(DFSELECT, 4, 1)
        return low | self.read(DF, 4) << 32

    def negotiate(self, features: int) -> int:
        """Reset, then acknowledge, offer ``features`` and set FEATURES_OK; the device
        status read back (FEATURES_OK stays set if the device took them)."""
        self.write(STATUS, 1, 0)
        self.write(STATUS, 1, ACKNOWLEDGE | DRIVER)
        for half in (0, 1):
            self.write(GFSELECT, 4, half)
            self.write(GF, 4, features >> (32 * half) & 0xFFFFFFFF)
        self.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        return self.read(STATUS, 1)

    def setup_queue(self, index: int, queue: VirtqDriver, vector: int = NO_VECTOR) -> None:
        """Give queue ``index`` the rings of ``queue`` and the MSI-X ``vector``; enable it."""
        self.write(Q_SELECT, 2, index)
        self.write(Q_SIZE, 2, queue.size)
        self.write(Q_MSIX, 2, vector)
        for offset, value in ((Q_DESC, queue.desc_addr), (Q_DRIVER, queue.avail_addr),
                              (Q_DEVICE, queue.used_addr)):
            self.write(offset, 4, value & 0xFFFFFFFF)  # in halves, as 32-bit drivers do
            self.write(offset + 4, 4, value >> 32)
        self.write(Q_ENABLE, 2, 1)

    def kick(self, index: int) -> None:
        """Notify queue ``index`` at its doorbell."""
        self.write(Q_SELECT, 2, index)
        off = self.read(Q_NOTIFY_OFF, 2)
        mmio_write(self.vm, self.addr(CFG_NOTIFY, off * self.multiplier), 2, index)
