# SPDX-License-Identifier: BSD-2-Clause
"""Reset control: port 0xCF9 (bit 2 resets) and system control port A at 0x92 (bit 0
resets, bit 1 is the fast A20 gate). A reset ends hvf with status 0, as bhyve's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hvf import exitcodes
from hvf.device import Device
from hvf.snapshot_api import Fields, check_fields, field_flags

if TYPE_CHECKING:
    from hvf.context import DeviceContext

RESET_CONTROL_PORT = 0xCF9
PORT_A = 0x92
RCR_RESET = 0x04
RCR_WRITABLE = 0x0A  # full reset (bit 3) and system reset (bit 1) select the kind
PORT_A_RESET = 0x01
PORT_A_A20 = 0x02


@attrs.define
class ResetState:
    """The reset control register and port A (A20 gate), as after reset."""

    rcr: int = 0
    port_a: int = PORT_A_A20

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields) -> ResetState:
        """Rebuild from :meth:`to_fields`; ``ValueError`` names a bad field."""
        check_fields(fields, attrs.fields_dict(cls))
        return cls(rcr=field_flags(fields, "rcr", 8, RCR_WRITABLE),
                   port_a=field_flags(fields, "port_a", 8, PORT_A_A20))


class ResetControl(Device):
    """0xCF9 and port 0x92; the registers live in :attr:`state`."""

    def __init__(self) -> None:
        super().__init__("reset")
        self.state = ResetState()

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        ctx.pio.register(RESET_CONTROL_PORT, 1, "reset control", self._read_rcr, self._write_rcr)
        ctx.pio.register(PORT_A, 1, "system control port a", self._read_a, self._write_a)

    def _read_rcr(self, offset: int, size: int) -> int:
        return self.state.rcr

    def _write_rcr(self, offset: int, size: int, value: int) -> None:
        self.state.rcr = value & RCR_WRITABLE
        if value & RCR_RESET:
            self.ctx.request_exit(exitcodes.REBOOT, "reset: the guest wrote 0xCF9")

    def _read_a(self, offset: int, size: int) -> int:
        return self.state.port_a

    def _write_a(self, offset: int, size: int, value: int) -> None:
        self.state.port_a = value & PORT_A_A20
        if value & PORT_A_RESET:
            self.ctx.request_exit(exitcodes.REBOOT, "reset: the guest wrote port 0x92")

    def save_state(self) -> Fields:
        return self.state.to_fields()

    def restore_state(self, fields: Fields, version: int) -> None:
        self.state = ResetState.from_fields(fields)
