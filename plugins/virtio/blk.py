# SPDX-License-Identifier: BSD-2-Clause
"""virtio-blk (virtio 1.x §5.2): a disk on the shared block back end.

``-s N,virtio-blk,PATH[,ro][,nocache][,direct][,nodelete][,sectorsize=L[/P]][,ser=ID]``
``[,bootindex=N]`` as in bhyve (configuration ``pci.B.S.F.path``, ``.ro``, ``.ser``,
``.bootindex``, ...); ``bootindex`` puts the disk in the firmware's boot order as
``/pci@i0cf8/scsi@S/disk@0,0`` (:mod:`hvf.bootorder`). One request
queue, or ``num_queues=N`` of them (``VIRTIO_BLK_F_MQ``). Plain reads and writes
go through the C path (:mod:`hvf.plugins.virtio.blkpath`: taken on the I/O thread,
served, returned and signalled by POSIX threads, no GIL) unless the disk has
``aio=io_uring``. Every other chain the I/O thread takes, checks and hands to the
:class:`~hvf.plugins.block.backend.BlockBackend` with the guest's buffers as views (no
copy); the completion, on a worker thread, writes the status byte, returns the chain
and interrupts, under the device lock. A request that breaks the rules (no status
byte, a short header, a length not in whole 512-byte sectors, a range past the end, a
write to a read-only disk) gets ``IOERR``; an unknown type ``UNSUPP``. Snapshots drain
the back end first, so nothing is in flight in a saved state.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any

import attrs

from hvf.bootorder import BootEntry, parse_bootindex, pci_path
from hvf.config import Config
from hvf.dma import write_views
from hvf.errors import ConfigError, DeviceError
from hvf.plugins.block.backend import Status
from hvf.plugins.block.engine import new_backend
from hvf.plugins.block.image import Image, open_image
from hvf.plugins.block.options import ImageOptions, default_serial, legacy_config
from hvf.plugins.block.record import check_restored_image, record_image
from hvf.plugins.virtio.blk_state import BlkState, record_nothing
from hvf.plugins.virtio.blkpath import BlkPath
from hvf.plugins.virtio.pci import ISR_QUEUE, VirtioPciDevice
from hvf.plugins.virtio.spec import F_RING_INDIRECT_DESC, NO_VECTOR
from hvf.snapshot_api import Fields

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.plugins.virtio.queue import Chain, SplitQueue
    from hvf.vm import Machine

TYPE_BLOCK = 2
SECTOR = 512
QUEUE_SIZE = 256

F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
#: Flags of a discard / write-zeroes segment.
SEGMENT_UNMAP = 1

HEADER = struct.Struct("<IIQ")  # type, reserved, sector
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
ID_BYTES = 20
#: Bytes per guest buffer (``size_max``), and segments per request (``seg_max``).
SIZE_MAX = 1 << 20
SEG_MAX = QUEUE_SIZE - 2
#: Most request queues a disk offers (``num_queues=N``).
MAX_QUEUES = 16
#: Discard / write-zeroes limits: sectors per segment and segments per request.
MAX_RANGE_SECTORS = (1 << 32) - 1 & ~7
MAX_RANGE_SEGMENTS = 32

_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIIIB3x")

_BACKEND_STATUS = {Status.OK: S_OK, Status.UNSUPPORTED: S_UNSUPP}


def _split(views: list[memoryview], count: int) -> tuple[list[memoryview], list[memoryview]]:
    """The first ``count`` bytes of ``views`` and the rest, as views."""
    head: list[memoryview] = []
    for i, view in enumerate(views):
        if count <= 0:
            return head, views[i:]
        if len(view) > count:
            return [*head, view[:count]], [view[count:], *views[i + 1:]]
        head.append(view)
        count -= len(view)
    return head, []


@attrs.define(eq=False)
class _Request:
    """One chain being served: the status byte to set and the back-end requests it
    still waits for."""

    queue: SplitQueue
    chain: Chain
    status_byte: memoryview
    written: int
    pending: int = 1
    status: int = S_OK


class VirtioBlk(VirtioPciDevice):
    device_type = TYPE_BLOCK
    state_version = 2
    state_upgrades = {1: record_nothing}
    class_code = 0x010000  # mass storage, SCSI (as other virtio-blk devices)
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, name: str, image: Image, serial: bytes, *, threads: int = 4,
                 bootindex: int | None = None, queues: int = 1) -> None:
        self.queue_max_sizes = (QUEUE_SIZE,) * queues
        super().__init__(name)
        self.image = image
        self.serial = serial
        self.bootindex = bootindex
        self.capacity = image.size // SECTOR
        self.readonly = image.readonly
        self.discard = image.discard and not image.readonly
        self.device_features = (F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_TOPOLOGY | F_FLUSH
                                | (F_RO if self.readonly else 0)
                                | (F_DISCARD | F_WRITE_ZEROES if self.discard else 0)
                                | (F_MQ if queues > 1 else 0))
        self.backend = new_backend(image, threads=threads, name=name)
        #: Chains handed to the back end and not yet returned to the guest.
        self.in_flight = 0
        #: Requests refused before reaching the back end (IOERR or UNSUPP).
        self.refused = 0
        #: The C path (attach makes it), and the eventfd its threads signal for INTx.
        self.path: BlkPath | None = None
        self._intx_event = -1

    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        if self.image.aio == "io_uring":
            return
        self.path = BlkPath(ctx.memory, self.image, self.capacity)
        self._intx_event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ctx.loop.add_reader(self._intx_event, self._intx_signalled)

    def _intx_signalled(self) -> None:
        """The C path returned chains while the driver uses INTx (I/O thread; before
        a save, so that the saved ISR holds what the guest has not been told)."""
        try:
            os.eventfd_read(self._intx_event)
        except BlockingIOError:
            return
        with self.lock:
            if not self.msix.enabled:  # else stale: the driver has turned MSI-X on
                self._interrupt(NO_VECTOR, ISR_QUEUE)

    # ---- configuration ----

    def device_config(self) -> bytes:
        sector = self.image.sector
        per_physical = sector.physical // sector.logical
        align = sector.logical // SECTOR
        limit = MAX_RANGE_SECTORS if self.discard else 0
        segments = MAX_RANGE_SEGMENTS if self.discard else 0
        return _CONFIG.pack(
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,  # geometry (not offered)
            sector.logical,
            per_physical.bit_length() - 1, 0, per_physical, 0,  # topology
            0, 0, len(self.queues),  # writeback, unused, num_queues
            limit, segments, align, limit, segments, 1 if self.discard else 0)

    # ---- requests (I/O thread, lock held) ----

    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        path = self.path
        irqfd = self._irqfd(index)
        indirect = bool(self.negotiated & F_RING_INDIRECT_DESC)
        while True:
            queue.disable_notifications()
            refused = False
            while path is None or path.serve(index, queue, indirect, irqfd):
                if (chain := queue.pop()) is None:
                    break
                refused |= self._start(queue, chain)
            if refused and path is None:
                self.interrupt_queue(index)
            if not queue.enable_notifications():
                return

    def _return(self, queue: SplitQueue, chain: Chain, written: int, *,
                interrupt: bool = True) -> None:
        """Hand a served chain back (lock held), unless its queue is gone (a reset).
        Without the C path, ``interrupt=False`` leaves the interrupt to the caller,
        once for its batch; the C path decides as for its own chains."""
        if self.path is None and not interrupt:
            queue.push(chain, written)
            return
        index = next((i for i, q in enumerate(self.queues) if q is queue), None)
        if index is None:
            return
        if self.path is not None:
            self.path.push(index, queue, chain.head, written)
        else:
            queue.push(chain, written)
            self.interrupt_queue(index)

    def _start(self, queue: SplitQueue, chain: Chain) -> bool:
        """Serve ``chain``; True if it was completed at once (refused)."""
        if not chain.writable_length:
            self.refused += 1
            self._return(queue, chain, 0, interrupt=False)  # nowhere to put a status
            return True
        writable = [view for view in chain.writable if len(view)]
        data_in, status_part = _split(writable, chain.writable_length - 1)
        request = _Request(queue, chain, status_part[0], 1)
        status = self._submit(request, chain, data_in)
        if status is None:
            return False
        self.refused += 1
        request.status_byte[0] = status
        self._return(queue, chain, request.written, interrupt=False)
        return True

    def _submit(self, request: _Request, chain: Chain, data_in: list[memoryview]) -> int | None:
        """Hand the request to the back end (None), or the status refusing it."""
        if chain.readable_length < HEADER.size:
            return S_IOERR
        header, data_out = _split(chain.readable, HEADER.size)
        kind, _reserved, sector = HEADER.unpack(b"".join(header))
        if kind == T_IN:
            return self._transfer(request, sector, data_in, write=False)
        if kind == T_OUT:
            return self._transfer(request, sector, data_out, write=True)
        if kind == T_FLUSH:
            self._go(request, 1)
            self.backend.flush(lambda s, n: self._done(request, s))
            return None
        if kind == T_GET_ID:  # the NUL-padded ID, however large the guest's buffer
            request.written += write_views(data_in, self.serial.ljust(ID_BYTES, b"\0"))
            return S_OK
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            return self._ranges(request, kind, data_out)
        return S_UNSUPP

    def _in_range(self, sector: int, sectors: int) -> bool:
        return sector + sectors <= self.capacity

    def _transfer(self, request: _Request, sector: int, views: list[memoryview], *,
                  write: bool) -> int | None:
        length = sum(map(len, views))
        if length % SECTOR or not self._in_range(sector, length // SECTOR):
            return S_IOERR
        if write and self.readonly:
            return S_IOERR
        self._go(request, 1)
        if write:
            self.backend.write(sector * SECTOR, views, lambda s, n: self._done(request, s))
        else:
            request.written += length
            self.backend.read(sector * SECTOR, views, lambda s, n: self._done(request, s))
        return None

    def _ranges(self, request: _Request, kind: int, data: list[memoryview]) -> int | None:
        if not self.discard:
            return S_IOERR if self.readonly else S_UNSUPP
        length = sum(map(len, data))  # checked before anything is copied
        if not length or length % SEGMENT.size or length // SEGMENT.size > MAX_RANGE_SEGMENTS:
            return S_IOERR
        raw = b"".join(data)
        segments = [SEGMENT.unpack_from(raw, o) for o in range(0, len(raw), SEGMENT.size)]
        for sector, sectors, flags in segments:
            if flags & ~SEGMENT_UNMAP or (kind == T_DISCARD and flags):
                return S_UNSUPP
            if sectors > MAX_RANGE_SECTORS or not self._in_range(sector, sectors):
                return S_IOERR
        self._go(request, len(segments))
        for sector, sectors, flags in segments:
            if kind == T_DISCARD:
                self.backend.discard(sector * SECTOR, sectors * SECTOR,
                                     lambda s, n: self._done(request, s))
            else:
                self.backend.write_zeroes(sector * SECTOR, sectors * SECTOR,
                                          bool(flags & SEGMENT_UNMAP),
                                          lambda s, n: self._done(request, s))
        return None

    def _go(self, request: _Request, pending: int) -> None:
        request.pending = pending
        self.in_flight += 1

    # ---- completions (a back-end worker thread) ----

    def _done(self, request: _Request, status: Status) -> None:
        with self.lock:
            if status is not Status.OK and request.status == S_OK:
                request.status = _BACKEND_STATUS.get(status, S_IOERR)
            request.pending -= 1
            if request.pending:
                return
            self.in_flight -= 1
            request.status_byte[0] = request.status
            if request.status != S_OK:
                request.written = 1
            # after a reset the chain belongs to a driver that is gone: not returned
            self._return(request.queue, request.chain, request.written)

    # ---- the rest ----

    def boot_entries(self) -> list[BootEntry]:
        if self.bootindex is None:
            return []
        return [BootEntry(self.bootindex, pci_path(self.address, "scsi", "disk@0,0"),
                          self.name)]

    def stats(self) -> dict[str, int]:
        block = self.backend.stats()
        fast = self.path.stats() if self.path is not None else {}
        for key in ("reads", "writes", "bytes_read", "bytes_written", "io_errors",
                    "in_flight"):
            block[key] += fast.get(key, 0)
        return {**super().stats(), "in_flight": self.in_flight, "refused": self.refused,
                "c_path_interrupts": fast.get("interrupts", 0),
                **{f"block_{k}": v for k, v in block.items()}}

    def interrupt_routes_changed(self) -> None:
        if self.path is not None:
            for index in range(len(self.queues)):
                self.path.set_irqfd(index, self._irqfd(index))

    def _irqfd(self, index: int) -> int:
        """Where the C path signals queue ``index``: its MSI-X irqfd, the INTx eventfd
        the I/O thread watches, or -1 (a queue without a vector)."""
        irqfd = self.queue_irqfd(index)
        return self._intx_event if irqfd is None else irqfd

    def device_reset(self) -> None:
        if self.path is not None:
            self.path.forget_queues()

    def needs_reset(self, why: str) -> None:
        if self.path is not None:  # no completion touches the queues from now on
            self.path.forget_queues()
        super().needs_reset(why)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every request taken has completed (not with the lock held:
        completions take it); False if the Python path's ``timeout`` passed first."""
        if self.path is not None:
            self.path.drain()
        return self.backend.drain(timeout)

    def save_state(self) -> dict[str, Any]:
        self.drain()
        if self.path is not None:
            self.path.sync_used()
            self._intx_signalled()
        return super().save_state()

    def save_device(self) -> Fields:
        in_flight = self.in_flight + (self.path.stats().get("in_flight", 0) if self.path else 0)
        if in_flight:
            raise DeviceError(f"{self.name}: {in_flight} requests still in flight")
        return BlkState(record_image(self.image)).to_fields()

    def restore_device(self, fields: Fields, version: int) -> None:
        try:
            state = BlkState.from_fields(fields)
        except ValueError as e:
            raise DeviceError(f"{self.name}: {e}") from None
        check_restored_image(self.image, state.image, self.name,
                             "pci.{}.{}.{}.path".format(*self.address))

    def close(self) -> None:
        self.backend.drain()  # its completions return chains through the C path
        with self.lock:
            path, self.path = self.path, None
        if path is not None:
            self.ctx.loop.remove_reader(self._intx_event)
            path.close()
            os.close(self._intx_event)
        super().close()
        self.backend.close()


