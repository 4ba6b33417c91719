# SPDX-License-Identifier: BSD-2-Clause
"""The admin command set (NVMe 1.4 §5) the controller runs on its I/O thread.

Identify (CNS 00h-03h), Create and Delete I/O Submission and Completion Queue
(physically contiguous queues only), Get Log Page (Error, SMART / Health, Firmware
Slot), Get and Set Features (:mod:`hvf.plugins.nvme.features`), Abort (best effort:
never aborts, dword 0 bit 0 set), Asynchronous Event Request (held until an event),
Doorbell Buffer Config; Firmware Commit has no slot to commit to. Everything else is
Invalid Opcode, as is a fused command or one asking for SGLs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvf.dma import write_views
from hvf.errors import GuestMemoryError
from hvf.plugins.nvme import identify
from hvf.plugins.nvme.features import get_feature, set_feature
from hvf.plugins.nvme.prp import PrpError, prp_views
from hvf.plugins.nvme.queues import CompletionQueue, DoorbellBuffers, SubmissionQueue
from hvf.plugins.nvme.spec import (
    ADMIN_ABORT,
    ADMIN_ASYNC_EVENT,
    ADMIN_CREATE_CQ,
    ADMIN_CREATE_SQ,
    ADMIN_DELETE_CQ,
    ADMIN_DELETE_SQ,
    ADMIN_DOORBELL_BUFFER_CONFIG,
    ADMIN_FIRMWARE_COMMIT,
    ADMIN_GET_FEATURES,
    ADMIN_GET_LOG_PAGE,
    ADMIN_IDENTIFY,
    ADMIN_SET_FEATURES,
    ASYNC_EVENT_LIMIT_EXCEEDED,
    CNS_ACTIVE_NAMESPACES,
    CNS_CONTROLLER,
    CNS_DESCRIPTORS,
    CNS_NAMESPACE,
    COMPLETION_QUEUE_INVALID,
    CQE_SIZE,
    CQES_LOG,
    EVENT_ERROR,
    EVENT_SMART,
    EVENT_TEMPERATURE,
    FEAT_TEMPERATURE_THRESHOLD,
    INVALID_FIELD,
    INVALID_FIRMWARE_SLOT,
    INVALID_INTERRUPT_VECTOR,
    INVALID_LOG_PAGE,
    INVALID_NAMESPACE,
    INVALID_OPCODE,
    INVALID_PRP_OFFSET,
    INVALID_QUEUE_DELETION,
    INVALID_QUEUE_IDENTIFIER,
    INVALID_QUEUE_SIZE,
    LOG_ERROR,
    LOG_FIRMWARE_SLOT,
    LOG_RAE,
    LOG_SMART,
    NSID,
    PAGE,
    SQE_SIZE,
    SQES_LOG,
    SUCCESS,
    Command,
    cc_field,
    event,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from hvf.plugins.nvme.controller import NvmeController

Result = tuple[int, int]  # status, completion dword 0
#: The event type each log page's read (without RAE) unmasks.
_LOG_EVENT = {LOG_ERROR: EVENT_ERROR, LOG_SMART: EVENT_SMART}


class AsyncEvents:
    """Outstanding Asynchronous Event Requests and the events waiting for one (§5.2):
    an event of a type already reported waits until its log page is read."""

    def __init__(self, complete: Callable[[int, int], None]) -> None:
        self._complete = complete
        #: Command IDs of the requests the host has outstanding.
        self.requests: list[int] = []
        #: Events not yet reported (completion dword 0 of each).
        self.queued: list[int] = []
        #: Event types reported and not yet cleared by reading their log page.
        self.masked = 0

    def request(self, cid: int) -> Result | None:
        if len(self.requests) >= identify.ASYNC_EVENT_LIMIT:
            return ASYNC_EVENT_LIMIT_EXCEEDED, 0
        self.requests.append(cid)
        self._deliver()
        return None

    def post(self, dw0: int) -> None:
        if dw0 not in self.queued:
            self.queued.append(dw0)
        self._deliver()

    def log_read(self, log_id: int, retain: bool) -> None:
        kind = _LOG_EVENT.get(log_id)
        if kind is not None and not retain:
            self.masked &= ~(1 << kind)
            self._deliver()

    def _deliver(self) -> None:
        while self.requests:
            ready = next((e for e in self.queued if not self.masked >> (e & 7) & 1), None)
            if ready is None:
                return
            self.queued.remove(ready)
            self.masked |= 1 << (ready & 7)
            self._complete(self.requests.pop(0), ready)


class AdminCommands:
    """The admin queue's commands for one controller (lock held)."""

    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl
        self._handlers: dict[int, Callable[[Command], Result | None]] = {
            ADMIN_DELETE_SQ: self._delete_sq,
            ADMIN_CREATE_SQ: self._create_sq,
            ADMIN_GET_LOG_PAGE: self._get_log_page,
            ADMIN_DELETE_CQ: self._delete_cq,
            ADMIN_CREATE_CQ: self._create_cq,
            ADMIN_IDENTIFY: self._identify,
            ADMIN_ABORT: lambda cmd: (SUCCESS, 1),
            ADMIN_SET_FEATURES: self._set_features,
            ADMIN_GET_FEATURES: self._get_features,
            ADMIN_ASYNC_EVENT: lambda cmd: self.ctrl.events.request(cmd.cid),
            ADMIN_FIRMWARE_COMMIT: lambda cmd: (INVALID_FIRMWARE_SLOT, 0),
            ADMIN_DOORBELL_BUFFER_CONFIG: self._doorbell_buffers,
        }

    def execute(self, cmd: Command) -> Result | None:
        """Run ``cmd``: its status and dword 0, or None when it completes later."""
        handler = self._handlers.get(cmd.opcode)
        if handler is None or cmd.flags:
            return INVALID_OPCODE if handler is None else INVALID_FIELD, 0
        return handler(cmd)

    def _send(self, cmd: Command, data: bytes) -> Result:
        try:
            views = prp_views(self.ctrl.dma, cmd.prp1, cmd.prp2, len(data))
        except PrpError as e:
            return e.status, 0
        write_views(views, data)
        return SUCCESS, 0

    # ---- identify and logs ----

    def _identify(self, cmd: Command) -> Result:
        cns, ident = cmd.cdw10 & 0xFF, self.ctrl.identity
        if cns == CNS_CONTROLLER:
            return self._send(cmd, identify.controller(ident))
        if cns == CNS_ACTIVE_NAMESPACES:
            if cmd.nsid >= 0xFFFF_FFFE:
                return INVALID_NAMESPACE, 0
            return self._send(cmd, identify.active_namespaces(cmd.nsid))
        if cns in (CNS_NAMESPACE, CNS_DESCRIPTORS):
            if cmd.nsid != NSID:
                return INVALID_NAMESPACE, 0
            build = identify.namespace if cns == CNS_NAMESPACE else identify.descriptors
            return self._send(cmd, build(ident))
        return INVALID_FIELD, 0

    def _get_log_page(self, cmd: Command) -> Result:
        log_id = cmd.cdw10 & 0xFF
        length = ((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) * 4 + 4
        offset = cmd.cdw12 | cmd.cdw13 << 32
        if log_id == LOG_ERROR:
            log = bytes(identify.ERROR_LOG_SIZE)
        elif log_id == LOG_SMART:
            log = identify.smart_log(self.ctrl.health())
        elif log_id == LOG_FIRMWARE_SLOT:
            log = identify.firmware_log()
        else:
            return INVALID_LOG_PAGE, 0
        if offset & 3 or offset >= len(log) or length > identify.MAX_TRANSFER:
            return INVALID_FIELD, 0
        result = self._send(cmd, log[offset : offset + length].ljust(length, b"\0"))
        if result[0] == SUCCESS:
            self.ctrl.events.log_read(log_id, bool(cmd.cdw10 & LOG_RAE))
        return result

    # ---- features ----

    def _get_features(self, cmd: Command) -> Result:
        return get_feature(self.ctrl.features, self.ctrl.default_features(), cmd.cdw10 & 0xFF,
                           cmd.cdw11, cmd.cdw10 >> 8 & 7)

    def _set_features(self, cmd: Command) -> Result:
        ctrl = self.ctrl
        before = ctrl.warnings()
        result = set_feature(ctrl.features, cmd.cdw10 & 0xFF, cmd.cdw10, cmd.cdw11,
                             maxq=ctrl.identity.maxq, vectors=ctrl.vectors,
                             write_cache=ctrl.identity.write_cache,
                             io_queues_exist=len(ctrl.sqs) > 1 or len(ctrl.cqs) > 1)
        if cmd.cdw10 & 0xFF == FEAT_TEMPERATURE_THRESHOLD:
            raised = ctrl.warnings() & ~before & ctrl.features.async_events
            if raised:
                ctrl.events.post(event(EVENT_SMART, EVENT_TEMPERATURE, LOG_SMART))
        return result

    # ---- queues ----

    def _ring(self, cmd: Command, size: int, entry: int,
              written: object = None) -> memoryview | int:
        """The new queue's ring, or the status refusing it; a ring the controller writes
        (a completion queue) is registered as ``written`` (see ``GuestDma.ring``)."""
        if cmd.prp1 & (PAGE - 1):
            return INVALID_PRP_OFFSET
        try:
            if written is not None:
                return self.ctrl.dma.ring(cmd.prp1, size * entry, written)
            return self.ctrl.dma.view(cmd.prp1, size * entry)
        except GuestMemoryError:
            return INVALID_FIELD

    def _new_queue(self, cmd: Command, existing: dict[int, object], allocated: int,
                   entry_log: int, cc_shift: int) -> tuple[int, int] | int:
        """(qid, size) of a queue to create, or the status refusing it."""
        qid, size = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        if not 1 <= qid <= allocated or qid in existing:
            return INVALID_QUEUE_IDENTIFIER
        if not 2 <= size <= self.ctrl.identity.qsz:
            return INVALID_QUEUE_SIZE
        if not cmd.cdw11 & 1 or cc_field(self.ctrl.cc, cc_shift, 4) != entry_log:
            return INVALID_FIELD  # not physically contiguous, or CC's entry size
        return qid, size

    def _create_cq(self, cmd: Command) -> Result:
        ctrl = self.ctrl
        checked = self._new_queue(cmd, ctrl.cqs, (ctrl.features.queues >> 16) + 1, CQES_LOG, 20)
        if isinstance(checked, int):
            return checked, 0
        vector = cmd.cdw11 >> 16
        if vector >= ctrl.vectors:
            return INVALID_INTERRUPT_VECTOR, 0
        ring = self._ring(cmd, checked[1], CQE_SIZE, (self.ctrl.name, "cq", checked[0]))
        if isinstance(ring, int):
            return ring, 0
        ctrl.add_cq(CompletionQueue(checked[0], ring, cmd.prp1, checked[1],
                                    interrupts=bool(cmd.cdw11 & 2), vector=vector))
        return SUCCESS, 0

    def _create_sq(self, cmd: Command) -> Result:
        ctrl = self.ctrl
        checked = self._new_queue(cmd, ctrl.sqs, (ctrl.features.queues & 0xFFFF) + 1,
                                  SQES_LOG, 16)
        if isinstance(checked, int):
            return checked, 0
        cq = ctrl.cqs.get(cmd.cdw11 >> 16)
        if cq is None or not cq.qid:
            return COMPLETION_QUEUE_INVALID, 0
        ring = self._ring(cmd, checked[1], SQE_SIZE)
        if isinstance(ring, int):
            return ring, 0
        ctrl.add_sq(SubmissionQueue(checked[0], ring, cmd.prp1, checked[1], cq))
        return SUCCESS, 0

    def _delete_sq(self, cmd: Command) -> Result | None:
        sq = self.ctrl.sqs.get(cmd.cdw10 & 0xFFFF)
        if sq is None or not sq.qid or sq.deleting is not None:
            return INVALID_QUEUE_IDENTIFIER, 0
        return self.ctrl.delete_sq(sq, cmd.cid)

    def _delete_cq(self, cmd: Command) -> Result:
        cq = self.ctrl.cqs.get(cmd.cdw10 & 0xFFFF)
        if cq is None or not cq.qid:
            return INVALID_QUEUE_IDENTIFIER, 0
        if cq.sqs:
            return INVALID_QUEUE_DELETION, 0
        self.ctrl.remove_cq(cq)
        return SUCCESS, 0

    def _doorbell_buffers(self, cmd: Command) -> Result:
        if not cmd.prp1 or not cmd.prp2 or (cmd.prp1 | cmd.prp2) & (PAGE - 1):
            return INVALID_FIELD, 0
        try:
            buffers = DoorbellBuffers(self.ctrl.dma, cmd.prp1, cmd.prp2)
        except GuestMemoryError:
            return INVALID_FIELD, 0
        self.ctrl.use_doorbell_buffers(buffers)
        return SUCCESS, 0
