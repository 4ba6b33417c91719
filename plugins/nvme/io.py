# SPDX-License-Identifier: BSD-2-Clause
"""The NVM command set (NVMe 1.4 NVM §6) on the shared block back end.

Read and Write (PRP data, at most MDTS, FUA), Flush, Write Zeroes (DEAC deallocates
where the image can) and Dataset Management (deallocate: each range a discard, that
is a hole punched in the image). A command is checked in full (namespace, size, LBA
range, write protection, its PRPs against guest RAM) before it reaches the back end,
which then moves data straight between guest RAM and the image on a worker thread; its
completion (on that thread) finishes the command. A write with FUA, or any write while
the host has turned the volatile write cache off, is followed by a flush before it
completes. The back end's errors become Data Transfer Error (Namespace Is Write
Protected for EROFS); a discard the image cannot do succeeds without effect, as
deallocation is only a hint.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import attrs

from hvf.dma import read_views_into
from hvf.plugins.block.backend import Status
from hvf.plugins.nvme.identify import MAX_TRANSFER
from hvf.plugins.nvme.prp import PrpError, prp_views
from hvf.plugins.nvme.spec import (
    DATA_TRANSFER_ERROR,
    DSM_DEALLOCATE,
    DSM_RANGE,
    INVALID_FIELD,
    INVALID_NAMESPACE,
    INVALID_OPCODE,
    IO_DSM,
    IO_FLUSH,
    IO_READ,
    IO_WRITE,
    IO_WRITE_ZEROES,
    LBA_OUT_OF_RANGE,
    NAMESPACE_WRITE_PROTECTED,
    NLB_MASK,
    NSID,
    NSID_ALL,
    RW_FUA,
    SUCCESS,
    WZ_DEAC,
    Command,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from hvf.plugins.nvme.controller import NvmeController
    from hvf.plugins.nvme.queues import SubmissionQueue

Result = tuple[int, int]


@attrs.define(slots=True, eq=False)
class Request:
    """An I/O command on the back end: where it completes, and what it still waits for."""

    sq: SubmissionQueue
    cid: int
    #: The controller's generation when it started (a reset since drops its completion).
    generation: int
    pending: int
    then_flush: bool
    status: int = SUCCESS


def backend_status(status: Status, nbytes: int) -> int:
    """The NVMe status of a back-end result."""
    if status in (Status.OK, Status.UNSUPPORTED):
        return SUCCESS
    if status is Status.OUT_OF_RANGE:
        return LBA_OUT_OF_RANGE
    return NAMESPACE_WRITE_PROTECTED if nbytes == -errno.EROFS else DATA_TRANSFER_ERROR


class NvmCommands:
    """The I/O queues' commands for one controller (lock held)."""

    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl
        self.backend = ctrl.backend
        identity = ctrl.identity
        self.shift = identity.block_shift
        self.blocks = identity.blocks
        self.readonly = identity.readonly
        self.dsm = identity.dsm
        self.write_cache = identity.write_cache
        #: Commands of each kind accepted (the SMART log's host commands).
        self.reads = 0
        self.writes = 0
        self._handlers = {IO_READ: self._read, IO_WRITE: self._write, IO_FLUSH: self._flush,
                          IO_WRITE_ZEROES: self._write_zeroes, IO_DSM: self._dsm}

    def execute(self, sq: SubmissionQueue, cmd: Command) -> Result | None:
        """Start ``cmd``; its status at once when it is refused (or needs nothing)."""
        handler = self._handlers.get(cmd.opcode)
        if handler is None or (cmd.opcode == IO_DSM and not self.dsm):
            return INVALID_OPCODE, 0
        if cmd.flags:
            return INVALID_FIELD, 0  # fused, or SGLs
        if cmd.nsid != NSID and not (cmd.opcode == IO_FLUSH and cmd.nsid == NSID_ALL):
            return INVALID_NAMESPACE, 0
        status = handler(sq, cmd)
        return None if status is None else (status, 0)

    def _range(self, cmd: Command) -> tuple[int, int] | int:
        """(byte offset, byte length) of the blocks ``cmd`` names, or its status."""
        lba, blocks = cmd.cdw10 | cmd.cdw11 << 32, (cmd.cdw12 & NLB_MASK) + 1
        if lba + blocks > self.blocks:
            return LBA_OUT_OF_RANGE
        return lba << self.shift, blocks << self.shift

    def _flushes(self, cmd: Command) -> bool:
        return self.write_cache and bool(cmd.cdw12 & RW_FUA or not self.ctrl.features.write_cache)

    def _read(self, sq: SubmissionQueue, cmd: Command) -> int | None:
        return self._transfer(sq, cmd, write=False)

    def _write(self, sq: SubmissionQueue, cmd: Command) -> int | None:
        return self._transfer(sq, cmd, write=True)

    def _transfer(self, sq: SubmissionQueue, cmd: Command, *, write: bool) -> int | None:
        if ((cmd.cdw12 & NLB_MASK) + 1) << self.shift > MAX_TRANSFER:
            return INVALID_FIELD
        where = self._range(cmd)
        if isinstance(where, int):
            return where
        if write and self.readonly:
            return NAMESPACE_WRITE_PROTECTED
        try:
            views = prp_views(self.ctrl.dma, cmd.prp1, cmd.prp2, where[1])
        except PrpError as e:
            return e.status
        if write:
            self.writes += 1
            self.backend.write(where[0], views, self._start(sq, cmd, then_flush=self._flushes(cmd)))
        else:
            self.reads += 1
            self.backend.read(where[0], views, self._start(sq, cmd))
        return None

    def _flush(self, sq: SubmissionQueue, cmd: Command) -> int | None:
        self.backend.flush(self._start(sq, cmd))
        return None

    def _write_zeroes(self, sq: SubmissionQueue, cmd: Command) -> int | None:
        where = self._range(cmd)
        if isinstance(where, int):
            return where
        if self.readonly:
            return NAMESPACE_WRITE_PROTECTED
        unmap = self.dsm and bool(cmd.cdw12 & WZ_DEAC)
        self.backend.write_zeroes(*where, unmap, self._start(sq, cmd, then_flush=self._flushes(cmd)))
        return None

    def _dsm(self, sq: SubmissionQueue, cmd: Command) -> int | None:
        if not cmd.cdw11 & DSM_DEALLOCATE:
            return SUCCESS  # only access hints: nothing to do
        if self.readonly:
            return NAMESPACE_WRITE_PROTECTED
        data = bytearray(((cmd.cdw10 & 0xFF) + 1) * DSM_RANGE.size)
        try:
            read_views_into(prp_views(self.ctrl.dma, cmd.prp1, cmd.prp2, len(data)), data)
        except PrpError as e:
            return e.status
        ranges = []
        for _attributes, blocks, lba in DSM_RANGE.iter_unpack(data):
            if lba + blocks > self.blocks:
                return LBA_OUT_OF_RANGE
            if blocks:
                ranges.append((lba << self.shift, blocks << self.shift))
        if not ranges:
            return SUCCESS
        done = self._start(sq, cmd, pending=len(ranges))
        for offset, length in ranges:
            self.backend.discard(offset, length, done)
        return None

    # ---- requests on the back end ----

    def _start(self, sq: SubmissionQueue, cmd: Command, *, pending: int = 1,
               then_flush: bool = False) -> Callable[[Status, int], None]:
        """Count a command in flight; the callback its back-end requests complete with."""
        request = Request(sq, cmd.cid, self.ctrl.generation, pending, then_flush)
        self.ctrl.started(sq)
        return lambda status, nbytes: self._done(request, status, nbytes)

    def _done(self, request: Request, status: Status, nbytes: int) -> None:
        """A back-end request of ``request`` completed (a worker thread)."""
        with self.ctrl.lock:
            if status is not Status.OK and request.status == SUCCESS:
                request.status = backend_status(status, nbytes)
            request.pending -= 1
            if request.pending:
                return
            if (request.then_flush and request.status == SUCCESS
                    and request.generation == self.ctrl.generation):
                request.then_flush = False
                request.pending = 1
                self.backend.flush(lambda s, n: self._done(request, s, n))
                return
            self.ctrl.finished(request)
