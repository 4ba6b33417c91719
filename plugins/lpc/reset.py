# SPDX-License-Identifier: BSD-2-Clause
"""Reset control: port 0xCF9 (bit 2 resets) and system control port A at 0x92 (bit 0
resets, bit 1 is the fast A20 gate). A reset ends hvf with status 0, as bhyve's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf import exitcodes
from hvf.device import Device
from hvf.snapshot_api import field_int

if TYPE_CHECKING:
    from hvf.vm import Machine

RESET_CONTROL_PORT = 0xCF9
PORT_A = 0x92
RCR_RESET = 0x04
RCR_WRITABLE = 0x0A  # full reset (bit 3) and system reset (bit 1) select the kind
PORT_A_RESET = 0x01
PORT_A_A20 = 0x02


class ResetControl(Device):
    def __init__(self) -> None:
        super().__init__("reset")
        self.rcr = 0
        self.port_a = PORT_A_A20

    def attach(self, vm: Machine) -> None:
        self.vm = vm
        vm.pio.register(RESET_CONTROL_PORT, 1, "reset control", self._read_rcr, self._write_rcr)
        vm.pio.register(PORT_A, 1, "system control port a", self._read_a, self._write_a)

    def _read_rcr(self, offset: int, size: int) -> int:
        return self.rcr

    def _write_rcr(self, offset: int, size: int, value: int) -> None:
        self.rcr = value & RCR_WRITABLE
        if value & RCR_RESET:
            self.vm.request_exit(exitcodes.REBOOT, "reset: the guest wrote 0xCF9")

    def _read_a(self, offset: int, size: int) -> int:
        return self.port_a

    def _write_a(self, offset: int, size: int, value: int) -> None:
        self.port_a = value & PORT_A_A20
        if value & PORT_A_RESET:
            self.vm.request_exit(exitcodes.REBOOT, "reset: the guest wrote port 0x92")

    def save_state(self) -> dict[str, Any]:
        return {"rcr": self.rcr, "port_a": self.port_a}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        self.rcr = field_int(fields, "rcr", 8) & RCR_WRITABLE
        self.port_a = field_int(fields, "port_a", 8) & PORT_A_A20
