# SPDX-License-Identifier: BSD-2-Clause
"""The AHCI ATAPI CD-ROM: PACKET commands from the guest's side, on a real ISO-sized
image file (what SeaBIOS's El Torito boot and a guest's CD driver send)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvf.plugins.ahci import spec
from test_ahci import DATA, Hba, Result, h2d, hba, pattern

BLOCKS = 300
CD = 2048


@pytest.fixture
def cd(tmp_path: Path) -> Iterator[Hba]:
    path = tmp_path / "cd.iso"
    path.write_bytes(pattern(BLOCKS * CD))
    with hba({"path": str(path), "ser": "CD-1"}, "ahci-cd") as h:
        h.start(0)
        yield h


def packet(h: Hba, cdb: bytes, length: int = 0, *, dma: bool = True,
           prdt: list[tuple[int, int]] | None = None) -> Result:
    """A PACKET command with ``cdb``, data into ``length`` bytes at DATA."""
    if prdt is None:
        prdt = [(DATA, length)] if length else [(0, 1 << 22)]  # SeaBIOS's "no data" PRD
    h.memory.write(DATA, bytes(max(length, 64)))
    fis = h2d(spec.PACKET, features=1 if dma else 0, lba=(length & 0xFFFF) << 8)
    return h.run(0, fis, prdt, acmd=cdb.ljust(12, b"\0"), flags=spec.HEADER_ATAPI)


def cdb(opcode: int, *fields: tuple[int, int, int]) -> bytes:
    """A 12-byte CDB: ``fields`` are (offset, size, big-endian value)."""
    raw = bytearray(12)
    raw[0] = opcode
    for offset, size, value in fields:
        raw[offset:offset + size] = value.to_bytes(size, "big")
    return bytes(raw)


def sense(h: Hba) -> tuple[int, int, int]:
    r = packet(h, cdb(spec.REQUEST_SENSE, (4, 1, 18)), 18)
    assert r.ok
    data = h.memory.read(DATA, 18)
    assert data[0] == 0x70 and data[7] == 10
    return data[2] & 0xF, data[12], data[13]


def check_condition(h: Hba, r: Result, key: int, asc: int, ascq: int = 0) -> None:
    assert r.status == spec.ST_RDY | spec.ST_ERR and r.error == key << 4
    assert r.irq & spec.IS_TFES
    h.recover(0)
    assert sense(h) == (key, asc, ascq)
    assert sense(h) == (0, 0, 0)  # REQUEST SENSE consumed it


def test_identify_packet_device_and_signature(cd: Hba) -> None:
    assert cd.port_read(0, spec.P_SIG) == spec.SIG_ATAPI
    r = cd.run(0, h2d(spec.IDENTIFY_PACKET_DEVICE), [(DATA, 512)])
    assert r.ok and r.prdbc == 512
    words = struct.unpack("<256H", cd.memory.read(DATA, 512))
    assert words[0] == 0x85C0 and (words[0] >> 8) & 0x1F == 5  # ATAPI CD-ROM, removable
    raw = b"".join(struct.pack(">H", w) for w in words)
    assert raw[20:40] == b"CD-1".ljust(20) and raw[54:94].rstrip() == b"HVF SATA DVD ROM"
    assert sum(cd.memory.read(DATA, 512)) % 256 == 0
    # IDENTIFY DEVICE aborts with the packet signature in the registers
    r = cd.run(0, h2d(spec.IDENTIFY_DEVICE), [(DATA, 512)])
    assert r.error == spec.ER_ABRT
    assert (r.d2h[12], r.d2h[4], r.d2h[5], r.d2h[6]) == (0x01, 0x01, 0x14, 0xEB)
    cd.recover(0)
    assert cd.run(0, h2d(spec.SET_FEATURES, features=spec.SF_SET_TRANSFER_MODE,
                         count=0x46)).ok
    assert cd.run(0, h2d(spec.READ_DMA_EXT, count=1), [(DATA, 512)]).error == spec.ER_ABRT


def test_test_unit_ready_inquiry_capacity(cd: Hba) -> None:
    r = packet(cd, cdb(spec.TEST_UNIT_READY))
    assert r.ok and r.d2h[12] == spec.ATAPI_REASON_COMPLETE and r.prdbc == 0
    r = packet(cd, cdb(spec.INQUIRY, (3, 2, 36)), 36)
    data = cd.memory.read(DATA, 36)
    assert r.ok and r.prdbc == 36 and data[0] == 0x05 and data[1] & 0x80
    assert data[8:16].rstrip() == b"HVF" and data[16:32].rstrip() == b"HVF DVD-ROM"
    assert packet(cd, cdb(spec.INQUIRY, (3, 2, 5)), 36).prdbc == 5  # allocation length
    assert packet(cd, cdb(spec.INQUIRY, (1, 1, 1), (2, 1, 0x80), (3, 2, 64)), 64).ok
    assert cd.memory.read(DATA, 8) == bytes([5, 0x80, 0, 4]) + b"CD-1"
    check_condition(cd, packet(cd, cdb(spec.INQUIRY, (1, 1, 1), (2, 1, 0x83), (3, 2, 64)), 64),
                    spec.SK_ILLEGAL_REQUEST, spec.ASC_INVALID_FIELD_IN_CDB)
    r = packet(cd, cdb(spec.READ_CAPACITY_10), 8)
    assert r.ok and cd.memory.read(DATA, 8) == struct.pack(">II", BLOCKS - 1, CD)
    r = packet(cd, cdb(spec.REPORT_LUNS, (6, 4, 16)), 16)
    assert r.ok and cd.memory.read(DATA, 16) == struct.pack(">I", 8) + bytes(12)


@pytest.mark.parametrize("opcode", [spec.READ_10, spec.READ_12])
def test_read(cd: Hba, opcode: int) -> None:
    count = (7, 2, 3) if opcode == spec.READ_10 else (6, 4, 3)
    r = packet(cd, cdb(opcode, (2, 4, 16), count), 3 * CD)
    assert r.ok and r.prdbc == 3 * CD
    assert cd.memory.read(DATA, 3 * CD) == pattern(BLOCKS * CD)[16 * CD:19 * CD]
    # PIO: a PIO setup FIS first
    r = packet(cd, cdb(opcode, (2, 4, 0), count), 3 * CD, dma=False)
    assert r.ok and r.irq & spec.IS_PSS
    end = (7, 2, 2) if opcode == spec.READ_10 else (6, 4, 2)
    check_condition(cd, packet(cd, cdb(opcode, (2, 4, BLOCKS - 1), end), 2 * CD),
                    spec.SK_ILLEGAL_REQUEST, spec.ASC_LBA_OUT_OF_RANGE)
    # a PRDT shorter than the transfer
    r = packet(cd, cdb(opcode, (2, 4, 0), count), CD, prdt=[(DATA, CD)])
    assert r.status & spec.ST_ERR
    cd.recover(0)


def test_read_toc(cd: Hba) -> None:
    assert packet(cd, cdb(spec.READ_TOC, (7, 2, 100)), 100).ok
    toc = cd.memory.read(DATA, 20)
    assert struct.unpack(">HBB", toc[:4]) == (18, 1, 1)
    assert toc[5:7] == bytes([0x14, 1]) and toc[8:12] == bytes(4)
    assert toc[13:15] == bytes([0x14, 0xAA]) and struct.unpack(">I", toc[16:20])[0] == BLOCKS
    assert packet(cd, cdb(spec.READ_TOC, (1, 1, 2), (7, 2, 100)), 100).ok  # MSF
    toc = cd.memory.read(DATA, 20)
    frames = BLOCKS + 150
    assert toc[8:12] == bytes([0, 0, 2, 0])
    assert toc[16:20] == bytes([0, frames // 4500, frames // 75 % 60, frames % 75])
    assert packet(cd, cdb(spec.READ_TOC, (2, 1, 1), (7, 2, 12)), 12).ok  # sessions
    assert cd.memory.read(DATA, 12) == bytes([0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0])
    assert packet(cd, cdb(spec.READ_TOC, (2, 1, 2), (7, 2, 200)), 200).ok  # full TOC
    full = cd.memory.read(DATA, 4 + 44)
    assert struct.unpack(">H", full[:2])[0] == 46
    assert [full[4 + 11 * i + 3] for i in range(4)] == [0xA0, 0xA1, 0xA2, 1]
    check_condition(cd, packet(cd, cdb(spec.READ_TOC, (6, 1, 5), (7, 2, 100)), 100),
                    spec.SK_ILLEGAL_REQUEST, spec.ASC_INVALID_FIELD_IN_CDB)


def features(h: Hba, rt: int, start: int = 0) -> list[int]:
    """GET CONFIGURATION's feature codes (the current profile must be CD-ROM)."""
    assert packet(h, cdb(spec.GET_CONFIGURATION, (1, 1, rt), (2, 2, start), (7, 2, 512)),
                  512).ok
    length, profile = struct.unpack(">I2xH", h.memory.read(DATA, 8))
    assert profile == 0x0008  # a small disc: CD-ROM
    body = h.memory.read(DATA + 8, length - 4)
    codes = []
    offset = 0
    while offset < len(body):
        codes.append(struct.unpack(">H", body[offset:offset + 2])[0])
        offset += 4 + body[offset + 3]
    assert offset == len(body)
    return codes


