# SPDX-License-Identifier: BSD-2-Clause
"""One AHCI port (AHCI 1.3.1 §3.3, §5): its registers, its command list in guest
memory, and the commands it hands to the drive behind it.

The guest sets PxCI bits from a vCPU (an MMIO exit that only records them); the port
runs the commands on the I/O thread (:meth:`Port.process`), round-robin from the slot
after the last one started (slot 0 once PxCMD.ST is set). Each command's header and
table are read from guest memory, its register FIS goes to the drive
(:mod:`hvf.plugins.ahci.ata` or :mod:`hvf.plugins.ahci.atapi`), which moves data
through the PRDT (:meth:`~hvf.plugins.ahci.request.Request.buffers`, every entry
bounds-checked against guest RAM) on the block back end's threads and reports an
:class:`~hvf.plugins.ahci.fis.Outcome`. The port then writes the FISes (PIO setup, D2H
register, or set device bits for NCQ) to the received-FIS area, updates
PxTFD/PxCI/PxSACT/PxIS and interrupts.

A non-queued command runs alone; NCQ commands (READ/WRITE FPDMA QUEUED) are accepted
with a D2H FIS that clears BSY and PxCI and run concurrently, each completed by a set
device bits FIS. A failed command sets PxIS.TFES and halts the port until the guest
clears PxCMD.ST (AHCI §6.2.2). A command list or table outside guest RAM sets
PxIS.HBFS and halts it too. Clearing ST forgets the commands in flight: their
completions are dropped, and PxCMD.CR stays set until the back end has finished them.
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING

from hvf.errors import GuestMemoryError, HvfError
from hvf.plugins.ahci import fis as fisgen
from hvf.plugins.ahci.fis import H2dFis, Outcome
from hvf.plugins.ahci.request import Drive, PortHost, Request
from hvf.plugins.ahci.spec import (
    CMD_CCS_SHIFT,
    CMD_CLO,
    CMD_CR,
    CMD_FR,
    CMD_FRE,
    CMD_POD,
    CMD_ST,
    CMD_STORED,
    COMMAND_HEADER_SIZE,
    COMMAND_LIST_ALIGN,
    CONTROL_SRST,
    ER_ABRT,
    FIS_AREA_ALIGN,
    FIS_H2D,
    IS_DHRS,
    IS_HBFS,
    IS_MASK,
    IS_PSS,
    IS_SDBS,
    IS_TFES,
    MAX_PORTS,
    NCQ_COMMANDS,
    P_CI,
    P_CLB,
    P_CLBU,
    P_CMD,
    P_FB,
    P_FBU,
    P_IE,
    P_IS,
    P_SACT,
    P_SCTL,
    P_SERR,
    P_SIG,
    P_SSTS,
    P_TFD,
    RX_D2H,
    RX_PIO_SETUP,
    RX_SDB,
    SCTL_DET_COMRESET,
    SCTL_DET_MASK,
    SCTL_SPD_SHIFT,
    SCTL_WRITABLE,
    SSTS_DET_PRESENT,
    SSTS_IPM_ACTIVE,
    SSTS_SPD_SHIFT,
    ST_BSY,
    ST_DRQ,
    ST_ERR,
    ST_OK,
    ST_RDY,
    TABLE_ACMD,
    TABLE_ALIGN,
    TABLE_CFIS,
)
from hvf.plugins.ahci.state import PortState
from hvf.plugins.block.record import ImageRecord, check_restored_image, record_image
from hvf.snapshot_api import check_fields

if TYPE_CHECKING:
    from hvf.snapshot_api import Fields

_HEADER = struct.Struct("<IIII")
FULL_SPEED = 3  # SATA 6 Gb/s


class Port:
    """Port ``index`` of an HBA with ``drive`` behind it (None: not implemented); the
    HBA's ``lock`` guards it."""

    def __init__(self, host: PortHost, index: int, drive: Drive | None,
                 lock: threading.RLock) -> None:
        self.host = host
        self.index = index
        self.drive = drive
        self.lock = lock
        self.regs = self._power_on()
        #: Commands started and not yet finished, by slot (this ST session's).
        self.running: dict[int, Request] = {}
        #: Requests the drive still holds, this session's or an earlier one's.
        self.busy = 0
        self._processing = False
        self._closed = False
        #: The slot the round-robin scan for issued commands starts at.
        self._scan = 0

    # ---- reset ----

    def _power_on(self, keep: PortState | None = None) -> PortState:
        if self.drive is None:
            return PortState.empty()
        state = PortState.initial(self.drive.signature)
        if keep is not None:
            state.clb, state.fb = keep.clb, keep.fb
        return state

    def hba_reset(self) -> None:
        """GHC.HR: registers to their reset values (the list and FIS bases stay)."""
        self._forget()
        self.regs = self._power_on(self.regs)
        if self.drive is not None:
            self.drive.reset()

    def _forget(self) -> None:
        """Drop every command: PxCI and PxSACT clear, completions still due are ignored."""
        self.running.clear()
        self.regs.ci = 0
        self.regs.sact = 0
        self.regs.halted = False

    def shut_down(self) -> None:
        """The VM stops: start nothing more, drop what completes from now on."""
        self._closed = True
        self._forget()

    def _device_reset(self, *, interrupt: bool) -> None:
        """The device finished a reset: it sends its signature in a D2H FIS."""
        assert self.drive is not None
        self.drive.reset()
        regs = self.regs
        regs.sig = self.drive.signature
        regs.tfd = PortState.initial(self.drive.signature).tfd
        self._write_fis(RX_D2H, fisgen.d2h(regs.tfd & 0xFF, regs.tfd >> 8,
                                           signature=regs.sig, interrupt=interrupt))
        if interrupt:
            regs.irq_status |= IS_DHRS
            self.host.port_interrupt(self)

    # ---- registers (lock held) ----

    def read(self, reg: int) -> int:
        regs = self.regs
        if reg == P_CMD:
            value = regs.cmd | (regs.ccs << CMD_CCS_SHIFT)
            if regs.cmd & CMD_FRE:
                value |= CMD_FR
            if regs.cmd & CMD_ST or self.busy:
                value |= CMD_CR
            return value
        return {P_CLB: regs.clb & 0xFFFFFFFF, P_CLBU: regs.clb >> 32,
                P_FB: regs.fb & 0xFFFFFFFF, P_FBU: regs.fb >> 32, P_IS: regs.irq_status,
                P_IE: regs.irq_enable, P_TFD: regs.tfd, P_SIG: regs.sig, P_SSTS: regs.ssts,
                P_SCTL: regs.sctl, P_SERR: regs.serr, P_SACT: regs.sact,
                P_CI: regs.ci}.get(reg, 0)

    def write(self, reg: int, value: int) -> bool:
        """A guest write; True when commands may have been issued (run :meth:`process`)."""
        if self.drive is None:
            return False
        regs = self.regs
        if reg == P_CLB:
            regs.clb = (regs.clb & ~0xFFFFFFFF) | (value & ~(COMMAND_LIST_ALIGN - 1))
        elif reg == P_CLBU:
            regs.clb = (regs.clb & 0xFFFFFFFF) | value << 32
        elif reg == P_FB:
            regs.fb = (regs.fb & ~0xFFFFFFFF) | (value & ~(FIS_AREA_ALIGN - 1))
        elif reg == P_FBU:
            regs.fb = (regs.fb & 0xFFFFFFFF) | value << 32
        elif reg == P_IS:
            regs.irq_status &= ~value
        elif reg == P_IE:
            regs.irq_enable = value & IS_MASK
            self.host.port_interrupt(self)
        elif reg == P_CMD:
            self._write_cmd(value)
        elif reg == P_SCTL:
            self._write_sctl(value & SCTL_WRITABLE)
        elif reg == P_SERR:
            regs.serr &= ~value
        elif reg == P_SACT:
            if regs.cmd & CMD_ST:
                regs.sact |= value
        elif reg == P_CI:
            if regs.cmd & CMD_ST and value & ~regs.ci:
                regs.ci |= value
                return True
        return False

    def _write_cmd(self, value: int) -> None:
        regs = self.regs
        old = regs.cmd
        regs.cmd = (value & CMD_STORED) | CMD_POD
        if value & CMD_CLO:
            regs.tfd &= ~(ST_BSY | ST_DRQ)
        if old & CMD_ST and not value & CMD_ST:
            self._forget()
            regs.ccs = 0
        elif value & CMD_ST and not old & CMD_ST:
            regs.ccs = self._scan = 0

    def _write_sctl(self, value: int) -> None:
        regs = self.regs
        resetting = regs.sctl & SCTL_DET_MASK == SCTL_DET_COMRESET
        regs.sctl = value
        if value & SCTL_DET_MASK == SCTL_DET_COMRESET:
            self._forget()
            regs.ssts = 0
            regs.tfd = ST_BSY | 0x7F
        elif resetting:
            speed = (value >> SCTL_SPD_SHIFT) & 0xF
            speed = speed if 0 < speed < FULL_SPEED else FULL_SPEED
            regs.ssts = SSTS_IPM_ACTIVE | speed << SSTS_SPD_SHIFT | SSTS_DET_PRESENT
            self._device_reset(interrupt=False)

    # ---- running commands (lock held) ----

    def process(self) -> None:
        """Start every issued command that may start now."""
        if self._processing:
            return  # a command finished while one was being started: the loop goes on
        self._processing = True
        try:
            while (slot := self._next_slot()) is not None and self._start(slot):
                pass
        finally:
            self._processing = False

    def _next_slot(self) -> int | None:
        regs = self.regs
        if not regs.cmd & CMD_ST or regs.halted or self.drive is None or self._closed:
            return None
        pending = regs.ci & ~sum(1 << s for s in self.running)
        if not pending or any(not r.ncq for r in self.running.values()):
            return None
        for step in range(MAX_PORTS):
            slot = (self._scan + step) % MAX_PORTS
            if pending >> slot & 1:
                return slot
        return None

    def _start(self, slot: int) -> bool:
        """Start the command in ``slot``; False when it has to wait (or the port halted)."""
        assert self.drive is not None
        regs = self.regs
        try:
            request = self._load(slot)
        except GuestMemoryError as e:
            self._fatal(slot, f"slot {slot}: {e}")
            return False
        fis = request.fis
        if fis.type == FIS_H2D and not fis.is_command:
            self._control(slot, fis)
            return True
        if not request.ncq and self.running:
            return False  # a non-queued command waits for the queued ones
        regs.ccs = slot
        self._scan = (slot + 1) % MAX_PORTS
        self.running[slot] = request
        self.busy += 1
        if request.ncq:
            regs.tfd = ST_OK
            regs.ci &= ~(1 << slot)
            self._write_fis(RX_D2H, fisgen.d2h(ST_OK, 0, interrupt=False))
        else:
            regs.tfd = regs.tfd & ~0xFF | ST_BSY | ST_RDY
        if fis.type != FIS_H2D:
            self.host.log(f"{self.name}: slot {slot} holds a FIS of type {fis.type:#04x}, "
                          f"not a register FIS; aborted")
            request.finish(fisgen.aborted())
            return True
        try:
            self.drive.execute(request)
        except HvfError as e:
            self.host.log(f"{self.name}: command {fis.command:#04x}: {e}")
            request.finish(fisgen.aborted())
        return True

    def _load(self, slot: int) -> Request:
        """Read the command header and table of ``slot``."""
        assert self.drive is not None
        dma = self.host.dma
        header_gpa = self.regs.clb + slot * COMMAND_HEADER_SIZE
        flags, _prdbc, low, high = _HEADER.unpack_from(dma.view(header_gpa, COMMAND_HEADER_SIZE))
        table = (high << 32 | low) & ~(TABLE_ALIGN - 1)
        cfis = bytes(dma.view(table + TABLE_CFIS, TABLE_ACMD + 16))
        fis = H2dFis.parse(cfis)
        return Request(self, slot, header_gpa, table, flags >> 16, fis,
                       cfis[TABLE_ACMD:TABLE_ACMD + 16],
                       ncq=fis.is_command and fis.command in NCQ_COMMANDS and self.drive.ncq)

    def _control(self, slot: int, fis: H2dFis) -> None:
        """A device control FIS: SRST set starts a soft reset, cleared ends it."""
        regs = self.regs
        regs.ci &= ~(1 << slot)
        if fis.control & CONTROL_SRST:
            regs.soft_reset = True
        elif regs.soft_reset:
            regs.soft_reset = False
            self._device_reset(interrupt=True)

    def _fatal(self, slot: int, why: str) -> None:
        """The HBA cannot reach the command's structures: a host bus fatal error."""
        regs = self.regs
        self.host.log(f"{self.name}: {why}; host bus fatal error")
        regs.halted = True
        regs.ccs = slot
        regs.tfd = ER_ABRT << 8 | ST_RDY | ST_ERR
        regs.irq_status |= IS_HBFS
        self.host.port_interrupt(self)

    # ---- completions (any thread; takes the lock) ----

    def finish(self, request: Request, outcome: Outcome) -> None:
        with self.lock:
            self.busy -= 1
            if self.running.get(request.slot) is not request:
                return  # the port was stopped or reset since
            del self.running[request.slot]
            self._set_prdbc(request, outcome.transferred)
            if request.ncq:
                self._finish_queued(request, outcome)
            else:
                self._finish_command(request, outcome)
            self.host.port_interrupt(self)
            self.process()

    def _set_prdbc(self, request: Request, count: int) -> None:
        try:
            self.host.dma.write_u32(request.header_gpa + 4, count)
        except GuestMemoryError:
            pass  # it was inside RAM when the command started, and RAM does not move

    def _finish_command(self, request: Request, outcome: Outcome) -> None:
        regs = self.regs
        if outcome.pio_in is not None and not outcome.failed:
            self._write_fis(RX_PIO_SETUP, fisgen.pio_setup(
                outcome.transferred, outcome.status, data_in=outcome.pio_in))
            regs.irq_status |= IS_PSS
        self._write_fis(RX_D2H, fisgen.d2h(outcome.status, outcome.error, count=outcome.count,
                                           signature=outcome.signature))
        regs.irq_status |= IS_DHRS
        regs.tfd = outcome.error << 8 | outcome.status
        if outcome.failed:
            regs.irq_status |= IS_TFES
            regs.halted = True
        else:
            regs.ci &= ~(1 << request.slot)

    def _finish_queued(self, request: Request, outcome: Outcome) -> None:
        regs = self.regs
        tag = 1 << request.slot
        done = 0 if outcome.failed else tag
        self._write_fis(RX_SDB, fisgen.set_device_bits(outcome.status, outcome.error, done))
        regs.sact &= ~done
        regs.tfd = outcome.error << 8 | (regs.tfd & 0x88) | (outcome.status & 0x77)
        regs.irq_status |= IS_SDBS
        if outcome.failed:
            regs.irq_status |= IS_TFES
            regs.halted = True

    def _write_fis(self, offset: int, data: bytes) -> None:
        regs = self.regs
        if not regs.cmd & CMD_FRE:
            return
        try:
            self.host.dma.view(regs.fb + offset, len(data))[:] = data
        except GuestMemoryError as e:
            self.host.log(f"{self.name}: received-FIS area: {e}; host bus fatal error")
            regs.halted = True
            regs.irq_status |= IS_HBFS

    # ---- the rest ----

    @property
    def name(self) -> str:
        return f"port {self.index}"

    @property
    def pending_interrupt(self) -> bool:
        return bool(self.regs.irq_status & self.regs.irq_enable)

    def save(self) -> Fields:
        """The registers, the drive's state and the image, flushed and recorded; nothing
        may be in flight."""
        assert self.drive is not None
        if self.running:
            raise HvfError(f"{self.name}: {len(self.running)} commands still in flight")
        return {"registers": self.regs.to_fields(), "drive": self.drive.save(),
                "image": record_image(self.drive.backend.image).to_fields()}

    def restore(self, fields: Fields, where: str, path_key: str) -> None:
        """Load what :meth:`save` returned; ``ValueError`` names a bad field, and
        ``ImageError`` refuses an image that is not the one saved (``path_key`` names its
        setting)."""
        assert self.drive is not None
        check_fields(fields, ("registers", "drive", "image"))
        registers, drive = fields["registers"], fields["drive"]
        if not isinstance(registers, dict) or not isinstance(drive, dict):
            raise ValueError(f"saved {self.name} lacks its registers or its drive's state")
        regs = PortState.from_fields(registers)
        record = ImageRecord.from_fields(fields["image"])
        check_restored_image(self.drive.backend.image, record, where, path_key)
        self.drive.restore(drive)
        self.regs = regs
        self._scan = (regs.ccs + 1) % MAX_PORTS
        self.running.clear()
