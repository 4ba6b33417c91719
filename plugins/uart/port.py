# SPDX-License-Identifier: BSD-2-Clause
"""A serial port: the 16550A model, its console backend and the lock between them.

Bus wiring (LPC's COM ports, the PCI UART) registers :meth:`SerialPort.read` and
:meth:`SerialPort.write` as I/O handlers and gives an ``irq(level)`` callable; this class
knows neither addresses nor interrupt numbers. vCPU accesses and host input (on the I/O
thread) are serialised by one lock, as in bhyve.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hvf.plugins.uart.model import IIR_FCR, MCR, RBR_THR, Uart16550, UartState

if TYPE_CHECKING:
    from hvf.console import ConsoleBackend
    from hvf.context import DeviceContext

#: Accesses after which host input may be wanted again: an RBR read, an FCR write
#: (FIFO reset or enable) or an MCR write (loopback off; OUT2 also gates the IRQ). A
#: read that touches RBR starts at it; a wide write reaches FCR or MCR from below, so
#: whether a write touches them is looked up by offset (0-7) and size (1-8).
_READ_GATES = frozenset({RBR_THR})
_WRITE_GATES = tuple(tuple(offset <= IIR_FCR < offset + size or offset <= MCR < offset + size
                           for size in range(9)) for offset in range(8))


class SerialPort:
    """A 16550A with a host backend, for any bus."""

    state_version = 1

    def __init__(
        self,
        name: str,
        backend: ConsoleBackend | None,
        irq: Callable[[bool], None],
        *,
        gate_with_out2: bool = False,
    ) -> None:
        self.name = name
        self.backend = backend
        self.lock = threading.Lock()
        self._irq = irq
        self._gate = gate_with_out2
        self._line = False
        self._tx_buffer = bytearray()
        self.model = Uart16550(self._intr_changed, self._tx_buffer.append)

    # ---- bus side (vCPU threads) ----

    def read(self, offset: int, size: int) -> int:
        """Byte registers; a wider access reads consecutive registers, low byte first."""
        with self.lock:
            value = 0
            for i in range(size):
                if offset + i < 8:
                    value |= self.model.read(offset + i) << (8 * i)
                else:
                    value |= 0xFF << (8 * i)
            if offset in _READ_GATES:
                self._want_input()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            for i in range(size):
                if offset + i < 8:
                    self.model.write(offset + i, (value >> (8 * i)) & 0xFF)
            if self._tx_buffer:
                if self.backend is not None:
                    self.backend.write(bytes(self._tx_buffer))
                self._tx_buffer.clear()
            if _WRITE_GATES[offset][size]:
                if self._gate:
                    self._update_line()  # OUT2 may have changed
                self._want_input()

    def _want_input(self) -> None:
        if self.backend is not None and self.model.rx_room():
            self.backend.input_wanted()

    def _intr_changed(self, level: bool) -> None:
        self._update_line()

    def _update_line(self) -> None:
        level = self.model.irq_pending and (self.model.out2 or not self._gate)
        if level != self._line:
            self._line = level
            self._irq(level)

    # ---- host side (I/O thread): the console Receiver protocol ----

    def room(self) -> int:
        with self.lock:
            return self.model.rx_room()

    def push(self, data: bytes) -> int:
        with self.lock:
            return self.model.receive(data)

    def idle(self) -> None:
        with self.lock:
            self.model.rx_idle()

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.model.state.to_fields())

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        with self.lock:
            self.model = Uart16550(
                self._intr_changed, self._tx_buffer.append, UartState.from_fields(fields)
            )
            self._update_line()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


def open_backend(ctx: DeviceContext, spec: str | None, owner: str, port: SerialPort) -> None:
    """Create, open and attach the console backend ``spec`` (None: no backend)."""
    if spec:
        port.backend = ctx.open_console(spec, owner, port)
