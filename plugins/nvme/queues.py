# SPDX-License-Identifier: BSD-2-Clause
"""Submission and completion queues in guest RAM (NVMe 1.4 §4.1), the shadow doorbells
of Doorbell Buffer Config (§5.7, §7.13), and their saved state.

A queue is physically contiguous: its ring is one view of guest RAM, checked when the
queue is created (or restored), so an index below the queue's size never reaches
outside it. A completion's dwords 0-2 are stored before dword 3, which holds the phase
tag the host polls, so the host never sees a new phase with stale contents (x86 keeps
stores in order).

With doorbell buffers the host keeps each tail and head in the shadow page, and rings
a doorbell only when the controller's EventIdx asks for it: a queue found empty (or a
completion queue found full) publishes what the controller has seen, then looks at
the shadow once more, so no update is missed.
"""

from __future__ import annotations

import struct
from collections import deque

import attrs

from hvf.dma import GuestDma, memory_fence
from hvf.plugins.nvme.spec import CQE_HEAD, CQE_SIZE, CQE_STATUS, PAGE, SQE_SIZE, Command
from hvf.snapshot_api import Fields, check_fields, field_int

_U32 = struct.Struct("<I")
#: More completions than can wait for room (a bound on a snapshot's list, not a limit
#: the controller meets: ioslots, AERs and admin commands are far fewer).
MAX_PENDING = 1 << 16
#: Where queue y's tail (submission) and head (completion) are in a doorbell buffer.
_SQ_SLOT, _CQ_SLOT = 8, 4


class DoorbellBuffers:
    """The host's shadow doorbells and the controller's EventIdx, one page each."""

    def __init__(self, dma: GuestDma, shadow: int, eventidx: int) -> None:
        self.shadow_address = shadow
        self.eventidx_address = eventidx
        self._shadow = dma.view(shadow, PAGE)
        self._eventidx = dma.ring(eventidx, PAGE, ("nvme event index page", eventidx))

    def sq_tail(self, qid: int) -> int:
        return int(_U32.unpack_from(self._shadow, _SQ_SLOT * qid)[0])

    def cq_head(self, qid: int) -> int:
        return int(_U32.unpack_from(self._shadow, _SQ_SLOT * qid + _CQ_SLOT)[0])

    def set_sq_tail(self, qid: int, value: int) -> None:
        _U32.pack_into(self._shadow, _SQ_SLOT * qid, value)

    def set_cq_head(self, qid: int, value: int) -> None:
        _U32.pack_into(self._shadow, _SQ_SLOT * qid + _CQ_SLOT, value)

    def publish(self, slot: int, value: int) -> None:
        """Set an EventIdx (``slot`` as for the shadow: 8·qid, +4 for a completion queue)
        and fence, so that the next shadow read sees the host's later updates."""
        _U32.pack_into(self._eventidx, slot, value)
        memory_fence()


class CompletionQueue:
    """A completion queue: the controller's tail and phase, the host's head."""

    def __init__(self, qid: int, ring: memoryview, base: int, size: int, *,
                 interrupts: bool, vector: int) -> None:
        self.qid = qid
        self.ring = ring
        self.base = base
        self.size = size
        self.interrupts = interrupts
        self.vector = vector
        self.head = 0
        self.tail = 0
        self.phase = 1
        #: Submission queues that post here.
        self.sqs = 0
        #: Completions waiting for room: (dword 0, dword 2, dword 3 without the phase).
        self.pending: deque[tuple[int, int, int]] = deque()

    def set_head(self, value: int) -> bool:
        """The host's head doorbell; False (and ignored) when out of range."""
        if value >= self.size:
            return False
        self.head = value
        return True

    def full(self, buffers: DoorbellBuffers | None) -> bool:
        if (self.tail + 1) % self.size != self.head:
            return False
        if buffers is not None:
            self.set_head(buffers.cq_head(self.qid))
            if (self.tail + 1) % self.size == self.head:
                buffers.publish(_SQ_SLOT * self.qid + _CQ_SLOT, self.head)
                self.set_head(buffers.cq_head(self.qid))
        return (self.tail + 1) % self.size == self.head

    @property
    def unread(self) -> bool:
        """Whether the host has entries it has not consumed (INTx asserts for them)."""
        return self.head != self.tail

    def post(self, dw0: int, dw2: int, dw3: int) -> None:
        """Write one completion at the tail (the caller checked :meth:`full`)."""
        offset = self.tail * CQE_SIZE
        CQE_HEAD.pack_into(self.ring, offset, dw0, 0, dw2)
        CQE_STATUS.pack_into(self.ring, offset + 12, dw3 | self.phase << 16)
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1


