# SPDX-License-Identifier: BSD-2-Clause
"""Console backends: the host side of a serial port.

A backend takes guest output with :meth:`ConsoleBackend.write` (called on a vCPU thread,
never blocks: bytes are buffered up to :data:`OUTPUT_LIMIT` and flushed by the I/O
thread; beyond that they are dropped and counted) and feeds host input to a
:class:`Receiver` on the I/O thread, reading only as many bytes as the receiver has room
for, so no byte read from the host is ever lost. The registry of backends is filled by
plugins through ``hvf_register_console_backends``; ``-l com1,SPEC`` picks one by SPEC:
``stdio``, ``pty``, ``tcp=HOST:PORT``, ``unix=PATH``, ``file=PATH`` or a tty's path.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from hvf.iowait import writable

if TYPE_CHECKING:
    from hvf.eventloop import EventLoop
    from hvf.registry import ConsoleBackendFactory, Registry

log = logging.getLogger("hvf.console")

#: Guest output held for a stalled host reader before bytes are dropped.
OUTPUT_LIMIT = 256 * 1024
#: The most buffers one ``writev`` takes.
IOV_MAX = os.sysconf("SC_IOV_MAX")
#: How long closing a backend waits for the host side to take pending output.
CLOSE_FLUSH_SECONDS = 2.0


class Receiver(Protocol):
    """What a backend feeds host input into (a serial port)."""

    def room(self) -> int:
        """How many bytes can be accepted now."""

    def push(self, data: bytes) -> int:
        """Accept up to ``room()`` bytes; returns how many were taken."""

    def idle(self) -> None:
        """No more host input is immediately pending."""


def backend_name(spec: str) -> str:
    """The registry name a console SPEC selects: ``tcp=...`` → tcp, ``/dev/x`` → tty."""
    if spec.startswith("/"):
        return "tty"
    return spec.partition("=")[0]


class ConsoleBackend:
    """A console backend over host file descriptors, driven by the machine's I/O thread.

    Subclasses open descriptors in :meth:`open` and call :meth:`connect` with them (a
    listening socket backend connects when a client arrives, and calls
    :meth:`disconnect` when it leaves).
    """

    #: Whether a read of 0 bytes means the peer went away (sockets) rather than
    #: "nothing more for now" (a terminal).
    eof_disconnects = False
    #: Called when the user asks to stop the VM from the console (Ctrl-A x on stdio).
    on_quit: Callable[[], None] | None = None

    def __init__(self, spec: str, owner: str) -> None:
        self.spec = spec
        self.owner = owner
        self.loop: EventLoop | None = None
        self.receiver: Receiver | None = None
        self.rfd: int | None = None
        self.wfd: int | None = None
        self.dropped = 0
        self.written = 0
        self._out = bytearray()
        self._lock = threading.Lock()
        self._flush_queued = False
        self._writer_armed = False
        self._reading = False
        self._held = b""  # host bytes read but not yet taken by the receiver
        #: Called on the I/O thread when queued output has all reached the host (a
        #: device that holds guest buffers back while :attr:`backlog` is high).
        self.on_drained: Callable[[], None] | None = None

    # ---- life cycle ----

    def open(self, loop: EventLoop, receiver: Receiver) -> None:
        """Open host resources; called once when the device attaches."""
        self.loop = loop
        self.receiver = receiver

    def connect(self, rfd: int | None, wfd: int | None) -> None:
        """Start using these descriptors (loop thread, or before the loop starts)."""
        self.rfd, self.wfd = rfd, wfd
        if wfd is not None:
            os.set_blocking(wfd, False)
        if rfd is not None:
            os.set_blocking(rfd, False)
            self._start_reading()
        if self._out:
            self._flush()

    def disconnect(self) -> None:
        """Stop using the current descriptors (the peer left); output is dropped until
        the next connection, as bhyve does."""
        assert self.loop is not None
        if self.rfd is not None:
            self.loop.remove_reader(self.rfd)
        if self.wfd is not None:
            self.loop.remove_writer(self.wfd)
        self._reading = self._writer_armed = False
        self.rfd = self.wfd = None
        with self._lock:
            self._out.clear()

    def close(self) -> None:
        """Flush pending output (waiting up to :data:`CLOSE_FLUSH_SECONDS` for a slow
        reader), count what could not be delivered, release host resources."""
        deadline = time.monotonic() + CLOSE_FLUSH_SECONDS
        with self._lock:
            while self.wfd is not None and self._out and time.monotonic() < deadline:
                try:
                    n = os.write(self.wfd, self._out)
                except BlockingIOError:
                    writable(self.wfd, deadline - time.monotonic())
                    continue
                except OSError:
                    break
                del self._out[:n]
                self.written += n
            self.dropped += len(self._out)
            self._out.clear()
        self.drain_peer(deadline)
        if self.dropped:
            log.warning("%s: %d bytes of guest output were dropped because the host side "
                        "(%s) did not read them", self.owner, self.dropped, self.spec)

    def drain_peer(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the host side to take delivered output, where
        closing would otherwise discard it (a pty's buffer)."""

    # ---- guest output (vCPU threads) ----

    @property
    def backlog(self) -> int:
        """Bytes of guest output queued for the host, not yet written."""
        return len(self._out)

    def write(self, data: bytes | memoryview) -> None:
        """Send guest output; never blocks.

        With nothing queued, the bytes go straight to the host with one non-blocking
        write (no thread hand-off); what the host does not take now is queued for the
        I/O thread, and beyond OUTPUT_LIMIT dropped and counted.
        """
        with self._lock:
            if self.wfd is None:
                if self.eof_disconnects:
                    return  # no client connected: output is discarded, as bhyve does
            elif not self._out:
                n = self._send(os.write, data, len(data))
                if n is None or n == len(data):
                    return
                data = data[n:]
            queue = self._enqueue(data)
        if queue and self.loop is not None:
            self.loop.call_soon(self._flush)

    def write_many(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Send several pieces of guest output (buffers of guest RAM, say) with one
        ``writev``, as :meth:`write` sends one."""
        if len(pieces) > IOV_MAX:
            pieces = (b"".join(pieces),)
        with self._lock:
            if self.wfd is None:
                if self.eof_disconnects:
                    return
                data = b"".join(pieces)
            elif not self._out:
                total = sum(map(len, pieces))
                n = self._send(os.writev, pieces, total)
                if n is None or n == total:
                    return
                data = b"".join(pieces)[n:]
            else:
                data = b"".join(pieces)
            queue = self._enqueue(data)
        if queue and self.loop is not None:
            self.loop.call_soon(self._flush)

    def write_direct(self, writer: Callable[[int], tuple[int, bytes]]) -> bool:
        """Let ``writer`` write guest output straight to the host descriptor (a device's
        C path), under the lock and only while nothing is queued: ``writer(fd)`` writes
        without blocking and returns how many bytes the host took and the bytes to
        queue after them (what a short write left of a guest buffer). False, without
        calling it, when output is queued or no descriptor is connected."""
        with self._lock:
            if self.wfd is None or self._out:
                return False
            taken, rest = writer(self.wfd)
            self.written += taken
            queue = self._enqueue(rest) if rest else False
        if queue and self.loop is not None:
            self.loop.call_soon(self._flush)
        return True

    def _send(self, call: Callable[[int, Any], int], what: Any, size: int) -> int | None:
        """One non-blocking write of ``size`` bytes (lock held): how many the host took,
        or None when the write failed (the bytes are counted as dropped)."""
        try:
            n = call(self.wfd, what)
        except BlockingIOError:
            return 0
        except OSError as e:
            self.dropped += size
            self._write_failed(e)
            return None
        self.written += n
        return n

    def _enqueue(self, data: bytes | memoryview) -> bool:
        """Queue what the host has not taken (lock held), dropping beyond OUTPUT_LIMIT;
        True when the I/O thread must be asked to flush."""
        room = OUTPUT_LIMIT - len(self._out)
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self._out += data
        queue = not self._flush_queued and not self._writer_armed
        self._flush_queued = True
        return queue

    # ---- I/O thread ----

    def _flush(self) -> None:
        with self._lock:
            self._flush_queued = False
            if self.wfd is None or not self._out:
                return
            try:
                n = os.write(self.wfd, self._out)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._write_failed(e)
                return
            del self._out[:n]
            self.written += n
            pending = bool(self._out)
        assert self.loop is not None
        if pending and not self._writer_armed:
            self._writer_armed = True
            self.loop.add_writer(self.wfd, self._writable)
        elif not pending and self._writer_armed:
            self._writer_armed = False
            self.loop.remove_writer(self.wfd)
        if not pending and self.on_drained is not None:
            self.on_drained()

    def _writable(self) -> None:
        self._flush()

    def _write_failed(self, e: OSError) -> None:
        if self.eof_disconnects:
            self.loop.call_soon(self.disconnect)  # type: ignore[union-attr]
        elif e.errno != errno.EIO:  # EIO: a pty with no reader; keep buffering
            log.warning("%s: writing to %s failed: %s", self.owner, self.spec, e.strerror)

    def _start_reading(self) -> None:
        if not self._reading and self.rfd is not None and self.loop is not None:
            try:
                self.loop.add_reader(self.rfd, self._readable)
            except PermissionError:  # a regular file or /dev/null: there is no input
                self.loop.remove_reader(self.rfd)
                self.rfd = None
                return
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self.rfd is not None and self.loop is not None:
            self._reading = False
            self.loop.remove_reader(self.rfd)

    def _readable(self) -> None:
        receiver = self.receiver
        assert receiver is not None and self.rfd is not None
        room = receiver.room()
        if self._held:
            taken = receiver.push(self._held[:room])
            self._held = self._held[taken:]
            room -= taken
        if room <= 0 or self._held:
            self._stop_reading()  # resumed by input_wanted() when the guest reads
            return
        try:
            data = os.read(self.rfd, room)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.EIO:  # a pty whose other side is closed
                return
            raise
        if not data:
            if self.eof_disconnects:
                self.disconnect()
            else:
                self._stop_reading()
            return
        data = self.filter_input(data)
        taken = receiver.push(data)
        self._held = data[taken:]
        if self._held:  # the receiver took less than it had room for: wait for it
            self._stop_reading()
        elif len(data) < room:
            receiver.idle()
        elif receiver.room() == 0:
            self._stop_reading()

    def filter_input(self, data: bytes) -> bytes:
        """Host input on its way to the guest; a terminal backend may intercept keys."""
        return data

    def input_wanted(self) -> None:
        """The receiver has room again (any thread): resume reading host input."""
        if not self._reading and self.rfd is not None and self.loop is not None:
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        receiver = self.receiver
        if self.rfd is None or receiver is None or receiver.room() <= 0:
            return
        if self._held:
            self._held = self._held[receiver.push(self._held):]
            if self._held:
                return  # still no room: the next input_wanted() tries again
        self._start_reading()


def open_console(backends: Registry[ConsoleBackendFactory], loop: EventLoop, spec: str,
                 owner: str, receiver: Receiver,
                 request_exit: Callable[[int, str], None]) -> ConsoleBackend:
    """Create the console backend ``spec`` for ``owner`` (a device) from ``backends``
    and open it on ``loop``; host input goes to ``receiver``, Ctrl-A x to
    ``request_exit``."""
    from hvf.errors import ConfigError

    entry = backends.get(backend_name(spec))
    if entry is None:
        known = ", ".join(backends.names())
        raise ConfigError(f"Unable to initialize backend '{spec}' for {owner}: "
                          f"unknown backend (known: {known})")
    backend: ConsoleBackend = entry.factory(spec, owner)
    backend.on_quit = lambda: request_exit(130, "quit from the console (Ctrl-A x)")
    backend.open(loop, receiver)
    return backend
