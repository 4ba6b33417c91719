# SPDX-License-Identifier: BSD-2-Clause
"""The controller's saved state: registers, features, queues (with completions waiting
for room), outstanding Asynchronous Event Requests and doorbell buffers.

A snapshot is taken with nothing on the back end (the controller drains first), so no
command is half done in it. Everything read back is checked before it is used: queue
identifiers, sizes and indices within the controller's limits, every submission
queue's completion queue present, and every ring and doorbell page inside guest RAM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hvf.errors import GuestMemoryError
from hvf.plugins.nvme.features import Features
from hvf.plugins.nvme.identify import ASYNC_EVENT_LIMIT
from hvf.plugins.nvme.queues import (
    CompletionQueue,
    CqState,
    DoorbellBuffers,
    SqState,
    SubmissionQueue,
)
from hvf.plugins.nvme.spec import CC_WRITABLE, CQE_SIZE, CSTS_CFS, CSTS_RDY, PAGE, SQE_SIZE
from hvf.snapshot_api import Fields, check_fields, field_flags, field_int

if TYPE_CHECKING:
    from hvf.plugins.nvme.controller import NvmeController
    from hvf.plugins.nvme.identify import Identity

#: Entries of an admin queue at most (AQA's 12-bit sizes).
MAX_ADMIN_ENTRIES = 4096
_CSTS_BITS = CSTS_RDY | CSTS_CFS | 0b1100
_EVENT_TYPES = 0xFF


def _int_list(fields: Fields, name: str, bits: int, limit: int) -> list[int]:
    values = fields[name]
    if not isinstance(values, list) or len(values) > limit or any(
            type(v) is not int or not 0 <= v < 1 << bits for v in values):
        raise ValueError(f"saved field '{name}' is not a list of at most {limit} "
                         f"{bits}-bit integers")
    return list(values)


@attrs.define
class ControllerState:
    """Everything of one controller a snapshot holds beyond PCI and MSI-X."""

    cc: int
    csts: int
    aqa: int
    asq: int
    acq: int
    intms: int
    features: Features
    sqs: list[SqState]
    cqs: list[CqState]
    aer_requests: list[int]
    aer_queued: list[int]
    aer_masked: int
    #: The doorbell buffers' shadow and EventIdx pages (0: none configured).
    shadow: int
    eventidx: int

    def to_fields(self) -> Fields:
        fields = attrs.asdict(self, recurse=False)
        fields["features"] = self.features.to_fields()
        fields["sqs"] = [sq.to_fields() for sq in self.sqs]
        fields["cqs"] = [cq.to_fields() for cq in self.cqs]
        return fields

    @classmethod
    def from_fields(cls, fields: Fields, identity: Identity) -> ControllerState:
        """Rebuild for a controller of ``identity``; ``ValueError`` names a bad field."""
        check_fields(fields, attrs.fields_dict(cls))
        maxq = identity.maxq
        for name in ("features", "sqs", "cqs"):
            kind = dict if name == "features" else list
            if not isinstance(fields[name], kind):
                raise ValueError(f"saved field '{name}' is not a {kind.__name__}")
        queues: dict[str, list[Fields]] = {"sqs": fields["sqs"], "cqs": fields["cqs"]}
        for name, listed in queues.items():
            if len(listed) > maxq + 1 or not all(isinstance(q, dict) for q in listed):
                raise ValueError(f"saved field '{name}' is not a list of queues")

        def limit(queue: Fields) -> int:
            return MAX_ADMIN_ENTRIES if queue.get("qid") == 0 else identity.qsz

        cqs = [CqState.from_fields(q, maxq, limit(q), maxq + 1) for q in queues["cqs"]]
        sqs = [SqState.from_fields(q, maxq, limit(q)) for q in queues["sqs"]]
        cq_ids = [cq.qid for cq in cqs]
        sq_ids = [sq.qid for sq in sqs]
        if len(set(cq_ids)) != len(cq_ids) or len(set(sq_ids)) != len(sq_ids):
            raise ValueError("saved queues have the same identifier twice")
        if any(sq.cqid not in cq_ids or (sq.cqid == 0) != (sq.qid == 0) for sq in sqs):
            raise ValueError("a saved submission queue posts to a completion queue "
                             "that is not there")
        state = cls(
            cc=field_flags(fields, "cc", 32, CC_WRITABLE),
            csts=field_flags(fields, "csts", 32, _CSTS_BITS),
            aqa=field_flags(fields, "aqa", 32, 0x0FFF_0FFF),
            asq=field_flags(fields, "asq", 64, ~(PAGE - 1) & (1 << 64) - 1),
            acq=field_flags(fields, "acq", 64, ~(PAGE - 1) & (1 << 64) - 1),
            intms=field_int(fields, "intms", 32),
            features=Features.from_fields(fields["features"], maxq),
            sqs=sqs, cqs=cqs,
            aer_requests=_int_list(fields, "aer_requests", 16, ASYNC_EVENT_LIMIT),
            aer_queued=_int_list(fields, "aer_queued", 32, 64),
            aer_masked=field_flags(fields, "aer_masked", 8, _EVENT_TYPES),
            shadow=field_flags(fields, "shadow", 64, ~(PAGE - 1) & (1 << 64) - 1),
            eventidx=field_flags(fields, "eventidx", 64, ~(PAGE - 1) & (1 << 64) - 1),
        )
        if (0 in cq_ids) != (0 in sq_ids) or (0 in sq_ids) != bool(state.csts & CSTS_RDY):
            raise ValueError("saved admin queues do not match the ready bit")
        if bool(state.shadow) != bool(state.eventidx):
            raise ValueError("saved doorbell buffers are incomplete")
        return state


def capture(ctrl: NvmeController) -> ControllerState:
    """The controller's state now (lock held, nothing in flight)."""
    buffers = ctrl.buffers
    return ControllerState(
        cc=ctrl.cc, csts=ctrl.csts, aqa=ctrl.aqa, asq=ctrl.asq, acq=ctrl.acq,
        intms=ctrl.intms, features=attrs.evolve(ctrl.features),
        sqs=[SqState.of(sq) for sq in ctrl.sqs.values()],
        cqs=[CqState.of(cq) for cq in ctrl.cqs.values()],
        aer_requests=list(ctrl.events.requests), aer_queued=list(ctrl.events.queued),
        aer_masked=ctrl.events.masked,
        shadow=buffers.shadow_address if buffers else 0,
        eventidx=buffers.eventidx_address if buffers else 0,
    )