class SubmissionQueue:
    """A submission queue: the host's tail, the controller's head."""

    def __init__(self, qid: int, ring: memoryview, base: int, size: int,
                 cq: CompletionQueue) -> None:
        self.qid = qid
        self.ring = ring
        self.base = base
        self.size = size
        self.cq = cq
        self.head = 0
        self.tail = 0
        #: Commands taken and not yet completed (I/O commands on the back end).
        self.in_flight = 0
        #: The command ID of the Delete I/O SQ waiting for those commands, if any.
        self.deleting: int | None = None

    def set_tail(self, value: int) -> bool:
        """The host's tail doorbell; False (and ignored) when out of range."""
        if value >= self.size:
            return False
        self.tail = value
        return True

    def fetch(self, buffers: DoorbellBuffers | None) -> Command | None:
        """The command at the head (advancing it), or None when the queue is empty."""
        if self.head == self.tail and buffers is not None:
            self.set_tail(buffers.sq_tail(self.qid))
            if self.head == self.tail:
                buffers.publish(_SQ_SLOT * self.qid, self.tail)
                self.set_tail(buffers.sq_tail(self.qid))
        if self.head == self.tail:
            return None
        offset = self.head * SQE_SIZE
        self.head = (self.head + 1) % self.size
        return Command.parse(self.ring[offset : offset + SQE_SIZE])


# ---- saved state ----


def _queue_fields(fields: Fields, max_qid: int, max_size: int) -> tuple[int, int, int]:
    qid = field_int(fields, "qid", 16)
    size = field_int(fields, "size", 17)
    base = field_int(fields, "base", 64)
    if qid > max_qid:
        raise ValueError(f"saved queue {qid} is beyond the controller's {max_qid}")
    if not 2 <= size <= max_size:
        raise ValueError(f"saved queue {qid} has {size} entries (2-{max_size})")
    if base % PAGE:
        raise ValueError(f"saved queue {qid} is not page-aligned")
    for name in ("head", "tail"):
        if field_int(fields, name, 16) >= size:
            raise ValueError(f"saved queue {qid}: '{name}' is beyond its {size} entries")
    return qid, size, base


@attrs.define
class SqState:
    """A submission queue as saved (never with commands in flight)."""

    qid: int
    base: int
    size: int
    cqid: int
    head: int
    tail: int

    @classmethod
    def of(cls, sq: SubmissionQueue) -> SqState:
        return cls(sq.qid, sq.base, sq.size, sq.cq.qid, sq.head, sq.tail)

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields, max_qid: int, max_size: int) -> SqState:
        check_fields(fields, attrs.fields_dict(cls))
        qid, size, base = _queue_fields(fields, max_qid, max_size)
        return cls(qid, base, size, field_int(fields, "cqid", 16), fields["head"],
                   fields["tail"])


@attrs.define
class CqState:
    """A completion queue as saved, with the completions still waiting for room."""

    qid: int
    base: int
    size: int
    interrupts: bool
    vector: int
    head: int
    tail: int
    phase: int
    pending: list[list[int]]

    @classmethod
    def of(cls, cq: CompletionQueue) -> CqState:
        return cls(cq.qid, cq.base, cq.size, cq.interrupts, cq.vector, cq.head, cq.tail,
                   cq.phase, [list(entry) for entry in cq.pending])

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields, max_qid: int, max_size: int,
                    vectors: int) -> CqState:
        check_fields(fields, attrs.fields_dict(cls))
        qid, size, base = _queue_fields(fields, max_qid, max_size)
        if type(fields["interrupts"]) is not bool:
            raise ValueError(f"saved queue {qid}: 'interrupts' is not a bool")
        vector = field_int(fields, "vector", 16)
        if vector >= vectors:
            raise ValueError(f"saved queue {qid}: vector {vector} is beyond {vectors}")
        pending = fields["pending"]
        if not isinstance(pending, list) or len(pending) > MAX_PENDING or any(
                not isinstance(e, list) or len(e) != 3
                or any(type(d) is not int or not 0 <= d < 1 << 32 for d in e)
                or e[2] & 1 << 16 for e in pending):
            raise ValueError(f"saved queue {qid}: 'pending' is not a list of completions")
        return cls(qid, base, size, fields["interrupts"], vector, fields["head"],
                   fields["tail"], field_int(fields, "phase", 1), [list(e) for e in pending])

