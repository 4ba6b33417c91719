# SPDX-License-Identifier: BSD-2-Clause
"""IDENTIFY DEVICE and IDENTIFY PACKET DEVICE data (ATA8-ACS / ACS-3 §7.12-7.13):
256 little-endian words, strings byte-swapped in pairs, checksummed in word 255."""

from __future__ import annotations

import struct

import attrs

#: Words 47 and 59: the most sectors a READ/WRITE MULTIPLE moves per DRQ block.
MAX_MULTIPLE = 128
#: Word 75: NCQ queue depth less one.
NCQ_DEPTH = 32
#: Word 105: DATA SET MANAGEMENT takes at most this many 512-byte blocks of ranges.
DSM_MAX_BLOCKS = 8
#: ATA's largest CHS geometry (cylinders, heads, sectors per track).
MAX_CYLINDERS, HEADS, SECTORS_PER_TRACK = 16383, 16, 63

UDMA_MODES = 0x7F       # UDMA 0-6
MWDMA_MODES = 0x07      # multiword DMA 0-2
PIO_MODES = 0x03        # PIO 3-4 (word 64)


@attrs.frozen
class TransferMode:
    """The mode SET FEATURES chose: ``kind`` 0 PIO, 4 multiword DMA, 8 UDMA (the
    count register's bits 7:3 shifted right by 3), and the mode number."""

    kind: int = 8
    mode: int = 6


#: The highest mode of each transfer mode type (PIO default, PIO flow control,
#: multiword DMA, UDMA) that SET FEATURES may select.
_HIGHEST_MODE = {0: 4, 1: 4, 4: 2, 8: 6}


def transfer_mode(count: int) -> TransferMode | None:
    """The mode SET FEATURES - set transfer mode selects with ``count``, or None for
    one this device lacks."""
    kind, mode = count >> 3, count & 7
    if kind not in _HIGHEST_MODE or mode > _HIGHEST_MODE[kind]:
        return None
    return TransferMode(kind, mode)


def ata_string(text: str, length: int) -> list[int]:
    """``text`` padded with spaces to ``length`` bytes, as words (ATA byte order)."""
    raw = text.encode("ascii")[:length].ljust(length, b" ")
    return [raw[i] << 8 | raw[i + 1] for i in range(0, length, 2)]


def _finish(words: list[int]) -> bytes:
    words[255] = 0xA5
    data = bytearray(struct.pack("<256H", *words))
    data[511] = -sum(data[:511]) & 0xFF
    return bytes(data)


def _strings(words: list[int], serial: str, revision: str, model: str) -> None:
    words[10:20] = ata_string(serial, 20)
    words[23:27] = ata_string(revision, 8)
    words[27:47] = ata_string(model, 40)


def _dma_modes(words: list[int], mode: TransferMode) -> None:
    words[63] = MWDMA_MODES | ((1 << mode.mode) << 8 if mode.kind == 4 else 0)
    words[64] = PIO_MODES
    words[65:69] = [120, 120, 120, 120]
    words[88] = UDMA_MODES | ((1 << mode.mode) << 8 if mode.kind == 8 else 0)


def identify_disk(*, sectors: int, logical: int, physical: int, serial: str, revision: str,
                  model: str, trim: bool, rotation: int, multiple: int,
                  mode: TransferMode, write_cache: bool, look_ahead: bool) -> bytes:
    """IDENTIFY DEVICE for a SATA disk of ``sectors`` logical sectors of ``logical``
    bytes (``physical`` per physical sector)."""
    words = [0] * 256
    chs_sectors = min(sectors * (logical // 512), MAX_CYLINDERS * HEADS * SECTORS_PER_TRACK)
    cylinders = max(1, chs_sectors // (HEADS * SECTORS_PER_TRACK))
    words[0] = 0x0040                       # fixed device, ATA
    words[1], words[3], words[6] = cylinders, HEADS, SECTORS_PER_TRACK
    _strings(words, serial, revision, model)
    words[47] = 0x8000 | MAX_MULTIPLE
    words[49] = 0x0B00                      # IORDY, LBA, DMA
    words[50] = 0x4000
    words[53] = 0x0006                      # words 64-70 and 88 valid
    words[54], words[55], words[56] = cylinders, HEADS, SECTORS_PER_TRACK
    current = cylinders * HEADS * SECTORS_PER_TRACK
    words[57], words[58] = current & 0xFFFF, current >> 16
    words[59] = (0x0100 | multiple) if multiple else 0
    lba28 = min(sectors, 0x0FFFFFFF)
    words[60], words[61] = lba28 & 0xFFFF, lba28 >> 16
    _dma_modes(words, mode)
    words[69] = (1 << 14 | 1 << 5) if trim else 0   # deterministic, zeroed after TRIM
    words[75] = NCQ_DEPTH - 1
    words[76] = 0x010E                      # NCQ; SATA 1.5, 3 and 6 Gb/s
    words[77] = 3 << 1                      # negotiated: 6 Gb/s
    words[80] = 0x07F0                      # ATA/ATAPI-4 .. ACS-3
    words[82] = 0x4068                      # NOP, look-ahead, write cache, power management
    words[83] = 0x7400                      # FLUSH CACHE EXT, FLUSH CACHE, 48-bit
    words[84] = 0x4020                      # general purpose logging
    words[85] = 0x4008 | (0x20 if write_cache else 0) | (0x40 if look_ahead else 0)
    words[86] = 0x3400
    words[87] = 0x4020
    words[100:104] = [sectors >> s & 0xFFFF for s in (0, 16, 32, 48)]
    per_physical = physical // logical
    words[105] = DSM_MAX_BLOCKS if trim else 0
    words[106] = (0x4000 | (0x2000 if per_physical > 1 else 0)
                  | (0x1000 if logical > 512 else 0) | (per_physical.bit_length() - 1))
    if logical > 512:
        logical_words = logical // 2
        words[117], words[118] = logical_words & 0xFFFF, logical_words >> 16
    words[169] = 1 if trim else 0
    words[209] = 0x4000                     # logical sector 0 starts a physical one
    words[217] = rotation
    words[222] = 0x103F                     # serial transport, SATA 1.0a .. 3.0
    return _finish(words)


def identify_packet(*, serial: str, revision: str, model: str, mode: TransferMode) -> bytes:
    """IDENTIFY PACKET DEVICE for a removable ATAPI CD-ROM with 12-byte packets."""
    words = [0] * 256
    words[0] = 0x85C0                       # ATAPI, CD-ROM, removable, 50 us DRQ
    _strings(words, serial, revision, model)
    words[49] = 0x0300                      # LBA, DMA
    words[53] = 0x0006
    _dma_modes(words, mode)
    words[76] = 0x000E
    words[80] = 0x01F0                      # ATA/ATAPI-4 .. ATA8-ACS
    words[82] = 0x4218                      # NOP, DEVICE RESET, PACKET, power management
    words[83] = 0x4000
    words[84] = 0x4000
    words[85] = 0x4218
    words[86] = 0x0000
    words[87] = 0x4000
    words[222] = 0x103F
    return _finish(words)