def test_get_configuration_mode_sense_events(cd: Hba) -> None:
    assert features(cd, 0) == [0, 1, 2, 3, 0x10, 0x1E, 0x1F]
    assert features(cd, 1) == [0, 1, 2, 3, 0x10, 0x1E]  # current: no DVD Read
    assert features(cd, 2, 0x1E) == [0x1E]
    assert features(cd, 0, 0x10) == [0x10, 0x1E, 0x1F]
    # MODE SENSE(10): capabilities page, all pages, saved values refused
    assert packet(cd, cdb(spec.MODE_SENSE_10, (2, 1, 0x2A), (7, 2, 64)), 64).ok
    page = cd.memory.read(DATA, 28)
    assert struct.unpack(">H", page[:2])[0] == 26 and page[8] == 0x2A and page[9] == 18
    assert packet(cd, cdb(spec.MODE_SENSE_10, (2, 1, 0x3F), (7, 2, 64)), 64).ok
    assert cd.memory.read(DATA + 8, 1) == b"\x01"
    check_condition(cd, packet(cd, cdb(spec.MODE_SENSE_10, (2, 1, 0xEA), (7, 2, 64)), 64),
                    spec.SK_ILLEGAL_REQUEST, spec.ASC_SAVING_PARAMETERS_NOT_SUPPORTED)
    check_condition(cd, packet(cd, cdb(spec.MODE_SENSE_10, (2, 1, 0x05), (7, 2, 64)), 64),
                    spec.SK_ILLEGAL_REQUEST, spec.ASC_INVALID_FIELD_IN_CDB)
    # GET EVENT STATUS NOTIFICATION: polled only; media present, no change
    assert packet(cd, cdb(spec.GET_EVENT_STATUS_NOTIFICATION, (1, 1, 1), (4, 1, 0x10),
                          (7, 2, 8)), 8).ok
    assert cd.memory.read(DATA, 8) == bytes([0, 6, 4, 0x10, 0, 2, 0, 0])
    check_condition(cd, packet(cd, cdb(spec.GET_EVENT_STATUS_NOTIFICATION, (4, 1, 0x10),
                                       (7, 2, 8)), 8),
                    spec.SK_ILLEGAL_REQUEST, spec.ASC_INVALID_FIELD_IN_CDB)