def apply(ctrl: NvmeController, state: ControllerState) -> None:
    """Load ``state`` into the controller (lock held); ``ValueError`` when a queue or a
    doorbell page is not in guest RAM."""
    dma = ctrl.dma
    try:
        cqs = {}
        for saved in state.cqs:
            ring = dma.ring(saved.base, saved.size * CQE_SIZE, (ctrl.name, "cq", saved.qid))
            cq = CompletionQueue(saved.qid, ring,
                                 saved.base, saved.size, interrupts=saved.interrupts,
                                 vector=saved.vector)
            cq.head, cq.tail, cq.phase = saved.head, saved.tail, saved.phase
            cq.pending.extend((e[0], e[1], e[2]) for e in saved.pending)
            cqs[cq.qid] = cq
        sqs = {}
        for s in state.sqs:
            sq = SubmissionQueue(s.qid, dma.view(s.base, s.size * SQE_SIZE), s.base, s.size,
                                 cqs[s.cqid])
            sq.head, sq.tail = s.head, s.tail
            sq.cq.sqs += 1
            sqs[sq.qid] = sq
        buffers = DoorbellBuffers(dma, state.shadow, state.eventidx) if state.shadow else None
    except GuestMemoryError as e:
        raise ValueError(f"saved queue or doorbell buffer: {e}") from None
    ctrl.cc, ctrl.csts, ctrl.aqa = state.cc, state.csts, state.aqa
    ctrl.asq, ctrl.acq, ctrl.intms = state.asq, state.acq, state.intms
    ctrl.features = state.features
    ctrl.sqs, ctrl.cqs, ctrl.buffers = sqs, cqs, buffers
    ctrl.events.requests[:] = state.aer_requests
    ctrl.events.queued[:] = state.aer_queued
    ctrl.events.masked = state.aer_masked
