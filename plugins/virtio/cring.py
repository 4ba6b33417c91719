# SPDX-License-Identifier: BSD-2-Clause
"""Virtqueues served in C: guest RAM and rings as :file:`vring.h`'s records, and the
transmit path that writes a queue's output to a host descriptor.

:class:`RingRecords` is what every C data path shares (virtio-net's included): the
RAM regions as ``struct hvf_vq_ram`` and each queue's rings as ``struct hvf_vq_ring``,
made with the cffi module's own ``ffi``. The ring positions live in the queue's state
as before: a caller copies them in before a C call and back after it, so the C and
Python paths take turns on a queue.

:class:`TxPath` drives :c:func:`hvf_vq_tx` (:mod:`hvf.plugins.virtio._vring`) for a
device whose transmit chains are a byte stream to a host descriptor (virtio-console).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf.plugins.virtio._vring import ffi, lib
from hvf.plugins.virtio.queue import avail_ring_bytes, desc_table_bytes, used_ring_bytes

if TYPE_CHECKING:
    from hvf.memory import GuestMemory
    from hvf.plugins.virtio.queue import SplitQueue

#: What :meth:`TxPath.transmit` reports: the ring has no chain; it did as many chains
#: as asked; the next chain is the Python path's; the descriptor took part of a
#: batch (or nothing); the ``writev`` failed (nothing of its batch was taken).
EMPTY = lib.HVF_VQ_EMPTY
LIMIT = lib.HVF_VQ_LIMIT
SLOW = lib.HVF_VQ_SLOW
BLOCKED = lib.HVF_VQ_BLOCKED
ERROR = lib.HVF_VQ_ERROR


class RingRecords:
    """One guest's RAM and the rings of one device's queues as C records of ``ffi``
    (a cffi module that declares :file:`vring.h`'s records)."""

    def __init__(self, ffi: Any, memory: GuestMemory) -> None:
        self._ffi = ffi
        self._memory = memory
        self.ram = ram = ffi.new("struct hvf_vq_ram *")
        #: The region buffers C points into (they keep guest RAM mapped).
        self._windows: list[Any] = []
        for i, region in enumerate(memory.regions):
            window = ffi.from_buffer(
                memory.view[region.file_offset : region.file_offset + region.size])
            self._windows.append(window)
            ram.base[i] = region.guest_base
            ram.size[i] = region.size
            ram.host[i] = ffi.cast("uint8_t *", window)
            ram.file_offset[i] = region.file_offset
        ram.nregions = len(memory.regions)
        self._written: bytearray | None = None
        self._written_buffer: Any = None
        #: Per queue index: the SplitQueue its ring record was made for, and the record.
        self._rings: dict[int, tuple[SplitQueue, Any]] = {}

    def ring(self, index: int, queue: SplitQueue, indirect: bool) -> Any:
        """The record of queue ``index`` (made again when the queue is a new one: the
        driver's features are settled for a queue's life)."""
        known = self._rings.get(index)
        if known is not None and known[0] is queue:
            return known[1]
        state = queue.state
        size = state.size
        ring = self._ffi.new("struct hvf_vq_ring *")
        # The queue checked these lie inside guest RAM when it was made.
        ring.desc = self._host(state.desc_addr, desc_table_bytes(size))
        ring.avail = self._host(state.avail_addr, avail_ring_bytes(size))
        ring.used = self._host(state.used_addr, used_ring_bytes(size))
        ring.size = size
        ring.indirect = indirect
        self._rings[index] = (queue, ring)
        return ring

    def known_ring(self, index: int, queue: SplitQueue) -> Any | None:
        """The record made for this very queue, or None."""
        known = self._rings.get(index)
        return known[1] if known is not None and known[0] is queue else None

    def sync_written(self) -> None:
        """Point C at the RAM file's written-page marks, when a migration or an
        incremental checkpoint has started or stopped keeping them."""
        written = self._memory.written
        if written is self._written:
            return
        self._written = written
        ram = self.ram
        if written is None:
            self._written_buffer = None
            ram.written = self._ffi.NULL
            ram.written_pages = 0
        else:
            self._written_buffer = self._ffi.from_buffer(written)
            ram.written = self._ffi.cast("uint8_t *", self._written_buffer)
            ram.written_pages = len(written)

    def _host(self, gpa: int, length: int) -> Any:
        ram = self.ram
        for i in range(ram.nregions):
            base, size = ram.base[i], ram.size[i]
            if base <= gpa and gpa + length <= base + size:
                return ram.host[i] + (gpa - base)
        raise ValueError(f"ring at {gpa:#x} length {length:#x} is not inside guest RAM")


class TxPath:
    """Transmit queues of one device written to host descriptors in C."""

    def __init__(self, memory: GuestMemory) -> None:
        self._records = RingRecords(ffi, memory)
        self._args = ffi.new("struct hvf_vq_tx_args *")

    def transmit(self, index: int, queue: SplitQueue, indirect: bool, fd: int,
                 batch_bytes: int, limit: int) -> tuple[int, int, int, int]:
        """Write up to ``limit`` chains of ``queue`` to ``fd``, a ``writev`` per
        ``batch_bytes`` or so: (status, chains returned, bytes the host took, and on
        BLOCKED how many of those belong to the next chain, which is left in the
        ring; on ERROR the errno)."""
        ring = self._records.ring(index, queue, indirect)
        args = self._args
        args.batch_bytes = batch_bytes
        state = queue.state
        ring.next_avail, ring.next_used = state.next_avail, state.next_used
        status = lib.hvf_vq_tx(self._records.ram, ring, fd, args, limit)
        state.next_avail, state.next_used = ring.next_avail, ring.next_used
        detail = args.error if status == ERROR else args.offset
        return status, args.chains, args.bytes, detail
