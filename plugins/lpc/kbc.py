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

from typing import TYPE_CHECKING, Any

import attrs

from hvf import exitcodes
from hvf.device import Device
from hvf.snapshot_api import Fields, check_fields, field_bytes, field_flags, field_int

if TYPE_CHECKING:
    from hvf.context import DeviceContext

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
#: The status bits this controller ever sets (no mouse: never AUX_DATA).
ST_USED = ST_OUTPUT_FULL | ST_SYSTEM | ST_COMMAND | ST_UNLOCKED

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


@attrs.define
class KbcState:
    """The controller's registers and output queue, as after power-on.

    ``queue`` holds the bytes waiting at port 0x60, oldest first (at most
    :data:`QUEUE_LIMIT`; the status's OUTPUT_FULL bit says whether any wait);
    ``pending_command`` and ``kbd_pending`` are the controller and keyboard commands
    waiting for their data byte (0: none).
    """

    command_byte: int = CB_KBD_INT | CB_SYSTEM | CB_TRANSLATE
    status: int = ST_UNLOCKED
    output_port: int = OUT_RESET | OUT_A20
    queue: bytearray = attrs.field(factory=bytearray)
    pending_command: int = 0
    kbd_pending: int = 0
    scancode_set: int = 2

    def to_fields(self) -> Fields:
        fields = attrs.asdict(self)
        fields["queue"] = bytes(self.queue)
        return fields

    @classmethod
    def from_fields(cls, fields: Fields) -> KbcState:
        """Rebuild from :meth:`to_fields`; ``ValueError`` names a field the i8042 could
        not hold."""
        check_fields(fields, attrs.fields_dict(cls))
        state = cls(
            command_byte=field_int(fields, "command_byte", 8),
            status=field_flags(fields, "status", 8, ST_USED),
            output_port=field_int(fields, "output_port", 8),
            queue=bytearray(field_bytes(fields, "queue", max_size=QUEUE_LIMIT)),
            pending_command=field_int(fields, "pending_command", 8),
            kbd_pending=field_int(fields, "kbd_pending", 8),
            scancode_set=field_int(fields, "scancode_set", 8),
        )
        if bool(state.status & ST_OUTPUT_FULL) != bool(state.queue):
            raise ValueError("saved field 'status' disagrees with the queue about output full")
        if state.pending_command and state.pending_command not in _WITH_ARGUMENT:
            raise ValueError("saved field 'pending_command' is not a command taking data")
        if state.kbd_pending and state.kbd_pending not in _KBD_WITH_ARGUMENT:
            raise ValueError("saved field 'kbd_pending' is not a keyboard command taking data")
        if state.scancode_set not in (1, 2, 3):
            raise ValueError("saved field 'scancode_set' is not 1, 2 or 3")
        return state


class KeyboardController(Device):
    """The i8042; its registers and queue live in :attr:`state` (a :class:`KbcState`)."""

    def __init__(self) -> None:
        super().__init__("kbc")
        self.state = KbcState()

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.irq = ctx.interrupts.line(KEYBOARD_IRQ).source(self.name)
        ctx.pio.register(DATA_PORT, 1, "kbc data", self._read_data, self._write_data)
        ctx.pio.register(COMMAND_PORT, 1, "kbc command", self._read_status, self._write_command)

    # ---- output buffer ----

    def _push(self, *data: int) -> None:
        queue = self.state.queue
        room = QUEUE_LIMIT - len(queue)  # a guest that never reads cannot grow it
        queue.extend(data[:max(room, 0)])
        self._update()

    def _update(self) -> None:
        state = self.state
        if state.queue:
            state.status |= ST_OUTPUT_FULL
            if state.command_byte & CB_KBD_INT:
                self.irq.pulse()
        else:
            state.status &= ~ST_OUTPUT_FULL

    def _read_data(self, offset: int, size: int) -> int:
        state = self.state
        value = state.queue.pop(0) if state.queue else 0
        state.status &= ~ST_OUTPUT_FULL
        if state.queue:
            self._update()
        return value

    def _read_status(self, offset: int, size: int) -> int:
        return self.state.status

    # ---- writes ----

    def _write_command(self, offset: int, size: int, value: int) -> None:
        state = self.state
        value &= 0xFF
        state.status |= ST_COMMAND
        state.pending_command = 0
        if value in _WITH_ARGUMENT:
            state.pending_command = value
        elif value == 0x20:
            self._push(state.command_byte)
        elif value == 0xA7:
            state.command_byte |= CB_AUX_DISABLED
        elif value == 0xA8:
            state.command_byte &= ~CB_AUX_DISABLED
        elif value == 0xA9:
            self._push(0x01)  # auxiliary interface test: clock line stuck low (no mouse)
        elif value == 0xAA:
            state.status |= ST_SYSTEM
            self._push(SELF_TEST_OK)
        elif value == 0xAB:
            self._push(0x00)  # keyboard interface test passed
        elif value == 0xAD:
            state.command_byte |= CB_KBD_DISABLED
        elif value == 0xAE:
            state.command_byte &= ~CB_KBD_DISABLED
        elif value == 0xC0:
            self._push(0x00)  # input port
        elif value == 0xD0:
            self._push(state.output_port)
        elif 0xF0 <= value <= 0xFF and not value & 0x01:
            self._reset("pulsed the reset line")

    def _write_data(self, offset: int, size: int, value: int) -> None:
        state = self.state
        value &= 0xFF
        state.status &= ~ST_COMMAND
        command, state.pending_command = state.pending_command, 0
        if command == 0x60:
            state.command_byte = value
            state.status = (state.status & ~ST_SYSTEM) | (value & CB_SYSTEM)
        elif command == 0xD1:
            state.output_port = value
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
        state = self.state
        if state.kbd_pending:
            command, state.kbd_pending = state.kbd_pending, 0
            if command == 0xF0 and value == 0:
                self._push(ACK, state.scancode_set)
            else:
                if command == 0xF0 and value in (1, 2, 3):
                    state.scancode_set = value
                self._push(ACK)
            return
        if value in _KBD_WITH_ARGUMENT:
            state.kbd_pending = value
            self._push(ACK)
        elif value == 0xFF:
            state.scancode_set = 2
            self._push(ACK, KBD_BAT_OK)
        elif value == 0xF2:
            self._push(ACK, 0xAB, 0x83)
        elif value == 0xEE:
            self._push(0xEE)
        else:
            self._push(ACK)  # enable, disable, defaults, resend and the rest

    def _reset(self, how: str) -> None:
        self.ctx.request_exit(exitcodes.REBOOT, f"reset: the guest {how} (keyboard controller)")

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        return self.state.to_fields()

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        self.state = KbcState.from_fields(fields)
