# SPDX-License-Identifier: BSD-2-Clause
"""What a port hands the drive behind it: a :class:`Request` (one command from the
command list, with its PRDT), and the interfaces between port, drive and HBA."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Protocol

import attrs

from hvf.errors import GuestMemoryError
from hvf.plugins.ahci.fis import H2dFis, Outcome
from hvf.plugins.ahci.spec import PRD_DBC_MASK, PRD_SIZE, TABLE_PRDT

if TYPE_CHECKING:
    from hvf.dma import GuestDma
    from hvf.plugins.ahci.port import Port
    from hvf.plugins.block.backend import BlockBackend
    from hvf.snapshot_api import Fields

_PRD = struct.Struct("<IIII")
#: PRD entries read from guest memory at a time.
PRD_BATCH = 64


class Drive(Protocol):
    """What sits behind a port: an ATA disk or an ATAPI CD-ROM."""

    #: The device signature (PxSIG after reset).
    signature: int
    #: Whether READ/WRITE FPDMA QUEUED are NCQ commands here.
    ncq: bool
    #: Where the medium is (the drive owns it).
    backend: BlockBackend

    def execute(self, request: Request) -> None:
        """Run the command; call ``request.finish`` once, now or from a back-end thread."""

    def reset(self) -> None:
        """A device reset (COMRESET, soft reset, HBA reset): forget transient state."""

    def drain(self) -> None:
        """Wait for every back-end request (no lock held)."""

    def save(self) -> Fields: ...

    def restore(self, fields: Fields) -> None: ...

    def close(self) -> None:
        """Close the back end and its image."""


class PortHost(Protocol):
    """What a port uses of its HBA."""

    dma: GuestDma

    def port_interrupt(self, port: Port) -> None:
        """PxIS gained bits: recompute IS and interrupt (lock held)."""

    def log(self, message: str) -> None: ...


@attrs.define(eq=False)
class Request:
    """One command from a slot of the command list, as handed to the drive."""

    port: Port
    slot: int
    header_gpa: int
    table_gpa: int
    prd_count: int
    fis: H2dFis
    acmd: bytes
    ncq: bool = False

    def buffers(self, length: int, *, exact: bool = True) -> list[memoryview]:
        """Views of guest RAM for the first ``length`` bytes the PRDT describes (fewer
        where the PRDT is shorter and not ``exact``). ``GuestMemoryError`` when an entry
        lies outside RAM, or, with ``exact``, the PRDT holds less than ``length``."""
        dma = self.port.host.dma
        views: list[memoryview] = []
        need = length
        index = 0
        while need > 0 and index < self.prd_count:
            batch = min(PRD_BATCH, self.prd_count - index)
            table = dma.view(self.table_gpa + TABLE_PRDT + index * PRD_SIZE, batch * PRD_SIZE)
            for low, high, _reserved, dw3 in _PRD.iter_unpack(table):
                size = min((dw3 & PRD_DBC_MASK) + 1, need)
                views.append(dma.view((high << 32 | low) & ~1, size))
                need -= size
                if not need:
                    break
            index += batch
        if need and exact:
            raise GuestMemoryError(f"the PRDT holds {length - need} bytes, the command "
                                   f"moves {length}")
        return views

    def finish(self, outcome: Outcome) -> None:
        """The drive is done with this command (any thread)."""
        self.port.finish(self, outcome)
