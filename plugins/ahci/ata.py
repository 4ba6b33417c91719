# SPDX-License-Identifier: BSD-2-Clause
"""An ATA disk behind an AHCI port (ATA8-ACS / ACS-3), on the shared block back end.

Commands: IDENTIFY DEVICE; READ/WRITE DMA, SECTORS and MULTIPLE (28- and 48-bit),
READ/WRITE FPDMA QUEUED (NCQ, FUA as a flush after the write); READ VERIFY; FLUSH
CACHE (EXT); DATA SET MANAGEMENT with TRIM (holes punched in the image); SET FEATURES
(write cache, look-ahead, transfer mode, reverting to defaults); SET MULTIPLE MODE;
READ LOG (DMA) EXT of the log directory and the NCQ error log (page 10h); CHECK POWER
MODE (always active); IDLE, STANDBY and SLEEP, which do nothing. Everything else,
IDENTIFY PACKET DEVICE and PACKET included, aborts (ERR, ABRT).

A range past the end of the disk fails with IDNF, a host I/O error with UNC (reads)
or ABRT, a PRDT that is too short or reaches outside guest RAM with ABRT; nothing
touches the image unless the whole request is valid.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from hvf.dma import write_views
from hvf.errors import GuestMemoryError
from hvf.plugins.ahci import spec
from hvf.plugins.ahci.fis import Outcome, aborted, not_found
from hvf.plugins.ahci.identify import (
    DSM_MAX_BLOCKS,
    MAX_MULTIPLE,
    TransferMode,
    identify_disk,
    transfer_mode,
)
from hvf.plugins.ahci.spec import ER_ABRT, ER_UNC, LOG_SECTOR, SIG_ATA, ST_ERR, ST_OK, ST_RDY
from hvf.plugins.ahci.state import DiskState
from hvf.plugins.block.backend import Status

if TYPE_CHECKING:
    from hvf.plugins.ahci.request import Request
    from hvf.plugins.block.backend import BlockBackend
    from hvf.snapshot_api import Fields

_RANGE = struct.Struct("<Q")
_READS_28 = {spec.READ_DMA: None, spec.READ_SECTORS: True, spec.READ_MULTIPLE: True}
_READS_48 = {spec.READ_DMA_EXT: None, spec.READ_SECTORS_EXT: True,
             spec.READ_MULTIPLE_EXT: True}
_WRITES_28 = {spec.WRITE_DMA: None, spec.WRITE_SECTORS: False, spec.WRITE_MULTIPLE: False}
_WRITES_48 = {spec.WRITE_DMA_EXT: None, spec.WRITE_SECTORS_EXT: False,
              spec.WRITE_MULTIPLE_EXT: False}
#: Each read and write: PIO data-in (True), PIO data-out (False) or DMA (None).
_PIO = {**_READS_28, **_READS_48, **_WRITES_28, **_WRITES_48}
_MULTIPLE = {spec.READ_MULTIPLE, spec.READ_MULTIPLE_EXT, spec.WRITE_MULTIPLE,
             spec.WRITE_MULTIPLE_EXT}
_NO_OPS = {spec.STANDBY_IMMEDIATE, spec.IDLE_IMMEDIATE, spec.STANDBY, spec.IDLE, spec.SLEEP}
#: Pages of each general purpose log this disk keeps.
_LOGS = {spec.LOG_DIRECTORY: 1, spec.LOG_NCQ_ERROR: 1}


def _checksummed(page: bytearray) -> bytes:
    page[511] = -sum(page[:511]) & 0xFF
    return bytes(page)


class Disk:
    """An ATA disk on ``backend`` (which owns the image)."""

    signature = SIG_ATA
    ncq = True

    def __init__(self, backend: BlockBackend, *, serial: str, model: str, revision: str,
                 rotation: int = 0) -> None:
        image = backend.image
        self.backend = backend
        self.sector = image.sector.logical
        self.physical = image.sector.physical
        self.sectors = image.size // self.sector
        self.readonly = image.readonly
        self.trim = image.discard and not image.readonly
        self.serial, self.model, self.revision = serial, model, revision
        self.rotation = rotation
        self.state = DiskState()
        self._commands: dict[int, Callable[[Request], None]] = {
            spec.IDENTIFY_DEVICE: self._identify,
            spec.READ_FPDMA_QUEUED: self._queued, spec.WRITE_FPDMA_QUEUED: self._queued,
            spec.READ_VERIFY: self._verify, spec.READ_VERIFY_EXT: self._verify,
            spec.FLUSH_CACHE: self._flush, spec.FLUSH_CACHE_EXT: self._flush,
            spec.DATA_SET_MANAGEMENT: self._dsm, spec.SET_FEATURES: self._set_features,
            spec.SET_MULTIPLE_MODE: self._set_multiple, spec.READ_LOG_EXT: self._read_log,
            spec.READ_LOG_DMA_EXT: self._read_log,
            spec.CHECK_POWER_MODE: lambda r: r.finish(Outcome(count=0xFF)),
        }
        for table in (_READS_28, _READS_48, _WRITES_28, _WRITES_48):
            self._commands.update(dict.fromkeys(table, self._transfer))
        self._commands.update(dict.fromkeys(_NO_OPS, lambda r: r.finish(Outcome())))

    # ---- the port's side ----

    def execute(self, request: Request) -> None:
        handler = self._commands.get(request.fis.command)
        if handler is None:
            request.finish(aborted())
            return
        try:
            handler(request)
        except GuestMemoryError as e:
            request.port.host.log(f"{request.port.name}: command "
                                  f"{request.fis.command:#04x}: {e}")
            self._finish(request, aborted())

    def reset(self) -> None:
        """Settings survive a reset (as after SET FEATURES - disable reverting)."""

    def drain(self) -> None:
        self.backend.drain()

    def save(self) -> Fields:
        return self.state.to_fields()

    def restore(self, fields: Fields) -> None:
        self.state = DiskState.from_fields(fields)

    def close(self) -> None:
        self.backend.close()

    # ---- completions ----

    def _finish(self, request: Request, outcome: Outcome) -> None:
        if request.ncq and outcome.failed:
            self._log_ncq_error(request, outcome)
        request.finish(outcome)

    def _log_ncq_error(self, request: Request, outcome: Outcome) -> None:
        page = bytearray(LOG_SECTOR)
        page[0] = request.slot
        page[2], page[3] = outcome.status, outcome.error
        page[4:11] = request.fis.raw[4:11]
        page[12:14] = request.fis.raw[12:14]
        self.state.ncq_log = _checksummed(page)

    def _io_done(self, request: Request, *, write: bool, pio_in: bool | None = None,
                 then: Callable[[], None] | None = None,
                 transferred: int | None = None) -> Callable[[Status, int], None]:
        """The back end's completion for ``request``: its outcome, or on success ``then``
        (the next step); ``transferred`` overrides the back end's byte count."""
        def done(status: Status, nbytes: int) -> None:
            if status is Status.OK:
                if then is not None:
                    then()
                else:
                    count = nbytes if transferred is None else transferred
                    self._finish(request, Outcome(transferred=count, pio_in=pio_in))
            elif status is Status.OUT_OF_RANGE:
                self._finish(request, not_found())
            else:
                self._finish(request, Outcome(status=ST_RDY | ST_ERR,
                                              error=ER_ABRT if write else ER_UNC))
        return done

    # ---- commands ----

    def _identify(self, request: Request) -> None:
        state = self.state
        data = identify_disk(
            sectors=self.sectors, logical=self.sector, physical=self.physical,
            serial=self.serial, revision=self.revision, model=self.model, trim=self.trim,
            rotation=self.rotation, multiple=state.multiple,
            mode=TransferMode(state.mode_kind, state.mode), write_cache=state.write_cache,
            look_ahead=state.look_ahead)
        self._data_in(request, data, pio=True)

    def _data_in(self, request: Request, data: bytes, *, pio: bool) -> None:
        write_views(request.buffers(len(data)), data)
        self._finish(request, Outcome(transferred=len(data), pio_in=True if pio else None))

    def _range(self, request: Request) -> tuple[int, int]:
        """The LBA and sector count a read, write or verify addresses."""
        fis = request.fis
        command = fis.command
        if command in (spec.READ_FPDMA_QUEUED, spec.WRITE_FPDMA_QUEUED):
            return fis.lba48, fis.features16 or 0x10000
        if command in _READS_48 or command in _WRITES_48 or command == spec.READ_VERIFY_EXT:
            return fis.lba48, fis.count16 or 0x10000
        return fis.lba28, fis.count8 or 0x100

    def _transfer(self, request: Request) -> None:
        command = request.fis.command
        if command in _MULTIPLE and not self.state.multiple:
            self._finish(request, aborted())
            return
        self._move(request, write=command in _WRITES_28 or command in _WRITES_48,
                   pio_in=_PIO[command])

    def _queued(self, request: Request) -> None:
        if not request.ncq:
            self._finish(request, aborted())
            return
        self._move(request, write=request.fis.command == spec.WRITE_FPDMA_QUEUED, pio_in=None,
                   fua=bool(request.fis.device & 0x80))

    def _move(self, request: Request, *, write: bool, pio_in: bool | None,
              fua: bool = False) -> None:
        lba, count = self._range(request)
        if lba + count > self.sectors:
            self._finish(request, not_found())
            return
        if write and self.readonly:
            self._finish(request, aborted())
            return
        length = count * self.sector
        views = request.buffers(length)
        offset = lba * self.sector
        if not write:
            self.backend.read(offset, views, self._io_done(request, write=False, pio_in=pio_in))
            return
        if not fua:
            self.backend.write(offset, views, self._io_done(request, write=True, pio_in=pio_in))
            return
        # durable before it completes: the write, then a flush
        flushed = self._io_done(request, write=True, transferred=length)
        self.backend.write(offset, views, self._io_done(
            request, write=True, then=lambda: self.backend.flush(flushed)))

    def _verify(self, request: Request) -> None:
        lba, count = self._range(request)
        self._finish(request, Outcome() if lba + count <= self.sectors else not_found())

    def _flush(self, request: Request) -> None:
        self.backend.flush(self._io_done(request, write=True))

    def _dsm(self, request: Request) -> None:
        fis = request.fis
        blocks = fis.count16
        if not self.trim or not fis.features & spec.DSM_TRIM or not 0 < blocks <= DSM_MAX_BLOCKS:
            self._finish(request, aborted())
            return
        raw = b"".join(request.buffers(blocks * LOG_SECTOR))
        ranges = []
        for (entry,) in _RANGE.iter_unpack(raw):
            lba, count = entry & (1 << 48) - 1, entry >> 48
            if count:
                if lba + count > self.sectors:
                    self._finish(request, aborted())
                    return
                ranges.append((lba, count))
        if not ranges:
            self._finish(request, Outcome(transferred=len(raw)))
            return
        pending = [len(ranges), ST_OK]

        def done(status: Status, nbytes: int) -> None:
            if status is not Status.OK:
                pending[1] = ST_RDY | ST_ERR
            pending[0] -= 1
            if not pending[0]:
                failed = pending[1] & ST_ERR
                self._finish(request, aborted() if failed else Outcome(transferred=len(raw)))

        for lba, count in ranges:
            self.backend.discard(lba * self.sector, count * self.sector, done)

    def _set_features(self, request: Request) -> None:
        fis, state = request.fis, self.state
        sub = fis.features
        if sub in (spec.SF_ENABLE_WRITE_CACHE, spec.SF_DISABLE_WRITE_CACHE):
            state.write_cache = sub == spec.SF_ENABLE_WRITE_CACHE
        elif sub in (spec.SF_ENABLE_READ_LOOK_AHEAD, spec.SF_DISABLE_READ_LOOK_AHEAD):
            state.look_ahead = sub == spec.SF_ENABLE_READ_LOOK_AHEAD
        elif sub == spec.SF_SET_TRANSFER_MODE:
            mode = transfer_mode(fis.count8)
            if mode is None:
                self._finish(request, aborted())
                return
            state.mode_kind, state.mode = mode.kind, mode.mode
        elif sub not in (spec.SF_DISABLE_REVERTING, spec.SF_ENABLE_REVERTING):
            self._finish(request, aborted())
            return
        self._finish(request, Outcome())

    def _set_multiple(self, request: Request) -> None:
        count = request.fis.count8
        if count & (count - 1) or count > MAX_MULTIPLE:
            self._finish(request, aborted())
            return
        self.state.multiple = count
        self._finish(request, Outcome())

    def _read_log(self, request: Request) -> None:
        fis = request.fis
        address, page, count = fis.raw[4], fis.raw[5] | fis.raw[9] << 8, fis.count16
        pages = _LOGS.get(address, 0)
        if not count or page + count > pages:
            self._finish(request, aborted())
            return
        if address == spec.LOG_DIRECTORY:
            directory = bytearray(LOG_SECTOR)
            directory[0] = 1  # general purpose logging version 1
            for log, size in _LOGS.items():
                if log:
                    directory[2 * log] = size
            data = bytes(directory)
        else:
            data = self.state.ncq_log or _checksummed(bytearray(LOG_SECTOR))
            self.state.ncq_log = b""
        self._data_in(request, data, pio=fis.command == spec.READ_LOG_EXT)
