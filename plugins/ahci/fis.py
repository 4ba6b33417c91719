# SPDX-License-Identifier: BSD-2-Clause
"""Frame information structures (SATA 3.x §10.5) as the HBA model sees them: the
host-to-device register FIS a command table holds, the result a drive reports, and the
device-to-host FISes the port writes to the received-FIS area."""

from __future__ import annotations

import attrs

from hvf.plugins.ahci.spec import (
    ER_ABRT,
    ER_IDNF,
    FIS_COMMAND,
    FIS_D2H,
    FIS_H2D,
    FIS_INTERRUPT,
    FIS_PIO_IN,
    FIS_PIO_SETUP,
    FIS_SDB,
    ST_DRQ,
    ST_ERR,
    ST_OK,
    ST_RDY,
)

H2D_SIZE = 20


@attrs.frozen
class H2dFis:
    """A register host-to-device FIS (its first 20 bytes)."""

    raw: bytes

    @classmethod
    def parse(cls, data: bytes) -> H2dFis:
        return cls(bytes(data[:H2D_SIZE]).ljust(H2D_SIZE, b"\0"))

    @property
    def type(self) -> int:
        return self.raw[0]

    @property
    def is_command(self) -> bool:
        """A command FIS (C bit set), not a device control FIS."""
        return self.type == FIS_H2D and bool(self.raw[1] & FIS_COMMAND)

    @property
    def command(self) -> int:
        return self.raw[2]

    @property
    def features(self) -> int:
        return self.raw[3]

    @property
    def features16(self) -> int:
        return self.raw[3] | self.raw[11] << 8

    @property
    def device(self) -> int:
        return self.raw[7]

    @property
    def control(self) -> int:
        return self.raw[15]

    @property
    def lba28(self) -> int:
        r = self.raw
        return r[4] | r[5] << 8 | r[6] << 16 | (r[7] & 0x0F) << 24

    @property
    def lba48(self) -> int:
        r = self.raw
        return r[4] | r[5] << 8 | r[6] << 16 | r[8] << 24 | r[9] << 32 | r[10] << 40

    @property
    def count8(self) -> int:
        return self.raw[12]

    @property
    def count16(self) -> int:
        return self.raw[12] | self.raw[13] << 8

    @property
    def ncq_tag(self) -> int:
        return self.raw[12] >> 3


@attrs.frozen
class Outcome:
    """How a command ended, as the drive reports it to the port: the ATA status and
    error registers, the bytes moved (PRDBC), whether it was a PIO data transfer (and
    its direction), and register values the D2H FIS carries besides."""

    status: int = ST_OK
    error: int = 0
    transferred: int = 0
    #: A PIO data-in (True) or data-out (False) transfer; None for DMA or no data.
    pio_in: bool | None = None
    #: The sector count register (the ATAPI interrupt reason, CHECK POWER MODE's answer).
    count: int = 0
    #: LBA low/mid/high: the device signature (an ATAPI device refusing IDENTIFY DEVICE).
    signature: int | None = None

    @property
    def failed(self) -> bool:
        return bool(self.status & ST_ERR)


def aborted(*, signature: int | None = None) -> Outcome:
    """The command was refused (ERR with ABRT)."""
    return Outcome(status=ST_RDY | ST_ERR, error=ER_ABRT, signature=signature)


def not_found() -> Outcome:
    """The sectors addressed are not on the medium (ERR with IDNF)."""
    return Outcome(status=ST_RDY | ST_ERR, error=ER_IDNF)


def d2h(status: int, error: int, *, count: int = 0, signature: int | None = None,
        interrupt: bool = True) -> bytes:
    """A register device-to-host FIS; ``signature`` fills count and the LBA registers as
    a device does after reset (0x00000101 for ATA, 0xEB140101 for ATAPI)."""
    fis = bytearray(20)
    fis[0] = FIS_D2H
    fis[1] = FIS_INTERRUPT if interrupt else 0
    fis[2] = status
    fis[3] = error
    if signature is not None:
        fis[12] = signature & 0xFF
        fis[4] = signature >> 8 & 0xFF
        fis[5] = signature >> 16 & 0xFF
        fis[6] = signature >> 24 & 0xFF
    else:
        fis[12] = count & 0xFF
        fis[13] = count >> 8 & 0xFF
    return bytes(fis)


def pio_setup(length: int, ending_status: int, *, data_in: bool) -> bytes:
    """A PIO setup FIS announcing ``length`` bytes, with the status after the transfer."""
    fis = bytearray(20)
    fis[0] = FIS_PIO_SETUP
    fis[1] = FIS_INTERRUPT | (FIS_PIO_IN if data_in else 0)
    fis[2] = ST_OK | ST_DRQ
    fis[15] = ending_status
    fis[16] = length & 0xFF
    fis[17] = length >> 8 & 0xFF
    return bytes(fis)


def set_device_bits(status: int, error: int, completed: int) -> bytes:
    """A set device bits FIS: NCQ commands ``completed`` (a tag mask) and the status."""
    return (bytes([FIS_SDB, FIS_INTERRUPT, status & 0x77, error])
            + completed.to_bytes(4, "little"))
