# SPDX-License-Identifier: BSD-2-Clause
"""virtio-console (virtio 1.x §5.3) with multiple ports, on the UARTs' console backends.

``-s N,virtio-console,NAME=BACKEND[,NAME=BACKEND...]`` (bhyve's syntax; up to 16
ports): each port is named and has a console backend, as ``-l com1,BACKEND`` takes
(``stdio``, ``pty``, ``tcp=``, ``unix=``, ``file=``, a tty); a bare path that is not a
character device is a UNIX socket, as in bhyve. Port 0 is the console port (Linux's
``hvc0``); every port is announced with its name (``/dev/virtio-ports/NAME``).

Queues: port 0 receive 0 / transmit 1, control receive 2 / transmit 3, port k ≥ 1
receive 2k+2 / transmit 2k+3. Guest output is written to the backend on the I/O
thread; while the host side lags by more than :data:`TX_BACKLOG` bytes the device
stops taking transmit buffers (the guest waits; nothing is dropped). Host input is
read only while the guest has receive buffers posted.
"""

from __future__ import annotations

import os
import stat
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs

from hvf.dma import write_views
from hvf.errors import ConfigError, DeviceError, VirtqueueError
from hvf.plugins.virtio.cring import BLOCKED, EMPTY, ERROR, SLOW, TxPath
from hvf.plugins.virtio.pci import VirtioPciDevice
from hvf.plugins.virtio.spec import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    F_RING_INDIRECT_DESC,
    TYPE_CONSOLE,
)
from hvf.snapshot_api import Fields, check_fields

if TYPE_CHECKING:
    from hvf.console import ConsoleBackend
    from hvf.context import DeviceContext
    from hvf.plugins.virtio.queue import SplitQueue
    from hvf.vm import Machine

F_MULTIPORT = 1 << 1
MAX_PORTS = 16
QUEUE_SIZE = 256
#: Guest output queued for a slow host before transmit buffers are held back; also the
#: bytes one ``writev`` of the C path takes (one chain at least).
TX_BACKLOG = 64 * 1024
#: Transmit chains written with one ``writev`` at most (below the kernel's IOV_MAX).
TX_BATCH = 256
#: Host input taken per receive round.
RX_CHUNK = 64 * 1024
CONTROL_RX, CONTROL_TX = 2, 3

# Control events (§5.3.6.2).
DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY = 0, 1, 2, 3
CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME = 4, 5, 6, 7
_CONTROL = struct.Struct("<IHH")


@attrs.define
class ConsoleState:
    """The console's own state: which ports the guest has open, and the control
    messages not yet delivered to it."""

    guest_open: list[bool]
    control_out: list[bytes]

    def to_fields(self) -> Fields:
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Fields, ports: int) -> ConsoleState:
        """Rebuild for a device of ``ports`` ports; ``ValueError`` names a bad field."""
        check_fields(fields, attrs.fields_dict(cls))
        opened, pending = fields["guest_open"], fields["control_out"]
        if not isinstance(opened, list) or len(opened) != ports or any(
                type(o) is not bool for o in opened):
            raise ValueError(f"saved field 'guest_open' is not {ports} bools")
        if not isinstance(pending, list) or any(
                type(m) is not bytes or not _CONTROL.size <= len(m) <= 4096 for m in pending):
            raise ValueError("saved field 'control_out' is not a list of control messages")
        return cls(list(opened), list(pending))


def rx_queue(port: int) -> int:
    return 0 if port == 0 else 2 * port + 2


