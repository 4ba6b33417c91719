# SPDX-License-Identifier: BSD-2-Clause
"""The queue machinery of the NVMe controller: doorbells, taking commands, posting
completions and interrupts, the table of queues and the commands in flight.

Threads. A vCPU only stores registers: a doorbell write records the tail or head and
signals the queue's eventfd, and the machine's I/O thread takes the commands (in
turn, one per queue per round) and runs them; I/O ends on the block back end's worker
threads, which post its completion and raise the queue's MSI-X vector through its
irqfd (or drive INTx while MSI-X is off). With Doorbell Buffer Config the I/O queues'
doorbells become KVM ioeventfds: the write never leaves the kernel, and the I/O
thread reads the tail or head from the host's shadow page. One lock guards it all.

A completion queue that is full holds further completions back, and the submission
queues posting to it are not read until there is room; ``ioslots`` bounds the I/O
commands on the back end. An invalid doorbell write (no such queue, a value beyond its
size) is ignored and reported as an error event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from hvf.plugins.nvme.queues import CompletionQueue, DoorbellBuffers, SubmissionQueue
from hvf.plugins.nvme.spec import (
    ABORTED_SQ_DELETION,
    DOORBELL_STRIDE,
    DOORBELLS,
    EVENT_INVALID_DOORBELL,
    EVENT_INVALID_DOORBELL_VALUE,
    SUCCESS,
    Command,
)
from hvf.plugins.pci import Bar, MsixCapability, PciDevice

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.ioevent import IoEvent
    from hvf.plugins.nvme.io import Request

Result = tuple[int, int]  # status, completion dword 0


class QueueEngine(PciDevice):
    """Queues and doorbells for ``vectors`` queue pairs (the admin pair included). A
    controller subclasses it, sets :attr:`bar` and :attr:`msix`, and provides
    :attr:`running`, :meth:`execute` and :meth:`doorbell_error`."""

    bar: Bar
    msix: MsixCapability

    def __init__(self, name: str, *, vectors: int, ioslots: int) -> None:
        super().__init__(name)
        self.lock = threading.RLock()
        self.vectors = vectors
        self.ioslots = ioslots
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.buffers: DoorbellBuffers | None = None
        #: Bumped by every reset: a completion of an older generation is dropped.
        self.generation = 0
        #: Commands on the back end (and a shutdown's flush).
        self.io_in_flight = 0
        self._when_idle: list[Callable[[], None]] = []
        self._starved = False
        #: INTMS: bit 0 masks INTx.
        self.intms = 0
        self._doorbells_end = DOORBELLS + 2 * DOORBELL_STRIDE * vectors
        self.sq_doorbells: list[IoEvent] = []
        self.cq_doorbells: list[IoEvent] = []
        self.commands = 0
        self.doorbell_exits = 0
        self.msix_interrupts = 0
        self.intx_interrupts = 0

    # ---- what the controller provides ----

    @property
    def running(self) -> bool:
        """Whether commands are taken."""
        raise NotImplementedError

    def execute(self, sq: SubmissionQueue, cmd: Command) -> Result | None:
        """Run ``cmd``: its status and dword 0, or None when it completes later."""
        raise NotImplementedError

    def doorbell_error(self, info: int) -> None:
        """A doorbell write was invalid (``EVENT_INVALID_DOORBELL*``)."""
        raise NotImplementedError

    # ---- attaching ----

    def attach_doorbells(self, ctx: DeviceContext) -> None:
        """One eventfd per doorbell, each waking the I/O thread."""
        self.ctx = ctx
        self.sq_doorbells = [ctx.ioevent(DOORBELL_STRIDE) for _ in range(self.vectors)]
        self.cq_doorbells = [ctx.ioevent(DOORBELL_STRIDE) for _ in range(self.vectors)]
        for qid in range(self.vectors):
            ctx.loop.add_reader(self.sq_doorbells[qid].fd, lambda q=qid: self._sq_rung(q))
            ctx.loop.add_reader(self.cq_doorbells[qid].fd, lambda q=qid: self._cq_rung(q))

    def bar_decoding_changed(self, bar: Bar) -> None:
        self._update_doorbells()

    def _update_doorbells(self) -> None:
        """Bind the I/O queues' doorbells as ioeventfds where the BAR decodes them (with
        doorbell buffers only: a shadowed value is all the device needs)."""
        r = self.bar.range
        base = self.bar.address + DOORBELLS if r is not None and r.mapped else None
        for qid in range(1, self.vectors):
            for queues, doorbells, slot in ((self.sqs, self.sq_doorbells, 0),
                                            (self.cqs, self.cq_doorbells, 1)):
                address = None
                if base is not None and self.buffers is not None and qid in queues:
                    address = base + (2 * qid + slot) * DOORBELL_STRIDE
                doorbells[qid].bind(address)

    # ---- doorbells ----

    def _doorbell_written(self, index: int, value: int) -> None:
        """A doorbell write that reached the vCPU loop (always for the admin queue)."""
        qid = index >> 1
        if not self.running:
            return
        queue = (self.cqs if index & 1 else self.sqs).get(qid)
        if queue is None:
            self.doorbell_error(EVENT_INVALID_DOORBELL)
        elif isinstance(queue, CompletionQueue):
            if not self._doorbell_value(queue.set_head, qid, value):
                return
            if self.buffers is not None and not qid:
                self.buffers.set_cq_head(0, value)
            if self._cq_moved(queue):
                self.ctx.loop.call_soon(self._work)
        else:
            if not self._doorbell_value(queue.set_tail, qid, value):
                return
            if self.buffers is not None and not qid:
                self.buffers.set_sq_tail(0, value)
            self.sq_doorbells[qid].signal()

    def _doorbell_value(self, store: Callable[[int], bool], qid: int, value: int) -> bool:
        """Take a doorbell value (an I/O queue's is in the shadow page once there are
        doorbell buffers); an out-of-range value is an error event."""
        if self.buffers is not None and qid:
            return True
        if store(value):
            return True
        self.doorbell_error(EVENT_INVALID_DOORBELL_VALUE)
        return False

    def _sq_rung(self, qid: int) -> None:
        """I/O thread: a submission queue's doorbell (an eventfd)."""
        self.sq_doorbells[qid].consume()
        self._work()

    def _cq_rung(self, qid: int) -> None:
        """I/O thread: a completion queue's doorbell (an ioeventfd, doorbell buffers)."""
        self.cq_doorbells[qid].consume()
        with self.lock:
            cq = self.cqs.get(qid)
            if cq is not None and self._cq_moved(cq):
                self._run_queues()

    def _cq_moved(self, cq: CompletionQueue) -> bool:
        """The host consumed completions: post those waiting for room. True when that
        unblocked the submission queues posting here."""
        if self.buffers is not None and cq.qid:
            cq.set_head(self.buffers.cq_head(cq.qid))
        blocked = bool(cq.pending)
        posted = False
        while cq.pending and not cq.full(self.buffers):
            cq.post(*cq.pending.popleft())
            posted = True
        if posted:
            self._interrupt(cq)
        else:
            self._update_intx()
        return blocked and not cq.pending

    def _work(self) -> None:
        with self.lock:
            self._run_queues()

    def _run_queues(self) -> None:
        """Take commands from every submission queue in turn (I/O thread, lock held)."""
        busy = self.running
        while busy:
            busy = False
            for sq in tuple(self.sqs.values()):
                if self.sqs.get(sq.qid) is not sq or sq.deleting is not None or sq.cq.pending:
                    continue  # deleted in this round, being deleted, or its CQ is full
                if sq.qid and self.io_in_flight >= self.ioslots:
                    self._starved = True
                    continue
                cmd = sq.fetch(self.buffers)
                if cmd is None:
                    continue
                busy = True
                self.commands += 1
                result = self.execute(sq, cmd)
                if result is not None:
                    self.complete(sq, cmd.cid, *result)

    # ---- completions and interrupts (lock held) ----

    def complete(self, sq: SubmissionQueue, cid: int, status: int, dw0: int = 0) -> None:
        """Post a completion of ``cid`` from ``sq`` (or hold it while the queue is full)."""
        cq = sq.cq
        entry = (dw0, sq.head | sq.qid << 16, cid | status << 17)
        if cq.pending or cq.full(self.buffers):
            cq.pending.append(entry)
            return
        cq.post(*entry)
        self._interrupt(cq)

    def _interrupt(self, cq: CompletionQueue) -> None:
        if not cq.interrupts:
            return
        if self.msix.enabled:
            self.msix_interrupts += 1
            self.msix.trigger(cq.vector)
        else:
            self._update_intx()

    def _update_intx(self) -> None:
        """INTx is high while MSI-X is off, INTMS bit 0 clear and a queue that
        interrupts holds completions the host has not consumed."""
        level = False
        if not self.msix.enabled and not self.intms & 1:
            for cq in self.cqs.values():
                if self.buffers is not None and cq.qid:
                    cq.set_head(self.buffers.cq_head(cq.qid))
                level = level or (cq.interrupts and cq.unread)
        if level != self.intx_level:
            self.intx_interrupts += level
            self.set_intx(level)

    # ---- the queue table and the commands in flight (lock held) ----

    def add_cq(self, cq: CompletionQueue) -> None:
        self.cqs[cq.qid] = cq
        self._update_doorbells()

    def add_sq(self, sq: SubmissionQueue) -> None:
        self.sqs[sq.qid] = sq
        sq.cq.sqs += 1
        self._update_doorbells()

    def remove_cq(self, cq: CompletionQueue) -> None:
        del self.cqs[cq.qid]
        self._update_doorbells()
        self._update_intx()

    def delete_sq(self, sq: SubmissionQueue, cid: int) -> tuple[int, int] | None:
        """Delete ``sq`` now, or (None) once its commands in flight complete, each as
        aborted."""
        if sq.in_flight:
            sq.deleting = cid
            return None
        self._remove_sq(sq)
        return SUCCESS, 0

    def _remove_sq(self, sq: SubmissionQueue) -> None:
        del self.sqs[sq.qid]
        sq.cq.sqs -= 1
        self._update_doorbells()

    def use_doorbell_buffers(self, buffers: DoorbellBuffers) -> None:
        buffers.set_sq_tail(0, self.sqs[0].tail)
        buffers.set_cq_head(0, self.cqs[0].head)
        self.buffers = buffers
        self._update_doorbells()

    def started(self, sq: SubmissionQueue) -> None:
        sq.in_flight += 1
        self.io_in_flight += 1

    def finished(self, request: Request) -> None:
        """The back end is done with ``request`` (a worker thread, lock held)."""
        sq = request.sq
        sq.in_flight -= 1
        if request.generation == self.generation:
            if sq.deleting is None:
                self.complete(sq, request.cid, request.status)
            else:
                self.complete(sq, request.cid, ABORTED_SQ_DELETION)
                if not sq.in_flight:
                    cid, sq.deleting = sq.deleting, None
                    self._remove_sq(sq)
                    self.complete(self.sqs[0], cid, SUCCESS)
            if self._starved:
                self._starved = False
                self.ctx.loop.call_soon(self._work)
        self._retire()

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (lock held) once nothing is in flight on the back end."""
        if self.io_in_flight:
            self._when_idle.append(callback)
        else:
            callback()

    def _retire(self) -> None:
        """One command (or flush) left the back end."""
        self.io_in_flight -= 1
        while not self.io_in_flight and self._when_idle:
            self._when_idle.pop(0)()

    def close_doorbells(self) -> None:
        for doorbell in (*self.sq_doorbells, *self.cq_doorbells):
            self.ctx.loop.remove_reader(doorbell.fd)
            doorbell.close()
