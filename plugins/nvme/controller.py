# SPDX-License-Identifier: BSD-2-Clause
"""The NVMe controller (bhyve's ``nvme``): PCI function 01:08:02 with its registers,
doorbells and MSI-X table in one 64-bit memory BAR::

    0x0000  controller registers (CAP, VS, INTMS/INTMC, CC, CSTS, AQA, ASQ, ACQ)
    0x1000  doorbells: queue y's SQ tail at 0x1000 + 8y, its CQ head at + 4
    0x2000  MSI-X table (one vector per queue pair, the admin queue's included)
    0x3000  MSI-X PBA

Registers take dword writes (and qword writes of the 64-bit ones). CC.EN 0→1 maps the
admin queues (a bad CC or admin queue sets CSTS.CFS); 1→0 resets the controller:
queues, features, events and doorbell buffers go, and CSTS.RDY clears once the back
end has finished what was in flight (their completions are dropped). CC.SHN reports
the shutdown complete once in-flight I/O is done and flushed. The queues, doorbells
and threads are :mod:`hvf.plugins.nvme.engine`'s.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from hvf.bootorder import BootEntry, pci_path
from hvf.errors import DeviceError, GuestMemoryError
from hvf.plugins.block.engine import new_backend
from hvf.plugins.block.record import ImageRecord, check_restored_image, record_image
from hvf.plugins.nvme import identify, state
from hvf.plugins.nvme.admin import AdminCommands, AsyncEvents
from hvf.plugins.nvme.engine import QueueEngine, Result
from hvf.plugins.nvme.features import Features
from hvf.plugins.nvme.io import NvmCommands
from hvf.plugins.nvme.queues import CompletionQueue, SubmissionQueue
from hvf.plugins.nvme.spec import (
    CAP_CQR,
    CAP_CSS_NVM,
    CAP_TIMEOUT,
    CC_EN,
    CC_WRITABLE,
    CQE_SIZE,
    CSTS_CFS,
    CSTS_RDY,
    DOORBELL_STRIDE,
    DOORBELLS,
    EVENT_ERROR,
    LOG_ERROR,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CC,
    REG_INTMC,
    REG_INTMS,
    REGISTERS_END,
    SHST_COMPLETE,
    SHST_OCCURRING,
    SQE_SIZE,
    SUCCESS,
    VERSION,
    Command,
    cc_field,
    event,
)
from hvf.plugins.pci import BAR_MEM64, MsixCapability

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.plugins.block.image import Image
    from hvf.plugins.nvme.identify import Identity

CLASS_NVME = 0x010802
BAR_SIZE = 0x4000
MSIX_TABLE, MSIX_PBA = 0x2000, 0x3000
_REGISTERS = struct.Struct("<QIIIIIIIIQQII")
_LOW = 0xFFFF_FFFF
_SHST_SHIFT = 2
_SHST_MASK = 3 << _SHST_SHIFT


def _dword_into(address: int, half: int, value: int) -> int:
    """A 64-bit queue base with its low (``half`` 0) or high dword written; the low 12
    bits (reserved: the base is page-aligned) stay clear."""
    if half:
        return address & _LOW | value << 32
    return address & ~_LOW | value & ~0xFFF


class NvmeController(QueueEngine):
    """One NVMe controller with one namespace on ``image``."""

    def __init__(self, name: str, image: Image, identity: Identity, *, ioslots: int,
                 bootindex: int | None = None) -> None:
        super().__init__(name, vectors=identity.maxq + 1, ioslots=ioslots)
        self.set_identity(identify.VENDOR_ID, identify.DEVICE_ID, CLASS_NVME,
                          subsystem_vendor=identify.VENDOR_ID, subsystem=identify.DEVICE_ID)
        self.identity = identity
        self.bootindex = bootindex
        self.backend = new_backend(image, name=name)
        self.bar = self.add_bar(0, BAR_MEM64, BAR_SIZE, self._bar_read, self._bar_write)
        self.request_intx()
        self.cap = (identity.qsz - 1) | CAP_CQR | CAP_TIMEOUT << 24 | CAP_CSS_NVM
        self.cc = self.csts = self.aqa = self.asq = self.acq = 0
        self.features = self.default_features()
        self.events = AsyncEvents(self._event_reported)
        self._resetting = False
        self.admin = AdminCommands(self)
        self.nvm = NvmCommands(self)
        self.started_at = time.monotonic()

    def attach(self, ctx: DeviceContext) -> None:
        self.dma = ctx.dma
        self.msix = MsixCapability(self, ctx.interrupts, self.vectors, bar=0,
                                   table_offset=MSIX_TABLE, pba_offset=MSIX_PBA)
        self.attach_doorbells(ctx)

    # ---- the BAR ----

    def _registers(self) -> bytes:
        return _REGISTERS.pack(self.cap, VERSION, self.intms, self.intms, self.cc, 0,
                               self.csts, 0, self.aqa, self.asq, self.acq, 0, 0)

    def _bar_read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset < REGISTERS_END:
                return int.from_bytes(self._registers()[offset : offset + size], "little")
            if MSIX_TABLE <= offset < MSIX_PBA:
                return self.msix.table_read(offset - MSIX_TABLE, size)
            if offset >= MSIX_PBA:
                return self.msix.pba_read(offset - MSIX_PBA, size)
            return 0

    def _bar_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if DOORBELLS <= offset < self._doorbells_end:
                if size == DOORBELL_STRIDE and not offset % DOORBELL_STRIDE:
                    self.doorbell_exits += 1
                    self._doorbell_written((offset - DOORBELLS) // DOORBELL_STRIDE, value & 0xFFFF)
            elif offset < REGISTERS_END:
                self._register_written(offset, size, value)
            elif MSIX_TABLE <= offset < MSIX_PBA:
                self.msix.table_write(offset - MSIX_TABLE, size, value)

    def _register_written(self, offset: int, size: int, value: int) -> None:
        if size == 8 and not offset % 8:
            self._register_written(offset, 4, value & _LOW)
            self._register_written(offset + 4, 4, value >> 32)
            return
        if size != 4 or offset % 4:
            return  # registers take dword (and qword) writes only
        if offset == REG_INTMS:
            self.intms |= value
            self._update_intx()
        elif offset == REG_INTMC:
            self.intms &= ~value
            self._update_intx()
        elif offset == REG_CC:
            self._cc_written(value & CC_WRITABLE)
        elif offset == REG_AQA:
            self.aqa = value & 0x0FFF_0FFF
        elif offset in (REG_ASQ, REG_ASQ + 4):
            self.asq = _dword_into(self.asq, offset - REG_ASQ, value)
        elif offset in (REG_ACQ, REG_ACQ + 4):
            self.acq = _dword_into(self.acq, offset - REG_ACQ, value)

    # ---- enable, reset, shutdown ----

    def _cc_written(self, cc: int) -> None:
        old, self.cc = self.cc, cc
        if old & CC_EN and not cc & CC_EN:
            self._reset()
        elif cc & CC_EN and not old & CC_EN and not self._resetting:
            self._enable()
        if cc_field(cc, 14, 2) and not cc_field(old, 14, 2) and self.csts & CSTS_RDY:
            self._shutdown()

    def _enable(self) -> None:
        if self.csts & (CSTS_RDY | CSTS_CFS):
            return
        sq_size, cq_size = (self.aqa & 0xFFF) + 1, (self.aqa >> 16) + 1
        if cc_field(self.cc, 4, 3) or cc_field(self.cc, 7, 4) or cc_field(self.cc, 11, 3) or (
                min(sq_size, cq_size) < 2):
            self._fatal("CC (command set, page size, arbitration) or AQA is invalid")
            return
        try:
            sq_ring = self.dma.view(self.asq, sq_size * SQE_SIZE)
            cq_ring = self.dma.ring(self.acq, cq_size * CQE_SIZE, (self.name, "cq", 0))
        except GuestMemoryError as e:
            self._fatal(f"the admin queues are not in guest RAM ({e})")
            return
        cq = CompletionQueue(0, cq_ring, self.acq, cq_size, interrupts=True, vector=0)
        self.cqs[0] = cq
        self.add_sq(SubmissionQueue(0, sq_ring, self.asq, sq_size, cq))
        self.csts = CSTS_RDY

    def _fatal(self, why: str) -> None:
        self.ctx.log(f"{self.name}: {why}; controller fatal status")
        self.csts |= CSTS_CFS

    def _reset(self) -> None:
        """Controller reset: forget queues, features, events and doorbell buffers."""
        self.generation += 1
        self.sqs.clear()
        self.cqs.clear()
        self.buffers = None
        self._update_doorbells()
        self.features = self.default_features()
        self.events = AsyncEvents(self._event_reported)
        self.intms = 0
        self._update_intx()
        if not self._resetting:
            self._resetting = True
            self.when_idle(self._reset_done)

    def _reset_done(self) -> None:
        self._resetting = False
        self.csts = 0
        if self.cc & CC_EN:
            self._enable()

    def _shutdown(self) -> None:
        self.csts = self.csts & ~_SHST_MASK | SHST_OCCURRING << _SHST_SHIFT
        generation = self.generation

        def flush() -> None:
            self.io_in_flight += 1
            self.backend.flush(lambda status, nbytes: self._shutdown_done(generation))

        self.when_idle(flush)

    def _shutdown_done(self, generation: int) -> None:
        with self.lock:
            if generation == self.generation:
                self.csts = self.csts & ~_SHST_MASK | SHST_COMPLETE << _SHST_SHIFT
            self._retire()

    # ---- the engine's hooks ----

    @property
    def running(self) -> bool:
        """Ready, not resetting, not shutting down."""
        return self.csts == CSTS_RDY and not self._resetting

    def execute(self, sq: SubmissionQueue, cmd: Command) -> Result | None:
        return self.nvm.execute(sq, cmd) if sq.qid else self.admin.execute(cmd)

    def doorbell_error(self, info: int) -> None:
        self.events.post(event(EVENT_ERROR, info, LOG_ERROR))

    def _event_reported(self, cid: int, dw0: int) -> None:
        self.complete(self.sqs[0], cid, SUCCESS, dw0)

    # ---- what the commands use (lock held) ----

    def default_features(self) -> Features:
        return Features.defaults(self.identity.maxq, self.identity.write_cache)

    def warnings(self) -> int:
        return identify.temperature_warning(self.features.temperature_over,
                                            self.features.temperature_under)

    def health(self) -> identify.Health:
        counts = self.backend.stats()
        hours = int(time.monotonic() - self.started_at) // 3600
        return identify.Health(self.warnings(), counts["bytes_read"], counts["bytes_written"],
                               self.nvm.reads, self.nvm.writes, counts["io_errors"], hours)

    # ---- pause, state, the rest ----

    def quiesce(self) -> None:
        """Pause: wait for the back end's requests, then flush (the I/O thread and the
        vCPUs are stopped, so nothing new arrives)."""
        self.backend.drain()
        flushed = threading.Event()
        self.backend.flush(lambda status, nbytes: flushed.set())
        flushed.wait()

    def save_state(self) -> dict[str, Any]:
        self.backend.drain()  # outside the lock: completions take it
        with self.lock:
            if self.io_in_flight:
                raise DeviceError(f"{self.name}: {self.io_in_flight} commands still in flight")
            return {"pci": super().save_state(), "msix": self.msix.save_state(),
                    "controller": state.capture(self).to_fields(),
                    "image": record_image(self.backend.image).to_fields()}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        parts: dict[str, dict[str, Any]] = {}
        for name in ("pci", "msix", "controller"):
            part = fields.get(name)
            if not isinstance(part, dict):
                raise DeviceError(f"{self.name}: saved state lacks its {name!r} part")
            parts[name] = part
        if "image" not in fields:
            raise DeviceError(f"{self.name}: saved state lacks its 'image' part")
        check_restored_image(self.backend.image, ImageRecord.from_fields(fields["image"]),
                             self.name, "pci.{}.{}.{}.path".format(*self.address))
        with self.lock:
            saved = state.ControllerState.from_fields(parts["controller"], self.identity)
            super().restore_state(parts["pci"], version)
            self.msix.restore_state(parts["msix"])
            state.apply(self, saved)
            self._update_doorbells()
            self._update_intx()
        for doorbell in self.sq_doorbells:  # work posted while paused
            doorbell.signal()

    def boot_entries(self) -> list[BootEntry]:
        if self.bootindex is None:
            return []
        return [BootEntry(self.bootindex, pci_path(self.address, "nvme", "namespace@1,0"),
                          self.name)]

    def stats(self) -> dict[str, int]:
        with self.lock:
            own = {"commands": self.commands, "in_flight": self.io_in_flight,
                   "doorbells_through_vcpu_loop": self.doorbell_exits,
                   "msix_interrupts": self.msix_interrupts,
                   "intx_interrupts": self.intx_interrupts, "csts": self.csts}
        return {**own, **{f"block_{k}": v for k, v in self.backend.stats().items()}}

    def close(self) -> None:
        self.close_doorbells()
        self.msix.close()
        self.backend.close()
