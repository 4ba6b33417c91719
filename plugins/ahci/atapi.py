# SPDX-License-Identifier: BSD-2-Clause
"""An ATAPI CD-ROM behind an AHCI port: a read-only medium of 2048-byte blocks.

ATA commands: IDENTIFY PACKET DEVICE, PACKET, DEVICE RESET, SET FEATURES (transfer
mode), CHECK POWER MODE and the power no-ops; IDENTIFY DEVICE aborts with the ATAPI
signature in the registers, as a packet device does. PACKET carries a 12-byte SCSI
command: TEST UNIT READY, REQUEST SENSE, INQUIRY, READ CAPACITY, READ(10)/(12), READ
TOC (formats 0-2), GET CONFIGURATION, MODE SENSE(10), GET EVENT STATUS NOTIFICATION,
START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL and REPORT LUNS; anything else is
ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE, a write DATA PROTECT. A failed
command ends with ERR and the sense key in the error register; the sense data waits
for REQUEST SENSE. Data moves by DMA or PIO as the PACKET's feature bit says, cut to
the allocation length and the PRDT.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from hvf.dma import write_views
from hvf.errors import GuestMemoryError
from hvf.plugins.ahci import mmc, spec
from hvf.plugins.ahci.fis import Outcome, aborted
from hvf.plugins.ahci.identify import TransferMode, identify_packet, transfer_mode
from hvf.plugins.ahci.mmc import CheckCondition, be16, be32
from hvf.plugins.ahci.spec import (
    ATAPI_REASON_COMPLETE,
    CD_SECTOR,
    SIG_ATAPI,
    SK_ILLEGAL_REQUEST,
    ST_ERR,
    ST_OK,
    ST_RDY,
)
from hvf.plugins.ahci.state import CdromState
from hvf.plugins.block.backend import Status

if TYPE_CHECKING:
    from hvf.plugins.ahci.request import Request
    from hvf.plugins.block.backend import BlockBackend
    from hvf.snapshot_api import Fields

_POWER = {spec.STANDBY_IMMEDIATE, spec.IDLE_IMMEDIATE, spec.STANDBY, spec.IDLE, spec.SLEEP}
#: Commands whose allocation length is a big-endian u16 at byte 7 (others: see _reply).
_ALLOC_AT_7 = {spec.READ_TOC, spec.GET_CONFIGURATION, spec.GET_EVENT_STATUS_NOTIFICATION,
               spec.MODE_SENSE_10}


class Cdrom:
    """A CD-ROM drive with the image on ``backend`` as its (fixed) medium."""

    signature = SIG_ATAPI
    ncq = False

    def __init__(self, backend: BlockBackend, *, serial: str, model: str, revision: str,
                 vendor: str, product: str) -> None:
        self.backend = backend
        self.blocks = backend.image.size // CD_SECTOR
        self.serial, self.model, self.revision = serial, model, revision
        self.vendor, self.product = vendor, product
        self.state = CdromState()
        self._scsi: dict[int, Callable[[Request, bytes], bytes | None]] = {
            spec.TEST_UNIT_READY: lambda r, c: None,
            spec.REQUEST_SENSE: self._request_sense,
            spec.INQUIRY: lambda r, c: mmc.inquiry(c, vendor=self.vendor, product=self.product,
                                                   revision=self.revision, serial=self.serial),
            spec.READ_CAPACITY_10: lambda r, c: struct.pack(">II", self.blocks - 1, CD_SECTOR),
            spec.READ_TOC: lambda r, c: mmc.read_toc(c, self.blocks),
            spec.GET_CONFIGURATION: lambda r, c: mmc.get_configuration(c, self.blocks),
            spec.MODE_SENSE_10: lambda r, c: mmc.mode_sense(c, locked=self.state.locked),
            spec.GET_EVENT_STATUS_NOTIFICATION: lambda r, c: mmc.event_status(c),
            spec.START_STOP_UNIT: self._start_stop,
            spec.PREVENT_ALLOW_MEDIUM_REMOVAL: self._prevent_allow,
            spec.REPORT_LUNS: lambda r, c: mmc.report_luns(),
        }

    # ---- the port's side ----

    def execute(self, request: Request) -> None:
        command = request.fis.command
        try:
            if command == spec.PACKET:
                self._packet(request)
            elif command == spec.IDENTIFY_PACKET_DEVICE:
                data = identify_packet(serial=self.serial, revision=self.revision,
                                       model=self.model, mode=self._mode)
                request.finish(Outcome(transferred=self._copy_in(request, data), pio_in=True))
            elif command == spec.IDENTIFY_DEVICE:
                request.finish(aborted(signature=SIG_ATAPI))
            elif command == spec.DEVICE_RESET:
                self.reset()
                request.finish(Outcome(status=0, error=1, signature=SIG_ATAPI))
            elif command == spec.SET_FEATURES:
                self._set_features(request)
            elif command == spec.CHECK_POWER_MODE:
                request.finish(Outcome(count=0xFF))
            elif command in _POWER:
                request.finish(Outcome())
            else:
                request.finish(aborted())
        except GuestMemoryError as e:
            request.port.host.log(f"{request.port.name}: command {command:#04x}: {e}")
            self._check(request, CheckCondition(SK_ILLEGAL_REQUEST,
                                                spec.ASC_INVALID_FIELD_IN_CDB))

    def reset(self) -> None:
        """A device reset clears the sense data and unlocks the tray."""
        state = self.state
        state.sense_key = state.asc = state.ascq = 0
        state.locked = False

    def drain(self) -> None:
        self.backend.drain()

    def save(self) -> Fields:
        return self.state.to_fields()

    def restore(self, fields: Fields) -> None:
        self.state = CdromState.from_fields(fields)

    def close(self) -> None:
        self.backend.close()

    @property
    def _mode(self) -> TransferMode:
        return TransferMode(self.state.mode_kind, self.state.mode)

    def _set_features(self, request: Request) -> None:
        fis = request.fis
        mode = transfer_mode(fis.count8)
        if fis.features != spec.SF_SET_TRANSFER_MODE or mode is None:
            request.finish(aborted())
            return
        self.state.mode_kind, self.state.mode = mode.kind, mode.mode
        request.finish(Outcome())

    # ---- PACKET ----

    def _packet(self, request: Request) -> None:
        cdb = request.acmd[:12]
        opcode = cdb[0]
        if opcode != spec.REQUEST_SENSE:
            self._set_sense(0, 0, 0)
        if opcode in (spec.READ_10, spec.READ_12):
            self._read(request, cdb)
            return
        handler = self._scsi.get(opcode)
        try:
            if handler is None:
                if opcode in (spec.WRITE_10, spec.WRITE_12):
                    raise CheckCondition(spec.SK_DATA_PROTECT, spec.ASC_WRITE_PROTECTED)
                raise CheckCondition(SK_ILLEGAL_REQUEST, spec.ASC_INVALID_OPCODE)
            data = handler(request, cdb)
        except CheckCondition as e:
            self._check(request, e)
            return
        if data is None:
            request.finish(self._good(0, request))
            return
        copied = self._copy_in(request, data[:self._allocation(cdb)])
        request.finish(self._good(copied, request))

    @staticmethod
    def _dma(request: Request) -> bool:
        return bool(request.fis.features & 0x01)

    @staticmethod
    def _allocation(cdb: bytes) -> int:
        opcode = cdb[0]
        if opcode in _ALLOC_AT_7:
            return be16(cdb, 7)
        if opcode == spec.INQUIRY:
            return be16(cdb, 3)
        if opcode == spec.REPORT_LUNS:
            return be32(cdb, 6)
        if opcode == spec.REQUEST_SENSE:
            return cdb[4]
        return 1 << 16  # READ CAPACITY: fixed 8 bytes

    def _good(self, transferred: int, request: Request) -> Outcome:
        return Outcome(status=ST_OK, transferred=transferred, count=ATAPI_REASON_COMPLETE,
                       pio_in=None if self._dma(request) or not transferred else True)

    @staticmethod
    def _copy_in(request: Request, data: bytes) -> int:
        """Copy ``data`` into the PRDT's buffers, as much as they hold."""
        return write_views(request.buffers(len(data), exact=False), data)

    def _set_sense(self, key: int, asc: int, ascq: int) -> None:
        state = self.state
        state.sense_key, state.asc, state.ascq = key, asc, ascq

    def _check(self, request: Request, condition: CheckCondition) -> None:
        self._set_sense(condition.sense_key, condition.asc, condition.ascq)
        request.finish(Outcome(status=ST_RDY | ST_ERR, error=condition.sense_key << 4,
                               count=ATAPI_REASON_COMPLETE))

    def _request_sense(self, request: Request, cdb: bytes) -> bytes:
        state = self.state
        data = mmc.sense_data(state.sense_key, state.asc, state.ascq)
        self._set_sense(0, 0, 0)
        return data

    def _start_stop(self, request: Request, cdb: bytes) -> None:
        if cdb[4] & 0x03 == 0x02:  # LOEJ without START: eject
            raise CheckCondition(SK_ILLEGAL_REQUEST, spec.ASC_MEDIUM_REMOVAL_FAILED,
                                 0x02 if self.state.locked else 0x00)

    def _prevent_allow(self, request: Request, cdb: bytes) -> None:
        self.state.locked = bool(cdb[4] & 0x01)

    def _read(self, request: Request, cdb: bytes) -> None:
        lba = be32(cdb, 2)
        count = be16(cdb, 7) if cdb[0] == spec.READ_10 else be32(cdb, 6)
        if lba + count > self.blocks:
            self._check(request, CheckCondition(SK_ILLEGAL_REQUEST, spec.ASC_LBA_OUT_OF_RANGE))
            return
        if not count:
            request.finish(self._good(0, request))
            return
        length = count * CD_SECTOR
        views = request.buffers(length)

        def done(status: Status, nbytes: int) -> None:
            if status is Status.OK:
                request.finish(self._good(length, request))
            else:
                self._check(request, CheckCondition(spec.SK_MEDIUM_ERROR,
                                                    spec.ASC_UNRECOVERED_READ_ERROR))

        self.backend.read(lba * CD_SECTOR, views, done)
