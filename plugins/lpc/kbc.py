# SPDX-License-Identifier: BSD-2-Clause
"""The i8042 keyboard controller at 0x60/0x64, with a keyboard and no mouse.

Enough of the controller for firmware and OSes to probe it, configure it and reset the
machine through it: controller commands (self-tests, command byte, port enables, output
port, pulse lines), keyboard device commands (reset, identify, LEDs, scan-code set,
typematic, enable/disable), IRQ 1 when a byte waits and the command byte enables it.
Writing the output port with bit 0 clear, or pulsing line 0 (0xFE), resets the machine
(hvf exits with status 0, as bhyve does on reset). No key presses come from the host:
hvf's consoles are serial.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from hvf import exitcodes
from hvf.device import Device
from hvf.snapshot_api import field_bytes, field_int

if TYPE_CHECKING:
    from hvf.vm import Machine

DATA_PORT = 0x60
COMMAND_PORT = 0x64
KEYBOARD_IRQ = 1
#: Bytes waiting for the guest to read port 0x60, at most (more are dropped).
QUEUE_LIMIT = 64

ST_OUTPUT_FULL = 0x01
ST_SYSTEM = 0x04
ST_COMMAND = 0x08
ST_UNLOCKED = 0x10
ST_AUX_DATA = 0x20

CB_KBD_INT = 0x01
CB_SYSTEM = 0x04
CB_KBD_DISABLED = 0x10
CB_AUX_DISABLED = 0x20
CB_TRANSLATE = 0x40

ACK = 0xFA
SELF_TEST_OK = 0x55
KBD_BAT_OK = 0xAA
OUT_RESET = 0x01  # output port bit 0: 0 holds the CPU in reset
OUT_A20 = 0x02

# Controller commands that take a data byte next.
_WITH_ARGUMENT = {0x60, 0xD1, 0xD2, 0xD3, 0xD4}
# Keyboard commands that take a data byte next.
_KBD_WITH_ARGUMENT = {0xED, 0xF0, 0xF3}


class KeyboardController(Device):
    def __init__(self) -> None:
        super().__init__("kbc")
        self.command_byte = CB_KBD_INT | CB_SYSTEM | CB_TRANSLATE
        self.status = ST_UNLOCKED
        self.output_port = OUT_RESET | OUT_A20
        self.queue: deque[int] = deque()
        self.pending_command = 0  # controller command waiting for its data byte
        self.kbd_pending = 0  # keyboard command waiting for its data byte
        self.scancode_set = 2

    def attach(self, vm: Machine) -> None:
        self.vm = vm
        self.irq = vm.interrupts.line(KEYBOARD_IRQ).source(self.name)
        vm.pio.register(DATA_PORT, 1, "kbc data", self._read_data, self._write_data)
        vm.pio.register(COMMAND_PORT, 1, "kbc command", self._read_status, self._write_command)

    # ---- output buffer ----

    def _push(self, *data: int) -> None:
        room = QUEUE_LIMIT - len(self.queue)  # a guest that never reads cannot grow it
        self.queue.extend(data[:max(room, 0)])
        self._update()

    def _update(self) -> None:
        full = bool(self.queue)
        self.status = (self.status | ST_OUTPUT_FULL) if full else (self.status & ~ST_OUTPUT_FULL)
        if full and self.command_byte & CB_KBD_INT:
            self.irq.pulse()

    def _read_data(self, offset: int, size: int) -> int:
        value = self.queue.popleft() if self.queue else 0
        self.status &= ~ST_OUTPUT_FULL
        if self.queue:
            self._update()
        return value

    def _read_status(self, offset: int, size: int) -> int:
        return self.status

    # ---- writes ----

    def _write_command(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        self.status |= ST_COMMAND
        self.pending_command = 0
        if value in _WITH_ARGUMENT:
            self.pending_command = value
        elif value == 0x20:
            self._push(self.command_byte)
        elif value == 0xA7:
            self.command_byte |= CB_AUX_DISABLED
        elif value == 0xA8:
            self.command_byte &= ~CB_AUX_DISABLED
        elif value == 0xA9:
            self._push(0x01)  # auxiliary interface test: clock line stuck low (no mouse)
        elif value == 0xAA:
            self.status |= ST_SYSTEM
            self._push(SELF_TEST_OK)
        elif value == 0xAB:
            self._push(0x00)  # keyboard interface test passed
        elif value == 0xAD:
            self.command_byte |= CB_KBD_DISABLED
        elif value == 0xAE:
            self.command_byte &= ~CB_KBD_DISABLED
        elif value == 0xC0:
            self._push(0x00)  # input port
        elif value == 0xD0:
            self._push(self.output_port)
        elif 0xF0 <= value <= 0xFF and not value & 0x01:
            self._reset("pulsed the reset line")

    def _write_data(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        self.status &= ~ST_COMMAND
        command, self.pending_command = self.pending_command, 0
        if command == 0x60:
            self.command_byte = value
            self.status = (self.status & ~ST_SYSTEM) | (value & CB_SYSTEM)
        elif command == 0xD1:
            self.output_port = value
            if not value & OUT_RESET:
                self._reset("cleared the reset bit of its output port")
        elif command == 0xD2:
            self._push(value)
        elif command in (0xD3, 0xD4):
            pass  # no mouse: bytes for the auxiliary device go nowhere
        else:
            self._keyboard(value)

    def _keyboard(self, value: int) -> None:
        """A byte for the keyboard itself."""
        if self.kbd_pending:
            command, self.kbd_pending = self.kbd_pending, 0
            if command == 0xF0 and value == 0:
                self._push(ACK, self.scancode_set)
            else:
                if command == 0xF0 and value in (1, 2, 3):
                    self.scancode_set = value
                self._push(ACK)
            return
        if value in _KBD_WITH_ARGUMENT:
            self.kbd_pending = value
            self._push(ACK)
        elif value == 0xFF:
            self.scancode_set = 2
            self._push(ACK, KBD_BAT_OK)
        elif value == 0xF2:
            self._push(ACK, 0xAB, 0x83)
        elif value == 0xEE:
            self._push(0xEE)
        else:
            self._push(ACK)  # enable, disable, defaults, resend and the rest

    def _reset(self, how: str) -> None:
        self.vm.request_exit(exitcodes.REBOOT, f"reset: the guest {how} (keyboard controller)")

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        return {
            "command_byte": self.command_byte, "status": self.status,
            "output_port": self.output_port, "queue": bytes(self.queue),
            "pending_command": self.pending_command, "kbd_pending": self.kbd_pending,
            "scancode_set": self.scancode_set,
        }

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        for name in ("command_byte", "status", "output_port", "pending_command",
                     "kbd_pending", "scancode_set"):
            setattr(self, name, field_int(fields, name, 8))
        self.queue = deque(field_bytes(fields, "queue", max_size=QUEUE_LIMIT))