def test_tray_lock_eject_and_unknown_commands(cd: Hba) -> None:
    assert packet(cd, cdb(spec.START_STOP_UNIT, (4, 1, 0x03))).ok  # load
    check_condition(cd, packet(cd, cdb(spec.START_STOP_UNIT, (4, 1, 0x02))),
                    spec.SK_ILLEGAL_REQUEST, spec.ASC_MEDIUM_REMOVAL_FAILED)
    assert packet(cd, cdb(spec.PREVENT_ALLOW_MEDIUM_REMOVAL, (4, 1, 1))).ok
    check_condition(cd, packet(cd, cdb(spec.START_STOP_UNIT, (4, 1, 0x02))),
                    spec.SK_ILLEGAL_REQUEST, spec.ASC_MEDIUM_REMOVAL_FAILED, 0x02)
    check_condition(cd, packet(cd, cdb(spec.WRITE_10, (2, 4, 0), (7, 2, 1)), CD),
                    spec.SK_DATA_PROTECT, spec.ASC_WRITE_PROTECTED)
    check_condition(cd, packet(cd, cdb(0xBE)), spec.SK_ILLEGAL_REQUEST,
                    spec.ASC_INVALID_OPCODE)
    assert cd.device.ports[0].drive.backend.image.readonly


def test_device_reset_and_save_restore(cd: Hba) -> None:
    assert packet(cd, cdb(spec.PREVENT_ALLOW_MEDIUM_REMOVAL, (4, 1, 1))).ok
    r = packet(cd, cdb(0xBE))
    assert r.status & spec.ST_ERR
    cd.recover(0)
    saved = cd.device.save_state()
    assert saved["ports"]["0"]["drive"]["sense_key"] == spec.SK_ILLEGAL_REQUEST
    r = cd.run(0, h2d(spec.DEVICE_RESET))
    assert not r.status & spec.ST_ERR and r.d2h[5:7] == b"\x14\xeb"
    assert not cd.device.ports[0].drive.state.locked
    cd.device.restore_state(saved, 1)
    assert cd.device.ports[0].drive.state.locked
    assert sense(cd) == (spec.SK_ILLEGAL_REQUEST, spec.ASC_INVALID_OPCODE, 0)