class ConsolePort:
    """One port: its queues, its backend, and whether the guest has it open. It is the
    backend's :class:`~hvf.console.Receiver` (called on the I/O thread)."""

    def __init__(self, device: VirtioConsole, index: int, name: str, spec: str) -> None:
        self.device = device
        self.index = index
        self.name = name
        self.spec = spec
        self.rx = rx_queue(index)
        self.tx = self.rx + 1
        self.backend: ConsoleBackend | None = None
        self.guest_open = False
        #: Bytes carried each way.
        self.received = 0
        self.transmitted = 0

    def open_backend(self, ctx: DeviceContext) -> None:
        self.backend = ctx.open_console(self.spec, f"{self.device.name} port {self.name}", self)
        self.backend.on_drained = self._drained

    # ---- host input (Receiver) ----

    def room(self) -> int:
        with self.device.lock:
            return RX_CHUNK if self._receiving() is not None else 0

    def push(self, data: bytes) -> int:
        device = self.device
        with device.lock:
            queue = self._receiving()
            taken = 0
            while queue is not None and taken < len(data):
                chain = queue.pop()
                if chain is None:
                    break
                written = write_views(chain.writable, memoryview(data)[taken:])
                taken += written
                queue.push(chain, written)
            if taken:
                self.received += taken
                device.interrupt_queue(self.rx)
            return taken

    def idle(self) -> None:
        pass

    def _receiving(self) -> SplitQueue | None:
        device = self.device
        if not (self.guest_open or not device.multiport) or not device.running:
            return None
        return device.queues[self.rx]

    def rx_posted(self) -> None:
        """The guest posted receive buffers: resume reading host input."""
        if self.backend is not None:
            self.backend.input_wanted()

    # ---- guest output (I/O thread, lock held) ----

    def transmit(self, queue: SplitQueue) -> None:
        """Write the guest's transmit buffers to the backend: in C (:class:`TxPath`)
        while nothing is queued for the host, else a batch per ``writev``; while the
        host lags by TX_BACKLOG, stop (``_drained`` resumes)."""
        backend = self.backend
        path = self.device.tx_path
        while True:
            queue.disable_notifications()
            while backend is None or backend.backlog < TX_BACKLOG:
                if path is not None and backend is not None:
                    moved = self._transmit_direct(path, queue, backend)
                    if moved is not None:
                        if moved:
                            continue
                        break
                chains, pieces, size = [], [], 0
                broken = None  # a chain that breaks the rules ends the batch
                while len(chains) < TX_BATCH and size < TX_BACKLOG:
                    try:
                        chain = queue.pop()
                    except VirtqueueError as e:
                        broken = e
                        break
                    if chain is None:
                        break
                    chains.append(chain)
                    pieces += chain.readable
                    size += chain.readable_length
                if backend is not None and size:
                    backend.write_many([p for p in pieces if len(p)])
                for chain in chains:
                    queue.push(chain, 0)
                self.transmitted += size
                if broken is not None:
                    raise broken  # after the chains before it, as the C path sends them
                if not chains:
                    break
            else:
                self.device.interrupt_queue(self.tx)
                return
            self.device.interrupt_queue(self.tx)
            if not queue.enable_notifications():
                return

    def _transmit_direct(self, path: TxPath, queue: SplitQueue,
                         backend: ConsoleBackend) -> bool | None:
        """One batch of the C path: True when it returned chains, False when the ring
        is empty, None when the Python path must take the next chain (one C refuses,
        output queued for the host, or a failed write, which that path reports)."""
        status = SLOW

        def write(fd: int) -> tuple[int, bytes]:
            nonlocal status
            status, _, took, detail = path.transmit(
                self.tx, queue, self.device.indirect, fd, TX_BACKLOG, TX_BATCH)
            rest = b""
            if status == BLOCKED:  # the host took `detail` bytes of the next chain
                chain = queue.pop()
                if chain is not None:
                    rest = b"".join(chain.readable)[detail:]
                    queue.push(chain, 0)
            self.transmitted += took + len(rest)
            return took, rest

        if not backend.write_direct(write) or status in (SLOW, ERROR):
            return None
        return status != EMPTY

    def _drained(self) -> None:
        with self.device.lock:
            self.device.run_queue(self.tx)