def parse(conf: list[str]) -> dict[str, str]:
    """``PATH[,OPTION...]`` as configuration values (``path``, ``ro``, ``ser``, ...)."""
    return legacy_config(conf, "virtio-blk")


def create(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> VirtioBlk:
    where = "virtio-blk@pci.{}.{}.{}".format(*slot)
    values = Config({k: v for k, v in config.items() if isinstance(v, str)})
    path = values.get("path")
    if not path:
        raise ConfigError(f"{where}: no disk image given ('path')")
    ser = values.get("ser")
    if ser is not None and (len(ser) > ID_BYTES or not ser.isascii()):
        raise ConfigError(f"{where}: ser= takes at most {ID_BYTES} ASCII characters")
    bootindex = parse_bootindex(values.get("bootindex"), where)
    queues = values.get("num_queues", "1")
    if not queues.isdigit() or not 1 <= int(queues) <= MAX_QUEUES:
        raise ConfigError(f"{where}: num_queues= takes 1 to {MAX_QUEUES}, not '{queues}'")
    image = open_image(path, ImageOptions.from_config(values))
    try:
        return VirtioBlk(where, image, (ser if ser is not None else default_serial(path)).encode(),
                         bootindex=bootindex, queues=int(queues))
    except BaseException:
        image.close()
        raise
