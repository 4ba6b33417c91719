# SPDX-License-Identifier: BSD-2-Clause
"""The data a CD-ROM drive returns for SPC/MMC commands: INQUIRY, READ TOC, GET
CONFIGURATION, MODE SENSE pages, GET EVENT STATUS NOTIFICATION, REQUEST SENSE.

Each builder takes the CDB's fields and the medium's size in 2048-byte blocks and
returns the full response (the caller cuts it to the allocation length), or raises
:class:`CheckCondition` with the sense to report.
"""

from __future__ import annotations

import struct

from hvf.plugins.ahci.spec import (
    ASC_INVALID_FIELD_IN_CDB,
    ASC_SAVING_PARAMETERS_NOT_SUPPORTED,
    SK_ILLEGAL_REQUEST,
)

#: Disc sizes above this many blocks are DVDs (profile 0010h), others CDs (0008h).
CD_MAX_BLOCKS = 80 * 60 * 75
PROFILE_CD_ROM = 0x0008
PROFILE_DVD_ROM = 0x0010
#: Frames before LBA 0 in MSF addresses (the 2-second pregap).
MSF_OFFSET = 150
LEAD_OUT = 0xAA
DATA_TRACK = 0x14  # ADR 1 (position), control 4 (data track, recorded uninterrupted)


class CheckCondition(Exception):  # noqa: N818 (SCSI's name for the status)
    """The command ends with CHECK CONDITION and this sense."""

    def __init__(self, sense_key: int, asc: int, ascq: int = 0) -> None:
        super().__init__(f"sense {sense_key:x}/{asc:02x}/{ascq:02x}")
        self.sense_key, self.asc, self.ascq = sense_key, asc, ascq


def invalid_field() -> CheckCondition:
    return CheckCondition(SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)


def be16(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 2], "big")


def be32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 4], "big")


def _text(text: str, length: int) -> bytes:
    return text.encode("ascii")[:length].ljust(length, b" ")


def sense_data(sense_key: int, asc: int, ascq: int) -> bytes:
    """Fixed-format sense data (SPC §4.5.3), current errors."""
    data = bytearray(18)
    data[0] = 0x70
    data[2] = sense_key
    data[7] = 10
    data[12], data[13] = asc, ascq
    return bytes(data)


def inquiry(cdb: bytes, *, vendor: str, product: str, revision: str, serial: str) -> bytes:
    """Standard INQUIRY data, or VPD pages 00h (supported pages) and 80h (serial)."""
    if cdb[1] & 0x02:  # CmdDt (obsolete)
        raise invalid_field()
    if cdb[1] & 0x01:
        page = cdb[2]
        if page == 0x00:
            return bytes([0x05, 0x00, 0x00, 2, 0x00, 0x80])
        if page == 0x80:
            raw = serial.encode("ascii")
            return bytes([0x05, 0x80, 0x00, len(raw)]) + raw
        raise invalid_field()
    if cdb[2]:
        raise invalid_field()
    header = bytes([0x05, 0x80, 0x05, 0x32, 31, 0, 0, 0])  # CD/DVD, removable, SPC-3
    return header + _text(vendor, 8) + _text(product, 16) + _text(revision, 4)


