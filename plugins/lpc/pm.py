# SPDX-License-Identifier: BSD-2-Clause
"""ACPI fixed hardware: PM1 event and control blocks, the PM timer, GPE0, SMI_CMD.

SMI_CMD is bhyve's 0xB2 (0xA0 enables ACPI, 0xA1 disables). The PM block sits at 0x600
as on QEMU's PIIX4, not at bhyve's 0x400, whose PM1a status/enable overlap the debug
console port 0x402 that SeaBIOS writes its log to: PM1a event block 0x600 (status
0x600, enable 0x602), PM1a control 0x604, PM timer 0x608 (32-bit, 3.579545 MHz), GPE0
0x60C (status) / 0x60D (enable). The SCI is IRQ 9, level-triggered,
high while an enabled status bit is set and ACPI is on. Writing SLP_EN with SLP_TYP 5
(the DSDT's ``\\_S5``) powers off: hvf exits with status 1. ``SIGTERM`` presses the
power button once the guest has enabled ACPI.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import attrs

from hvf import exitcodes
from hvf.device import Device
from hvf.snapshot_api import Fields, check_fields, field_flags, field_int

if TYPE_CHECKING:
    from hvf.context import DeviceContext

SMI_CMD = 0xB2
ACPI_ENABLE = 0xA0
ACPI_DISABLE = 0xA1
PM_BASE = 0x600
PM1A_EVT = PM_BASE
PM1A_EVT_LEN = 4
PM1A_CNT = PM_BASE + 4
PM1A_CNT_LEN = 2
PM_TMR = PM_BASE + 8
PM_TMR_LEN = 4
GPE0 = PM_BASE + 0xC
GPE0_LEN = 2
SCI_IRQ = 9
PM_TIMER_HZ = 3_579_545

STS_TMR = 1 << 0
STS_BM = 1 << 4
STS_GBL = 1 << 5
STS_PWRBTN = 1 << 8
STS_SLPBTN = 1 << 9
STS_RTC = 1 << 10
STS_WAK = 1 << 15
STS_W1C = STS_TMR | STS_BM | STS_GBL | STS_PWRBTN | STS_SLPBTN | STS_RTC | STS_WAK
EN_WRITABLE = STS_TMR | STS_GBL | STS_PWRBTN | STS_SLPBTN | STS_RTC

CNT_SCI_EN = 1 << 0
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP_MASK = 0x7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 1 << 13
CNT_WRITABLE = 0x1C07 & ~CNT_SCI_EN  # BM_RLD, GBL_RLS, SLP_TYP; SCI_EN via SMI_CMD
#: SLP_TYP value of S5 (soft off), as the DSDT's \_S5 package gives it.
SLP_TYP_S5 = 5


@attrs.define
class PmState:
    """The PM1a status, enable and control registers and GPE0's, as after reset."""

    status: int = 0
    enable: int = 0
    control: int = 0
    gpe_status: int = 0
    gpe_enable: int = 0

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields) -> PmState:
        """Rebuild from :meth:`to_fields`; ``ValueError`` names a field no PM holds."""
        check_fields(fields, attrs.fields_dict(cls))
        return cls(
            status=field_flags(fields, "status", 16, STS_W1C),
            enable=field_flags(fields, "enable", 16, EN_WRITABLE),
            control=field_flags(fields, "control", 16, CNT_WRITABLE | CNT_SCI_EN),
            gpe_status=field_int(fields, "gpe_status", 8),
            gpe_enable=field_int(fields, "gpe_enable", 8),
        )


class PowerManagement(Device):
    """ACPI fixed hardware; its registers live in :attr:`state` (a :class:`PmState`)."""

    def __init__(self) -> None:
        super().__init__("pm")
        self.state = PmState()
        self._lock = threading.Lock()

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.sci = ctx.interrupts.line(SCI_IRQ, level_triggered=True).source("acpi sci")
        ctx.pio.register(SMI_CMD, 1, "acpi smi_cmd", lambda o, s: 0, self._smi_cmd)
        ctx.pio.register(PM1A_EVT, PM1A_EVT_LEN, "acpi pm1a_evt", self._evt_read, self._evt_write)
        ctx.pio.register(PM1A_CNT, PM1A_CNT_LEN, "acpi pm1a_cnt", self._cnt_read, self._cnt_write)
        ctx.pio.register(PM_TMR, PM_TMR_LEN, "acpi pm_tmr", self._timer_read)
        ctx.pio.register(GPE0, GPE0_LEN, "acpi gpe0", self._gpe_read, self._gpe_write)

    @property
    def acpi_enabled(self) -> bool:
        return bool(self.state.control & CNT_SCI_EN)

    def _update_sci(self) -> None:
        """Drive the SCI: high while an enabled event is pending and ACPI is on."""
        state = self.state
        self.sci.set(self.acpi_enabled and bool(
            (state.status & state.enable) or (state.gpe_status & state.gpe_enable)))

    def press_power_button(self) -> bool:
        """Raise the power-button event; False when the guest has not enabled ACPI."""
        with self._lock:
            if not self.acpi_enabled:
                return False
            self.state.status |= STS_PWRBTN
            self._update_sci()
            return True

    # ---- ports ----

    def _smi_cmd(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if value & 0xFF == ACPI_ENABLE:
                self.state.control |= CNT_SCI_EN
            elif value & 0xFF == ACPI_DISABLE:
                self.state.control &= ~CNT_SCI_EN
            self._update_sci()

    def _evt_read(self, offset: int, size: int) -> int:
        block = self.state.status | self.state.enable << 16
        return (block >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def _evt_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            state = self.state
            block = (value & ((1 << (8 * size)) - 1)) << (8 * offset)
            touched = ((1 << (8 * size)) - 1) << (8 * offset)
            if touched & 0xFFFF:
                state.status &= ~(block & STS_W1C)
            if touched & 0xFFFF0000:
                keep = state.enable & ~(touched >> 16)
                state.enable = (keep | (block >> 16)) & EN_WRITABLE
            self._update_sci()

    def _cnt_read(self, offset: int, size: int) -> int:
        return (self.state.control >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def _cnt_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            value = (value << (8 * offset)) & 0xFFFF
            touched = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFF
            control = self.state.control
            self.state.control = (control & ~(touched & CNT_WRITABLE)) | (value & CNT_WRITABLE)
        if value & CNT_SLP_EN:
            sleep_type = (value & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT
            if sleep_type == SLP_TYP_S5:
                self.ctx.request_exit(exitcodes.POWEROFF, "the guest powered off (ACPI S5)")
            else:
                self.ctx.log(f"pm: sleep type {sleep_type} requested; only S5 is supported")

    def _timer_read(self, offset: int, size: int) -> int:
        ticks = time.monotonic_ns() * PM_TIMER_HZ // 1_000_000_000
        return (ticks >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def _gpe_read(self, offset: int, size: int) -> int:
        block = self.state.gpe_status | self.state.gpe_enable << 8
        return (block >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def _gpe_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                byte = (value >> (8 * i)) & 0xFF
                if offset + i == 0:
                    self.state.gpe_status &= ~byte
                elif offset + i == 1:
                    self.state.gpe_enable = byte
            self._update_sci()

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        return self.state.to_fields()

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        state = PmState.from_fields(fields)
        with self._lock:
            self.state = state
            self._update_sci()
