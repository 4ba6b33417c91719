# SPDX-License-Identifier: BSD-2-Clause
"""The receive side of one virtio-net queue pair (I/O thread, device lock held).

Frames go from the back end straight into the guest's buffers (one ``readv``) when
the chains taken from the receive ring hold the largest frame that can arrive: with
VIRTIO_NET_F_MRG_RXBUF any number of chains together, without it the first chain
alone. Chains taken but not filled wait in a small stash for the next frame. When
the guest has posted less than that, one frame is read into a bounce buffer and
copied once enough room is posted; when it has posted nothing, the device stops
reading the back end (which then holds or drops frames: bounded memory) and asks for
a notification, which resumes it. So a frame is never lost while the guest has
buffers posted. Frames the guest cannot take (over its MTU or its buffers) and frames
the receive filter refuses are dropped and counted.

On a back end with a frame descriptor (a tap) the C data path (:mod:`.fastpath`)
takes frames in batches while no frame or chain waits here and the guest has posted
room for the largest frame; whatever else happens is this module's.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from hvf.dma import write_views
from hvf.errors import VirtqueueError
from hvf.plugins.net import fastpath
from hvf.plugins.net.frames import patch, peek, skip
from hvf.plugins.net.spec import (
    ETH_HEADER,
    F_GUEST_CSUM,
    HEADER_SIZE,
    MAX_GSO_FRAME,
    NUM_BUFFERS_OFFSET,
)

if TYPE_CHECKING:
    from hvf.plugins.net.device import VirtioNet
    from hvf.plugins.virtio.queue import Chain, SplitQueue

#: Frames taken per call before the I/O thread serves others.
RX_BATCH = 64
#: Views per readv at most (the kernel's IOV_MAX).
IOV_MAX = 1024


class RxQueue:
    """Receive queue ``2 * pair`` and the back end's descriptor for that pair."""

    def __init__(self, device: VirtioNet, pair: int) -> None:
        self.device = device
        self.pair = pair
        self.index = 2 * pair
        self.stash: deque[Chain] = deque()
        self.stash_room = 0
        self._owner: SplitQueue | None = None
        self.bounce = bytearray(HEADER_SIZE + MAX_GSO_FRAME)
        #: Bytes of a frame waiting in :attr:`bounce` for room (0: none).
        self.pending = 0
        #: Whether the back end's descriptor is watched.
        self.reading = False
        #: Whether the guest's buffers ran out (counted once until it posts more).
        self.starved = False

    # ---- the I/O thread's entry points ----

    def readable(self) -> None:
        with self.device.lock:
            try:
                self.run()
            except VirtqueueError as e:  # as on a doorbell: the device stops
                self.device.needs_reset(str(e))

    def run(self) -> None:
        """Move frames to the guest until the back end or the guest's buffers run out."""
        device = self.device
        queue = device.queues[self.index]
        if queue is None or not device.receiving(self.pair):
            self._watch(False)
            return
        if queue is not self._owner:
            self.forget()
            self._owner = queue
        queue.disable_notifications()
        path = device.path
        delivered = 0
        try:
            budget = RX_BATCH
            while budget > 0:
                if path is not None and not self.pending and not self.stash:
                    status, taken = self._receive_batch(path, queue, budget)
                    if taken:
                        delivered += taken
                        budget -= taken
                        self.starved = False
                    if status == fastpath.EMPTY:
                        self._watch(True)
                        return
                    if status == fastpath.LIMIT:
                        continue
                budget -= 1
                step = self._step(queue)
                if step is None:  # the back end has nothing more
                    self._watch(True)
                    return
                if step:
                    delivered += 1
                    self.starved = False
                    continue
                if queue.enable_notifications():  # the guest posted meanwhile
                    queue.disable_notifications()
                    continue
                if not self.starved:
                    self.starved = True
                    device.counters.rx_no_buffers += 1
                self._watch(False)  # wait for the guest's notification
                return
            self._watch(True)
        finally:
            if delivered:
                device.interrupt_queue(self.index)

    def _receive_batch(self, path: fastpath.NetPath, queue: SplitQueue,
                       limit: int) -> tuple[int, int]:
        """Frames the C data path took, up to ``limit``: (its status, frames delivered
        or dropped)."""
        device = self.device
        status, done = path.receive(self.index, queue, device.backend.fileno(self.pair), limit,
                                    device)
        counters = device.counters
        counters.rx_frames += done.frames
        counters.rx_bytes += done.bytes
        counters.rx_oversize += done.oversize
        counters.rx_filtered += done.filtered
        return status, done.frames + done.oversize + done.filtered

    # ---- one frame ----

    def _step(self, queue: SplitQueue) -> bool | None:
        """Take one frame: True when one was delivered or dropped, False when the guest
        lacks room (the frame, if read, waits), None when the back end has none."""
        device = self.device
        if not self.pending:
            if self._fill(queue, device.rx_limit):
                views = self._views()
                n = self._read(views)
                if n is None:
                    return None
                self._complete(queue, views, n)
                return True
            if not self.stash:
                return False
            n = self._read([memoryview(self.bounce)])
            if n is None:
                return None
            self.pending = n
        n, self.pending = self.pending, 0
        frame = memoryview(self.bounce)[:n]
        if n > device.rx_limit:
            device.counters.rx_oversize += 1
            return True
        if not self._wanted([frame], n):
            return True
        if not self._fill(queue, n):
            if self.device.merge or not self.stash:
                self.pending = n  # wait for more buffers
                return False
            device.counters.rx_oversize += 1  # larger than the one chain it may use
            return True
        views = self._views()
        write_views(views, frame)
        self._complete(queue, views, n)
        return True

    def _read(self, views: list[memoryview]) -> int | None:
        """One frame from the back end into ``views`` (header first), or None."""
        device = self.device
        backend = device.backend
        try:
            if backend.vnet_header:
                return backend.receive(self.pair, views)
            n = backend.receive(self.pair, skip(views, HEADER_SIZE))
            patch(views, 0, bytes(HEADER_SIZE))
            return n + HEADER_SIZE
        except BlockingIOError:
            return None

    def _complete(self, queue: SplitQueue, views: list[memoryview], n: int) -> None:
        """A frame of ``n`` bytes (header included) is in ``views``: hand the chains it
        fills to the guest, or drop it."""
        device = self.device
        room = sum(len(v) for v in views)
        if n > room or n > device.rx_limit:
            device.counters.rx_oversize += 1
            return
        if not self._wanted(views, n):
            return
        if not device.negotiated & F_GUEST_CSUM:
            patch(views, 0, b"\0")  # the kernel's DATA_VALID is for GUEST_CSUM drivers
        left, chains = n, []
        while left > 0:
            chain = self.stash.popleft()
            self.stash_room -= chain.writable_length
            chains.append((chain, min(left, chain.writable_length)))
            left -= chains[-1][1]
        patch(views, NUM_BUFFERS_OFFSET, len(chains).to_bytes(2, "little"))
        for chain, length in chains:
            queue.push(chain, length)
        device.counters.rx_frames += 1
        device.counters.rx_bytes += n - HEADER_SIZE

    def _wanted(self, views: list[memoryview], n: int) -> bool:
        device = self.device
        if n < HEADER_SIZE + ETH_HEADER:
            device.counters.rx_oversize += 1  # a runt: nothing to deliver
            return False
        if not device.net.rx_filter.accepts(peek(views, HEADER_SIZE, 6), device.net.mac):
            device.counters.rx_filtered += 1
            return False
        return True

    # ---- the stash of chains taken ----

    def _room(self) -> int:
        if not self.stash:
            return 0
        return self.stash_room if self.device.merge else self.stash[0].writable_length

    def _fill(self, queue: SplitQueue, need: int) -> bool:
        """Take chains until they hold ``need`` bytes; False when they cannot yet."""
        merge = self.device.merge
        while self._room() < need:
            if self.stash and not merge:
                return False
            chain = queue.pop()
            if chain is None:
                return False
            if chain.writable_length < HEADER_SIZE:
                self.device.counters.rx_bad_buffers += 1
                queue.push(chain, 0)
                continue
            self.stash.append(chain)
            self.stash_room += chain.writable_length
        return True

    def _views(self) -> list[memoryview]:
        if not self.device.merge:
            return list(self.stash[0].writable[:IOV_MAX])
        views: list[memoryview] = []
        for chain in self.stash:
            views += chain.writable
            if len(views) >= IOV_MAX:
                return views[:IOV_MAX]
        return views

    def rewind(self) -> None:
        """Give the stashed chains back to the available ring (before a save)."""
        queue = self.device.queues[self.index]
        if queue is self._owner and queue is not None and self.stash:
            queue.state.next_avail = (queue.state.next_avail - len(self.stash)) & 0xFFFF
        self.stash.clear()
        self.stash_room = 0

    def forget(self) -> None:
        """Drop the stash (the driver reset the queue or the device)."""
        self.stash.clear()
        self.stash_room = 0
        self._owner = None

    # ---- watching the back end ----

    def _watch(self, on: bool) -> None:
        if on == self.reading:
            return
        loop = self.device.ctx.loop
        fd = self.device.backend.fileno(self.pair)
        if on:
            loop.add_reader(fd, self.readable)
        else:
            loop.remove_reader(fd)
        self.reading = on