def _address(lba: int, msf: bool) -> bytes:
    if not msf:
        return struct.pack(">I", lba)
    frames = lba + MSF_OFFSET
    return bytes([0, frames // (75 * 60), frames // 75 % 60, frames % 75])


def read_toc(cdb: bytes, blocks: int) -> bytes:
    """READ TOC/PMA/ATIP formats 0 (TOC), 1 (session information), 2 (full TOC) of a
    single-session disc with one data track."""
    msf = bool(cdb[1] & 0x02)
    fmt = cdb[2] & 0x0F or cdb[9] >> 6
    track = cdb[6]
    if fmt == 0:
        if track > 1 and track != LEAD_OUT:
            raise invalid_field()
        body = b""
        if track <= 1:
            body += bytes([0, DATA_TRACK, 1, 0]) + _address(0, msf)
        body += bytes([0, DATA_TRACK, LEAD_OUT, 0]) + _address(blocks, msf)
        return struct.pack(">HBB", len(body) + 2, 1, 1) + body
    if fmt == 1:
        body = bytes([0, DATA_TRACK, 1, 0]) + _address(0, msf)
        return struct.pack(">HBB", len(body) + 2, 1, 1) + body
    if fmt == 2:
        lead_out = _address(blocks, True)[1:]
        first = _address(0, True)[1:]
        points = ((0xA0, bytes([1, 0x00, 0])), (0xA1, bytes([1, 0, 0])),
                  (0xA2, lead_out), (1, first))
        body = b"".join(bytes([1, DATA_TRACK, 0, point, 0, 0, 0, 0]) + where
                        for point, where in points)
        return struct.pack(">HBB", len(body) + 2, 1, 1) + body
    raise invalid_field()


def _feature(code: int, version: int, data: bytes, *, current: bool = True) -> bytes:
    flags = version << 2 | 0x02 | (0x01 if current else 0)  # persistent
    return struct.pack(">HBB", code, flags, len(data)) + data


def get_configuration(cdb: bytes, blocks: int) -> bytes:
    """GET CONFIGURATION: the profile list (CD-ROM and DVD-ROM, one current by size),
    Core (ATAPI), Morphing, Removable Medium (tray), Random Readable, CD Read and DVD
    Read. RT 0 lists features from the start number, 1 the current ones, 2 just one."""
    rt = cdb[1] & 0x03
    start = be16(cdb, 2)
    if rt == 3:
        raise invalid_field()
    dvd = blocks > CD_MAX_BLOCKS
    profile = PROFILE_DVD_ROM if dvd else PROFILE_CD_ROM
    profiles = b"".join(struct.pack(">HBx", p, int(p == profile))
                        for p in (PROFILE_DVD_ROM, PROFILE_CD_ROM))
    features = [
        (0x0000, _feature(0x0000, 0, profiles)),
        (0x0001, _feature(0x0001, 2, struct.pack(">IB3x", 2, 0))),  # ATAPI
        (0x0002, _feature(0x0002, 1, bytes(4))),
        (0x0003, _feature(0x0003, 0, bytes([0x29, 0, 0, 0]))),  # tray, eject, lock
        (0x0010, _feature(0x0010, 0, struct.pack(">IHBx", 2048, 1, 0))),
        (0x001E, _feature(0x001E, 2, bytes(4), current=not dvd)),
        (0x001F, _feature(0x001F, 0, bytes(4), current=dvd)),
    ]
    chosen = b"".join(body for code, body in features
                      if (code == start if rt == 2 else code >= start)
                      and (rt != 1 or body[2] & 0x01))
    return struct.pack(">I2xH", len(chosen) + 4, profile) + chosen


def _page(code: int, changeable: bool, locked: bool) -> bytes:
    if code == 0x01:  # read-write error recovery
        body = bytes(10) if changeable else bytes([0, 5, 0, 0, 0, 0, 0, 0, 0, 0])
        return bytes([0x01, 10]) + body
    body = bytearray(18)  # 2Ah, CD/DVD capabilities and mechanical status
    if not changeable:
        body[0] = 0x08                          # reads DVD-ROM (and CD-ROM)
        body[2] = 0x40                          # multi-session
        body[4] = 0x29 | (0x02 if locked else 0)  # tray, eject, lock (state)
        struct.pack_into(">HHHH", body, 6, 706, 0, 512, 706)  # speeds (kB/s), buffer
    return bytes([0x2A, 18]) + bytes(body)


def mode_sense(cdb: bytes, *, locked: bool) -> bytes:
    """MODE SENSE(10) of pages 01h, 2Ah or all (3Fh); no block descriptors."""
    control, code = cdb[2] >> 6, cdb[2] & 0x3F
    if control == 3:
        raise CheckCondition(SK_ILLEGAL_REQUEST, ASC_SAVING_PARAMETERS_NOT_SUPPORTED)
    if code not in (0x01, 0x2A, 0x3F):
        raise invalid_field()
    codes = (0x01, 0x2A) if code == 0x3F else (code,)
    pages = b"".join(_page(c, control == 1, locked) for c in codes)
    return struct.pack(">HBB4x", len(pages) + 6, 0, 0) + pages


def event_status(cdb: bytes) -> bytes:
    """GET EVENT STATUS NOTIFICATION, polled: the media class (no change, medium
    present) when asked for, else "no event available"."""
    if not cdb[1] & 0x01:
        raise invalid_field()  # asynchronous notification is not supported
    media = 1 << 4
    if cdb[4] & media:
        return struct.pack(">HBB", 6, 0x04, media) + bytes([0, 0x02, 0, 0])
    return struct.pack(">HBB", 2, 0x80, media)


def report_luns() -> bytes:
    """One logical unit, LUN 0."""
    return struct.pack(">I4x", 8) + bytes(8)
