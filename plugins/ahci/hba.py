# SPDX-License-Identifier: BSD-2-Clause
"""The AHCI host bus adapter (AHCI 1.3.1): bhyve's ``ahci`` as a PCI function.

PCI 8086:2821 (an ICH8 AHCI controller, as bhyve), class 01:06:01, the registers
(ABAR) in BAR 5, 32-bit memory, room for 32 ports. INTA and one MSI message.

Generic host control: CAP (64-bit addressing, NCQ, SNotification, mechanical presence
switch, staggered spin-up, aggressive link power management, activity LED, command
list override, 6 Gb/s, AHCI only, PIO multiple DRQ blocks, slumber and partial, external
SATA, 32 command slots, NP the highest port), GHC (AE always set, IE, HR resets the
HBA), IS, PI (the configured ports), VS 1.3.1, CAP2 (automatic partial to slumber).
Registers are written as aligned dwords (a qword is two); reads may be any width.

Interrupts: a port whose PxIS & PxIE is non-zero sets its IS bit; with GHC.IE the
function interrupts, through MSI when the guest enabled it (a message for every new
event while one is pending, as level-triggered hardware would re-assert), else INTx
while IS is non-zero.

A PxCI write only records the new commands and wakes the I/O thread, which starts
them (:mod:`hvf.plugins.ahci.port`); the data moves on the ports' block back ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hvf.errors import DeviceError, HvfError
from hvf.plugins.ahci.port import Port
from hvf.plugins.ahci.request import Drive
from hvf.plugins.ahci.spec import (
    ABAR_INDEX,
    ABAR_SIZE,
    AHCI_VERSION,
    CAP,
    CAP2,
    CAP2_APST,
    CAP_ISS_GEN3,
    CAP_NCS_SHIFT,
    CAP_PMD,
    CAP_PSC,
    CAP_S64A,
    CAP_SAL,
    CAP_SALP,
    CAP_SAM,
    CAP_SCLO,
    CAP_SMPS,
    CAP_SNCQ,
    CAP_SSC,
    CAP_SSNTF,
    CAP_SSS,
    CAP_SXS,
    CLASS_SATA_AHCI,
    DEVICE_ICH8_AHCI,
    GHC,
    GHC_AE,
    GHC_HR,
    GHC_IE,
    IS,
    MAX_PORTS,
    PI,
    PORT_BASE,
    PORT_STRIDE,
    VENDOR_INTEL,
    VS,
)
from hvf.plugins.ahci.state import HbaState, ports_from_fields
from hvf.plugins.pci import BAR_MEM32, MsiCapability, PciDevice

if TYPE_CHECKING:
    from hvf.bootorder import BootEntry
    from hvf.context import DeviceContext
    from hvf.dma import GuestDma

CAPABILITIES = (CAP_S64A | CAP_SNCQ | CAP_SSNTF | CAP_SMPS | CAP_SSS | CAP_SALP | CAP_SAL
                | CAP_SCLO | CAP_ISS_GEN3 | CAP_SAM | CAP_PMD | CAP_SSC | CAP_PSC | CAP_SXS
                | (MAX_PORTS - 1) << CAP_NCS_SHIFT)


class Ahci(PciDevice):
    """An AHCI HBA with ``drives`` on the ports they are keyed by."""

    def __init__(self, name: str, drives: dict[int, Drive],
                 boot: Sequence[BootEntry] = ()) -> None:
        super().__init__(name)
        self.set_identity(VENDOR_INTEL, DEVICE_ICH8_AHCI, CLASS_SATA_AHCI)
        self.lock = threading.RLock()
        self.ports = [Port(self, i, drives.get(i), self.lock) for i in range(MAX_PORTS)]
        self.implemented = sum(1 << i for i in drives)
        self.cap = CAPABILITIES | max(drives, default=0)
        self.ghc = GHC_AE
        self.irq_status = 0
        self._boot = tuple(boot)
        self._level = False
        self.msi_interrupts = 0
        self.intx_interrupts = 0
        self._kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.add_bar(ABAR_INDEX, BAR_MEM32, ABAR_SIZE, self._bar_read, self._bar_write)
        self.request_intx()
        self.dma: GuestDma
        self.msi: MsiCapability

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.dma = ctx.dma
        self.msi = MsiCapability(self, ctx.interrupts)
        ctx.loop.add_reader(self._kick, self.run_commands)

    def boot_entries(self) -> Sequence[BootEntry]:
        return self._boot

    def log(self, message: str) -> None:
        self.ctx.log(f"{self.name}: {message}")

    # ---- the ABAR (vCPU threads) ----

    def _bar_read(self, offset: int, size: int) -> int:
        start = offset & ~3
        with self.lock:
            raw = b"".join(self._read_dword(reg).to_bytes(4, "little")
                           for reg in range(start, offset + size, 4))
        return int.from_bytes(raw[offset - start:offset - start + size], "little")

    def _bar_write(self, offset: int, size: int, value: int) -> None:
        if offset % 4 or size not in (4, 8) or (size == 8 and offset % 8):
            self.log(f"{size}-byte write at ABAR offset {offset:#x} ignored (registers "
                     f"take aligned dwords)")
            return
        issued = False
        with self.lock:
            for part in range(0, size, 4):
                issued |= self._write_dword(offset + part, value >> 8 * part & 0xFFFFFFFF)
        if issued:
            os.eventfd_write(self._kick, 1)  # the I/O thread starts the commands

    def _read_dword(self, reg: int) -> int:
        if reg >= PORT_BASE:
            index, port_reg = divmod(reg - PORT_BASE, PORT_STRIDE)
            return self.ports[index].read(port_reg) if index < MAX_PORTS else 0
        return {CAP: self.cap, GHC: self.ghc, IS: self.irq_status, PI: self.implemented,
                VS: AHCI_VERSION, CAP2: CAP2_APST}.get(reg, 0)

    def _write_dword(self, reg: int, value: int) -> bool:
        """Write a register; True when a port was given commands."""
        if reg >= PORT_BASE:
            index, port_reg = divmod(reg - PORT_BASE, PORT_STRIDE)
            return index < MAX_PORTS and self.ports[index].write(port_reg, value)
        if reg == GHC:
            if value & GHC_HR:
                self._reset()
            else:
                self.ghc = GHC_AE | (value & GHC_IE)
                self._update_interrupt(new=False)
        elif reg == IS:
            self.irq_status &= ~value
            self._update_interrupt(new=False)
        return False

    def _reset(self) -> None:
        """GHC.HR: every port and the generic registers back to their reset values."""
        for port in self.ports:
            port.hba_reset()
        self.ghc = GHC_AE
        self.irq_status = 0
        self._update_interrupt(new=False)

    # ---- interrupts (lock held) ----

    def port_interrupt(self, port: Port) -> None:
        if port.pending_interrupt:
            self._update_interrupt(new=True)

    def _update_interrupt(self, *, new: bool) -> None:
        for port in self.ports:
            if port.pending_interrupt:
                self.irq_status |= 1 << port.index
        level = bool(self.ghc & GHC_IE and self.irq_status)
        if self.msi.enabled:
            self.set_intx(False)
            if level and (new or not self._level):
                self.msi_interrupts += 1
                self.msi.trigger()
        else:
            if level and not self.intx_level:
                self.intx_interrupts += 1
            self.set_intx(level)
        self._level = level

    # ---- commands (the I/O thread) ----

    def run_commands(self) -> None:
        """Start the commands the guest issued since the last call."""
        try:
            os.eventfd_read(self._kick)
        except BlockingIOError:
            pass
        with self.lock:
            for port in self.ports:
                port.process()

    # ---- the rest ----

    def stats(self) -> dict[str, Any]:
        counters: dict[str, Any] = {"msi_interrupts": self.msi_interrupts,
                                    "intx_interrupts": self.intx_interrupts}
        for port in self.ports:
            if port.drive is not None:
                counters.update({f"port{port.index}_{k}": v
                                 for k, v in port.drive.backend.stats().items()})
        return counters

    def save_state(self) -> dict[str, Any]:
        for port in self.ports:
            if port.drive is not None:
                port.drive.drain()  # outside the lock: completions take it
        with self.lock:
            try:
                ports = {str(p.index): p.save() for p in self.ports if p.drive is not None}
            except HvfError as e:
                raise DeviceError(f"{self.name}: {e}") from None
            return {"pci": super().save_state(), "hba": HbaState(self.ghc, self.irq_status)
                    .to_fields(), "ports": ports}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        for part in ("pci", "hba", "ports"):
            if not isinstance(fields.get(part), dict):
                raise DeviceError(f"{self.name}: saved state lacks its {part!r} part")
        try:
            hba = HbaState.from_fields(fields["hba"], self.implemented)
            ports = ports_from_fields(fields["ports"], self.implemented)
            with self.lock:
                super().restore_state(fields["pci"], version)
                for index, port_fields in ports.items():
                    self.ports[index].restore(
                        port_fields, f"{self.name} port {index}",
                        "pci.{}.{}.{}.port.{}.path".format(*self.address, index))
                self.ghc, self.irq_status = hba.ghc | GHC_AE, hba.irq_status
                self._level = bool(self.ghc & GHC_IE and self.irq_status)
        except ValueError as e:
            raise DeviceError(f"{self.name}: {e}") from None
        os.eventfd_write(self._kick, 1)  # commands the guest issued before the save

    def close(self) -> None:
        with self.lock:
            for port in self.ports:
                port.shut_down()
        if hasattr(self, "ctx"):
            self.ctx.loop.remove_reader(self._kick)
            self.msi.close()
        for port in self.ports:
            if port.drive is not None:
                port.drive.close()
        os.close(self._kick)