class VirtioConsole(VirtioPciDevice):
    device_type = TYPE_CONSOLE
    class_code = 0x078000  # simple communications, other
    device_features = F_MULTIPORT

    def __init__(self, name: str, ports: list[tuple[str, str]]) -> None:
        if not 1 <= len(ports) <= MAX_PORTS:
            raise ConfigError(f"{name}: between 1 and {MAX_PORTS} ports, not {len(ports)}")
        self.queue_max_sizes = (QUEUE_SIZE,) * (2 * len(ports) + 2)
        super().__init__(name)
        self.ports = [ConsolePort(self, i, n, spec) for i, (n, spec) in enumerate(ports)]
        self.control_out: deque[bytes] = deque()
        #: The ports' C transmit path (None: the Python path alone).
        self.tx_path: TxPath | None = None

    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        self.tx_path = TxPath(ctx.memory)
        for port in self.ports:
            port.open_backend(ctx)

    @property
    def indirect(self) -> bool:
        return bool(self.negotiated & F_RING_INDIRECT_DESC)

    @property
    def multiport(self) -> bool:
        return bool(self.negotiated & F_MULTIPORT)

    @property
    def running(self) -> bool:
        return self.state.status & (DRIVER_OK | DEVICE_NEEDS_RESET) == DRIVER_OK

    def device_config(self) -> bytes:
        return struct.pack("<HHII", 0, 0, len(self.ports), 0)

    def device_reset(self) -> None:
        for port in self.ports:
            port.guest_open = False
        self.control_out.clear()

    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        if index == CONTROL_TX and self.multiport:
            self._control_received(queue)
        elif index == CONTROL_RX and self.multiport:
            self._send_control()
        elif index % 2 == 0:
            port = self._port_of(index)
            if port is not None:
                port.rx_posted()
        else:
            port = self._port_of(index - 1)
            if port is not None:
                port.transmit(queue)

    def _port_of(self, rx: int) -> ConsolePort | None:
        index = 0 if rx == 0 else (rx - 2) // 2
        if index and not self.multiport:
            return None
        return self.ports[index] if index < len(self.ports) else None

    # ---- the control queues ----

    def _control_received(self, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            message = b"".join(bytes(v) for v in chain.readable)[: _CONTROL.size]
            queue.push(chain, 0)
            if len(message) == _CONTROL.size:
                self._control(*_CONTROL.unpack(message))
        self.interrupt_queue(CONTROL_TX)
        self._send_control()

    def _control(self, port_id: int, event: int, value: int) -> None:
        if event == DEVICE_READY and value == 1:
            for port in self.ports:
                self._queue_control(port.index, DEVICE_ADD, 1)
        elif event == PORT_READY and value == 1 and port_id < len(self.ports):
            port = self.ports[port_id]
            if port_id == 0:
                self._queue_control(0, CONSOLE_PORT, 1)
            self._queue_control(port_id, PORT_NAME, 1, port.name.encode())
            self._queue_control(port_id, PORT_OPEN, 1)  # the host side is always there
        elif event == PORT_OPEN and port_id < len(self.ports):
            port = self.ports[port_id]
            port.guest_open = bool(value)
            if port.guest_open:
                port.rx_posted()

    def _queue_control(self, port_id: int, event: int, value: int, extra: bytes = b"") -> None:
        self.control_out.append(_CONTROL.pack(port_id, event, value) + extra)

    def _send_control(self) -> None:
        queue = self.queues[CONTROL_RX]
        sent = False
        while queue is not None and self.control_out:
            chain = queue.pop()
            if chain is None:
                break
            queue.push(chain, write_views(chain.writable, self.control_out.popleft()))
            sent = True
        if sent:
            self.interrupt_queue(CONTROL_RX)

    def stats(self) -> dict[str, Any]:
        ports = {p.name: {"open": p.guest_open, "received": p.received,
                          "transmitted": p.transmitted} for p in self.ports}
        return {**super().stats(), "ports": ports}

    # ---- state ----

    def save_device(self) -> Fields:
        return ConsoleState([p.guest_open for p in self.ports], list(self.control_out)).to_fields()

    def restore_device(self, fields: Fields, version: int) -> None:
        try:
            state = ConsoleState.from_fields(fields, len(self.ports))
        except ValueError as e:
            raise DeviceError(f"{self.name}: {e}") from None
        for port, is_open in zip(self.ports, state.guest_open):
            port.guest_open = is_open
        self.control_out = deque(state.control_out)

    def close(self) -> None:
        super().close()
        for port in self.ports:
            if port.backend is not None:
                port.backend.close()


def _backend_spec(value: str) -> str:
    """bhyve's ``port=PATH`` is a UNIX socket; a character device is a tty."""
    if value.startswith("/"):
        try:
            if stat.S_ISCHR(os.stat(value).st_mode):
                return value
        except OSError:
            pass
        return f"unix={value}"
    return value


def parse(conf: list[str]) -> dict[str, str]:
    """``NAME=BACKEND`` pairs, in order, as ``port.NAME.path``."""
    fields: dict[str, str] = {}
    for option in conf:
        name, sep, value = option.partition("=")
        if not sep or not name or not value or "." in name:
            raise ConfigError(f"virtio-console: '{option}' is not NAME=BACKEND")
        if f"port.{name}.path" in fields:
            raise ConfigError(f"virtio-console: port '{name}' given twice")
        fields[f"port.{name}.path"] = value
    if not fields:
        raise ConfigError("virtio-console needs at least one port (e.g. port1=stdio)")
    return fields


def create(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> VirtioConsole:
    ports = config.get("port")
    where = "virtio-console@pci.{}.{}.{}".format(*slot)
    if not isinstance(ports, dict) or not ports:
        raise ConfigError(f"{where}: no ports (give NAME=BACKEND)")
    pairs = []
    for name, node in ports.items():
        path = node.get("path") if isinstance(node, dict) else None
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}: port '{name}' has no backend ('path')")
        pairs.append((name, _backend_spec(path)))
    return VirtioConsole(where, pairs)
