# SPDX-License-Identifier: BSD-2-Clause
"""The guest's side of an NVMe controller, for driving one from the host side in tests
and in the benchmark (``python -m hvf.plugins.nvme.bench``).

:class:`NvmeDriver` does what a host driver does, through the buses' MMIO handlers
(:mod:`hvf.testing.fakes`) and guest RAM: it enables the controller with an admin
queue, creates I/O queues, builds PRP lists, rings doorbells and reaps completions by
their phase tag. Completions are waited for by polling guest RAM, or on an eventfd
the caller names for a vector (an MSI-X irqfd of the fake machine).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from hvf.iowait import readable
from hvf.memory import GuestMemory
from hvf.plugins.pci import CAP_ID_MSIX
from hvf.plugins.nvme.spec import (
    ADMIN_CREATE_CQ,
    ADMIN_CREATE_SQ,
    ADMIN_DOORBELL_BUFFER_CONFIG,
    CC_EN,
    CQE_SIZE,
    CQES_LOG,
    CSTS_RDY,
    DOORBELLS,
    NSID,
    PAGE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CC,
    REG_CSTS,
    SQE,
    SQE_SIZE,
    SQES_LOG,
)
from hvf.testing.fakes import Buses, cfg_read, cfg_write, mmio_read, mmio_write

_CQE = struct.Struct("<IIHHHH")


class Completion(NamedTuple):
    """A completion queue entry as the host reads it."""

    dw0: int
    sq_head: int
    sqid: int
    cid: int
    status: int  # the 15-bit status field (DNR bit 14)


class _Queue:
    def __init__(self, qid: int, sq: int, cq: int, sq_size: int, cq_size: int) -> None:
        self.qid, self.sq, self.cq = qid, sq, cq
        self.sq_size, self.cq_size = sq_size, cq_size
        self.tail = 0
        self.head = 0
        self.phase = 1
        self.next_cid = 0


class NvmeDriver:
    """One controller's host driver; guest RAM from ``alloc_base`` is its own."""

    def __init__(self, vm: Buses, memory: GuestMemory, bdf: tuple[int, int, int], *,
                 alloc_base: int = 0x100000,
                 vector_fd: Callable[[int], int] | None = None) -> None:
        self.vm = vm
        self.memory = memory
        self.bdf = bdf
        self.bar = (cfg_read(vm, bdf, 0x10, 4) & ~0xF) | cfg_read(vm, bdf, 0x14, 4) << 32
        self.vector_fd = vector_fd
        self._next = alloc_base
        self.queues: dict[int, _Queue] = {}
        #: Doorbell buffers (:meth:`use_doorbell_buffers`): the shadow and EventIdx pages.
        self.shadow = self.eventidx = 0
        cfg_write(vm, bdf, 0x04, 2, cfg_read(vm, bdf, 0x04, 2) | 0x6)  # memory, bus master

    # ---- memory and registers ----

    def alloc(self, size: int, align: int = PAGE) -> int:
        """``size`` zeroed bytes of guest RAM."""
        gpa = -(-self._next // align) * align
        self._next = gpa + size
        self.memory.write(gpa, bytes(size))
        return gpa

    def read(self, offset: int, size: int = 4) -> int:
        return mmio_read(self.vm, self.bar + offset, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        mmio_write(self.vm, self.bar + offset, size, value)

    def wait_ready(self, ready: bool, timeout: float = 5.0) -> int:
        """Wait for CSTS.RDY to read ``ready``; returns CSTS."""
        deadline = time.monotonic() + timeout
        while bool((csts := self.read(REG_CSTS)) & CSTS_RDY) != ready:
            if time.monotonic() > deadline:
                raise TimeoutError(f"CSTS.RDY never became {int(ready)} (CSTS {csts:#x})")
            time.sleep(0.001)
        return csts

    def enable(self, admin_entries: int = 16) -> None:
        """Reset, set up the admin queue and enable (CC.EN) with 64/16-byte entries."""
        self.write(REG_CC, 0)
        self.wait_ready(False)
        sq, cq = self.alloc(admin_entries * SQE_SIZE), self.alloc(admin_entries * CQE_SIZE)
        self.queues = {0: _Queue(0, sq, cq, admin_entries, admin_entries)}
        self.shadow = self.eventidx = 0
        self.write(REG_AQA, (admin_entries - 1) << 16 | admin_entries - 1)
        self.write(REG_ASQ, sq, 8)
        self.write(REG_ACQ, cq, 8)
        self.write(REG_CC, CC_EN | SQES_LOG << 16 | CQES_LOG << 20)
        self.wait_ready(True)

    # ---- commands ----

    def prps(self, gpa: int, length: int) -> tuple[int, int]:
        """PRP1 and PRP2 for a buffer contiguous in guest RAM (a PRP list if needed)."""
        first = PAGE - gpa % PAGE
        if length <= first:
            return gpa, 0
        pages = list(range(gpa + first, gpa + length, PAGE))
        if len(pages) == 1:
            return gpa, pages[0]
        head = page = self.alloc(PAGE)
        while len(pages) > 512:  # the list page's last entry points to the next
            following = self.alloc(PAGE)
            self.memory.write(page, struct.pack("<512Q", *pages[:511], following))
            pages, page = pages[511:], following
        self.memory.write(page, struct.pack(f"<{len(pages)}Q", *pages))
        return gpa, head

    def submit(self, qid: int, opcode: int, *, nsid: int = NSID, prp1: int = 0, prp2: int = 0,
               cdw: tuple[int, ...] = (), flags: int = 0, cid: int | None = None,
               ring: bool = True) -> int:
        """Put a command in queue ``qid`` (and ring its doorbell); returns its CID."""
        q = self.queues[qid]
        if cid is None:
            cid = q.next_cid
            q.next_cid = (q.next_cid + 1) & 0xFFFF
        dwords = (tuple(cdw) + (0,) * 6)[:6]
        self.memory.write(q.sq + q.tail * SQE_SIZE,
                          SQE.pack(opcode, flags, cid, nsid, 0, prp1, prp2, *dwords))
        q.tail = (q.tail + 1) % q.sq_size
        if ring:
            self.ring(qid)
        return cid

    def ring(self, qid: int) -> None:
        self._doorbell(2 * qid, self.queues[qid].tail)

    def _doorbell(self, index: int, value: int) -> None:
        """Ring doorbell ``index``; with doorbell buffers an I/O queue's value goes to
        the shadow page, and the register is written only when the controller's
        EventIdx asks for it (as Linux decides)."""
        if self.shadow and index > 1:
            slot = 4 * index
            old = self.memory.read_u32(self.shadow + slot)
            self.memory.write_u32(self.shadow + slot, value)
            event = self.memory.read_u32(self.eventidx + slot)
            if (value - event - 1) & 0xFFFF >= (value - old) & 0xFFFF:
                return
        self.write(DOORBELLS + 4 * index, value)

    def use_doorbell_buffers(self) -> int:
        """Doorbell Buffer Config with new shadow and EventIdx pages; its status."""
        shadow, eventidx = self.alloc(PAGE), self.alloc(PAGE)
        status = self.admin(ADMIN_DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=eventidx).status
        if status == 0:
            self.shadow, self.eventidx = shadow, eventidx
        return status

    def poll(self, qid: int) -> Completion | None:
        """The next completion of queue ``qid`` if there is one (its head is rung)."""
        q = self.queues[qid]
        dw0, _, sq_head, sqid, cid, status = _CQE.unpack(
            self.memory.read(q.cq + q.head * CQE_SIZE, CQE_SIZE))
        if status & 1 != q.phase:
            return None
        q.head += 1
        if q.head == q.cq_size:
            q.head, q.phase = 0, q.phase ^ 1
        self._doorbell(2 * qid + 1, q.head)
        return Completion(dw0, sq_head, sqid, cid, status >> 1)

    def wait(self, qid: int, count: int = 1, timeout: float = 10.0,
             vector: int | None = None) -> list[Completion]:
        """The next ``count`` completions of queue ``qid``."""
        found: list[Completion] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            entry = self.poll(qid)
            if entry is not None:
                found.append(entry)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {qid}: {len(found)} of {count} completions")
            if vector is not None and self.vector_fd is not None:
                fd = self.vector_fd(vector)
                if readable([fd], min(left, 0.05)):
                    os.eventfd_read(fd)  # the interrupt, taken
            else:
                time.sleep(0.0002)
        return found

    def command(self, qid: int, opcode: int, **fields: object) -> Completion:
        """Submit one command and wait for its completion."""
        cid = self.submit(qid, opcode, **fields)  # type: ignore[arg-type]
        (entry,) = self.wait(qid)
        assert entry.cid == cid, (entry, cid)
        return entry

    def admin(self, opcode: int, **fields: object) -> Completion:
        return self.command(0, opcode, **fields)

    def enable_msix(self) -> None:
        """Turn MSI-X on with every vector unmasked (on the fake machine each vector's
        eventfd then counts its interrupts)."""
        pointer = cfg_read(self.vm, self.bdf, 0x34, 1)
        while cfg_read(self.vm, self.bdf, pointer, 1) != CAP_ID_MSIX:
            pointer = cfg_read(self.vm, self.bdf, pointer + 1, 1)
        count = (cfg_read(self.vm, self.bdf, pointer + 2, 2) & 0x7FF) + 1
        table = cfg_read(self.vm, self.bdf, pointer + 4, 4) & ~7  # in BAR 0
        for vector in range(count):
            entry = table + 16 * vector
            for offset, value in ((0, 0xFEE0_0000), (4, 0), (8, 0x40 + vector), (12, 0)):
                self.write(entry + offset, value)
        cfg_write(self.vm, self.bdf, pointer + 2, 2, 1 << 15)

    def create_queue_pair(self, qid: int, size: int = 64, *, cq_size: int | None = None,
                          vector: int | None = None) -> None:
        """Create I/O completion queue ``qid`` (interrupting on ``vector``, if given)
        then submission queue ``qid`` onto it."""
        cq_size = cq_size or size
        sq, cq = self.alloc(size * SQE_SIZE), self.alloc(cq_size * CQE_SIZE)
        flags = 1 | (2 | vector << 16 if vector is not None else 0)
        entry = self.admin(ADMIN_CREATE_CQ, prp1=cq, cdw=((cq_size - 1) << 16 | qid, flags))
        assert entry.status == 0, entry
        entry = self.admin(ADMIN_CREATE_SQ, prp1=sq, cdw=((size - 1) << 16 | qid, qid << 16 | 1))
        assert entry.status == 0, entry
        self.queues[qid] = _Queue(qid, sq, cq, size, cq_size)
