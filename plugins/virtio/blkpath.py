# SPDX-License-Identifier: BSD-2-Clause
"""virtio-blk's reads and writes in C (:mod:`hvf.plugins.virtio._blkpath`): chains
taken on the I/O thread, served by POSIX worker threads that move the data, return the
chain and signal the queue's interrupt without Python or the GIL.

:meth:`BlkPath.serve` starts every request of a queue the C path can do as it stands
and says when the next chain is the Python path's (a flush, discard or ID request, a
request to refuse, a chain the walker refuses: see the build script). While a path
serves a device it owns the used side of each queue: the Python path returns its
chains through :meth:`BlkPath.push`, and :meth:`BlkPath.sync_used` copies the used
positions back into the queues' state for a snapshot (after :meth:`BlkPath.drain`).

Measured with ``python bench/disk/run.py --rows randread:4K:16:64M --devices
virtio-blk`` on the 2-CPU kvm_pvm development host (medians of 3 rounds): see
bench/README.md's ``disk`` section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf.plugins.virtio._blkpath import ffi, lib
from hvf.plugins.virtio.cring import RingRecords

if TYPE_CHECKING:
    from hvf.memory import GuestMemory
    from hvf.plugins.block.image import Image
    from hvf.plugins.virtio.queue import SplitQueue

#: Worker threads per disk: they wait in the kernel, not for the GIL, so more of them
#: keep more direct-I/O requests in flight.
THREADS = 8
MAX_QUEUES = lib.HVF_BLK_MAX_QUEUES


class BlkPath:
    """The C data path of one virtio-blk disk on one guest's RAM."""

    def __init__(self, memory: GuestMemory, image: Image, sectors: int, *,
                 threads: int = THREADS) -> None:
        """Serve ``image`` (``sectors`` of 512 bytes) for the guest in ``memory``."""
        self._memory = memory
        self._records = RingRecords(ffi, memory)
        dio = image.dio
        blk = lib.hvf_blk_new(self._records.ram, image.fd, sectors,
                              image.readonly, dio.memory if dio else 0,
                              dio.offset if dio else 0, threads)
        if blk == ffi.NULL:
            raise OSError(ffi.errno, f"{image.path}: cannot start the disk's I/O threads")
        self._blk = blk
        #: The queue each index was last started for.
        self._queues: dict[int, SplitQueue] = {}
        self._written: bytearray | None = None
        self._written_buffer: Any = None
        self._position = ffi.new("uint16_t *")
        self._stats = ffi.new("struct hvf_blk_stats *")

    def serve(self, index: int, queue: SplitQueue, indirect: bool, irqfd: int) -> bool:
        """Start every request of ``queue`` (index ``index``) C can do, interrupting
        through ``irqfd`` (-1: none); True when the next chain is the Python path's."""
        self._sync_written()
        if self._queues.get(index) is not queue:
            self._start(index, queue, indirect)
        state = queue.state
        position = self._position
        position[0] = state.next_avail
        slow = lib.hvf_blk_serve(self._blk, index, irqfd, position) == lib.HVF_BLK_SLOW
        state.next_avail = position[0]
        return slow

    def push(self, index: int, queue: SplitQueue, head: int, written: int) -> None:
        """Return a chain the Python path served (and interrupt as C does)."""
        if self._blk is not None and self._queues.get(index) is queue:
            lib.hvf_blk_push(self._blk, index, head, written)

    def set_irqfd(self, index: int, irqfd: int) -> None:
        """Signal queue ``index``'s completions through ``irqfd`` from now on (the
        driver moved its interrupt while requests may be in flight)."""
        if self._blk is not None and index in self._queues:
            lib.hvf_blk_set_irqfd(self._blk, index, irqfd)

    def forget_queues(self) -> None:
        """A reset, or a driver that broke the rules: completions of requests taken
        before it are dropped, and each queue's state keeps the used position C had
        reached (a snapshot of a device that needs a reset saves it)."""
        if self._blk is None:
            return
        lib.hvf_blk_clear_queues(self._blk)
        self.sync_used()
        self._queues.clear()

    def drain(self) -> None:
        """Wait until every request C took has completed."""
        if self._blk is not None:
            lib.hvf_blk_drain(self._blk)

    def sync_used(self) -> None:
        """Copy each queue's used position into its state (for a snapshot; drain first)."""
        for index, queue in self._queues.items():
            queue.state.next_used = lib.hvf_blk_next_used(self._blk, index)

    def stats(self) -> dict[str, int]:
        """What C did: requests, bytes, errors, interrupts, requests in flight."""
        if self._blk is None:
            return {}
        lib.hvf_blk_stats(self._blk, self._stats)
        s = self._stats
        return {"reads": s.reads, "writes": s.writes, "bytes_read": s.bytes_read,
                "bytes_written": s.bytes_written, "io_errors": s.io_errors,
                "interrupts": s.interrupts, "in_flight": s.in_flight}

    def close(self) -> None:
        """Drain and stop the threads; a second call does nothing."""
        if self._blk is not None:
            lib.hvf_blk_free(self._blk)
            self._blk = None

    def _start(self, index: int, queue: SplitQueue, indirect: bool) -> None:
        if index >= MAX_QUEUES:
            raise ValueError(f"queue {index}: the C path serves {MAX_QUEUES} queues")
        ring = self._records.ring(index, queue, indirect)
        ring.next_avail, ring.next_used = queue.state.next_avail, queue.state.next_used
        lib.hvf_blk_set_queue(self._blk, index, ring, queue.event_idx)
        self._queues[index] = queue

    def _sync_written(self) -> None:
        """Point C at the RAM file's written-page marks when a migration starts or stops
        keeping them (the old buffer is let go only once C no longer uses it)."""
        written = self._memory.written
        if written is self._written:
            return
        if written is None:
            buffer, pointer, pages = None, ffi.NULL, 0
        else:
            buffer = ffi.from_buffer(written)
            pointer, pages = ffi.cast("uint8_t *", buffer), len(written)
        lib.hvf_blk_set_written(self._blk, pointer, pages)
        self._written, self._written_buffer = written, buffer
