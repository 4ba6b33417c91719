# SPDX-License-Identifier: BSD-2-Clause
"""The console backends a serial port can use (``-l com1,SPEC``, ``-s N,uart,SPEC``).

- ``stdio``: this process's terminal, in raw mode, restored on every exit path; only
  one port may own it.
- ``/dev/...``: any tty (on Linux e.g. one side of a pty).
- ``/dev/nmdmNA`` (or ``B``): bhyve's null-modem pair, made of a pty (:mod:`.nmdm`).
- ``pty``: a new pseudo-terminal; its path is printed.
- ``tcp=HOST:PORT`` / ``unix=PATH``: a listening socket, one client at a time.
- ``file=PATH``: a write-only log of guest output.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import socket
import stat
import struct
import sys
import termios
import time
import tty

from hvf.console import ConsoleBackend, Receiver
from hvf.errors import ConfigError
from hvf.eventloop import EventLoop

log = logging.getLogger("hvf.console")

_saved_terminals: dict[int, list] = {}  # type: ignore[type-arg]
_saved_blocking: dict[int, bool] = {}


def restore_terminals() -> None:
    """Put every terminal hvf switched to raw mode back as it was (idempotent)."""
    for fd, attrs in list(_saved_terminals.items()):
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
        except (OSError, termios.error):
            pass
        del _saved_terminals[fd]
    for fd, blocking in list(_saved_blocking.items()):
        try:
            os.set_blocking(fd, blocking)
        except OSError:
            pass
        del _saved_blocking[fd]
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.terminator = "\n"


atexit.register(restore_terminals)


def make_raw(fd: int) -> None:
    """Switch the terminal on ``fd`` to raw mode, remembering how it was."""
    if fd not in _saved_terminals:
        _saved_terminals[fd] = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    attrs = termios.tcgetattr(fd)
    attrs[2] |= termios.CLOCAL  # never wait for carrier
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


ESCAPE = 0x01  # Ctrl-A, as QEMU's -nographic console


class StdioConsole(ConsoleBackend):
    """This terminal. Ctrl-A x stops the VM (the guest gets every other key, Ctrl-C
    included); Ctrl-A Ctrl-A sends one Ctrl-A."""

    owner_of_stdio: str | None = None

    def open(self, loop: EventLoop, receiver: Receiver) -> None:
        super().open(loop, receiver)
        if StdioConsole.owner_of_stdio is not None:
            raise ConfigError(
                f"{self.owner}: stdio is already the console of {StdioConsole.owner_of_stdio}"
            )
        StdioConsole.owner_of_stdio = self.owner
        self._in, self._out_fd = os.dup(0), os.dup(1)
        for fd in (0, 1):  # O_NONBLOCK is shared with whoever else uses this terminal
            _saved_blocking.setdefault(fd, os.get_blocking(fd))
        self._escaped = False
        if os.isatty(0):
            sys.stderr.write(f"hvf: {self.owner} is on this terminal; Ctrl-A x quits\n")
            make_raw(0)
            # Diagnostics on a raw terminal need an explicit carriage return.
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                    handler.terminator = "\r\n"
        self.connect(self._in, self._out_fd)

    def filter_input(self, data: bytes) -> bytes:
        if ESCAPE not in data and not self._escaped:
            return data
        out = bytearray()
        for byte in data:
            if self._escaped:
                self._escaped = False
                if byte in (ord("x"), ord("X")) and self.on_quit is not None:
                    self.on_quit()
                    continue
                if byte != ESCAPE:
                    out.append(ESCAPE)
                out.append(byte)
            elif byte == ESCAPE:
                self._escaped = True
            else:
                out.append(byte)
        return bytes(out)

    def close(self) -> None:
        super().close()
        restore_terminals()
        StdioConsole.owner_of_stdio = None
        os.close(self._in)
        os.close(self._out_fd)


class TtyConsole(ConsoleBackend):
    def open(self, loop: EventLoop, receiver: Receiver) -> None:
        super().open(loop, receiver)
        try:
            fd = os.open(self.spec, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"{self.owner}: cannot open '{self.spec}': {e.strerror}") from None
        if not os.isatty(fd):
            os.close(fd)
            raise ConfigError(f"{self.owner}: '{self.spec}' is not a terminal device")
        make_raw(fd)
        self.fd = fd
        self.connect(fd, fd)

    def close(self) -> None:
        super().close()
        termios_attrs = _saved_terminals.pop(self.fd, None)
        if termios_attrs is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, termios_attrs)
            except termios.error:
                pass
        os.close(self.fd)


class PtyConsole(ConsoleBackend):
    def open(self, loop: EventLoop, receiver: Receiver) -> None:
        super().open(loop, receiver)
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.master, False)
        os.set_inheritable(self.slave, False)
        tty.setraw(self.slave, termios.TCSANOW)  # no echo or line editing on the guest side
        # Holding the slave open keeps the master readable only for real input (no EIO
        # while nobody has the terminal open); unread output then fills the pty buffer
        # and, beyond it, our bounded one.
        self.path = os.ttyname(self.slave)
        try:
            self.publish()
        except BaseException:
            os.close(self.master)
            os.close(self.slave)
            raise
        self.connect(self.master, self.master)

    def publish(self) -> None:
        """Tell the user where the console is (:attr:`path`, the pty's other side)."""
        log.warning("%s: console on %s", self.owner, self.path)

    def drain_peer(self, deadline: float) -> None:
        # Bytes still queued for the terminal's reader are lost when the master closes.
        while time.monotonic() < deadline:
            queued = struct.unpack("i", fcntl.ioctl(self.slave, termios.FIONREAD, b"\0" * 4))[0]
            if not queued:
                return
            time.sleep(0.01)

    def close(self) -> None:
        super().close()
        os.close(self.master)
        os.close(self.slave)


class SocketConsole(ConsoleBackend):
    """A listening socket; one client at a time, later ones are told so and closed."""

    eof_disconnects = True
    family = socket.AF_INET
    busy_message = b"hvf: this console already has a client\r\n"

    def address(self) -> object:
        raise NotImplementedError

    def open(self, loop: EventLoop, receiver: Receiver) -> None:
        super().open(loop, receiver)
        address = self.address()
        self.listener = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if self.family == socket.AF_INET:
                self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(address)  # type: ignore[arg-type]
            self.listener.listen(1)
        except OSError as e:
            self.listener.close()
            raise ConfigError(f"{self.owner}: cannot listen on {self.spec}: {e.strerror}") from None
        self.listener.setblocking(False)
        self.client: socket.socket | None = None
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.client is not None:
            try:
                sock.setblocking(False)
                sock.send(self.busy_message)
            except OSError:
                pass
            sock.close()
            return
        self.client = sock
        self.connect(sock.fileno(), sock.fileno())

    def disconnect(self) -> None:
        super().disconnect()
        if self.client is not None:
            self.client.close()
            self.client = None

    def close(self) -> None:
        super().close()
        if self.client is not None:
            self.client.close()
        self.listener.close()


class TcpConsole(SocketConsole):
    def address(self) -> object:
        hostport = self.spec.partition("=")[2]
        host, sep, port = hostport.rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"{self.owner}: invalid tcp console '{self.spec}' "
                              "(expected tcp=ADDRESS:PORT)")
        if int(port) > 65535:
            raise ConfigError(f"{self.owner}: tcp console '{self.spec}': port {port} is out of "
                              "range (0 to 65535)")
        if ":" in host:
            self.family = socket.AF_INET6
        return (host, int(port))


class UnixConsole(SocketConsole):
    family = socket.AF_UNIX

    def address(self) -> object:
        path = self.spec.partition("=")[2]
        if not path:
            raise ConfigError(f"{self.owner}: invalid unix console '{self.spec}' "
                              "(expected unix=PATH)")
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        self.path = path
        return path

    def close(self) -> None:
        super().close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class FileConsole(ConsoleBackend):
    """A write-only log of guest output; the guest receives nothing."""

    def open(self, loop: EventLoop, receiver: Receiver) -> None:
        super().open(loop, receiver)
        path = self.spec.partition("=")[2]
        if not path:
            raise ConfigError(f"{self.owner}: invalid file console '{self.spec}' "
                              "(expected file=PATH)")
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"{self.owner}: cannot open '{path}': {e.strerror}") from None
        self.connect(None, self.fd)

    def close(self) -> None:
        super().close()
        os.close(self.fd)


def tty_backend(spec: str, owner: str) -> ConsoleBackend:
    """The backend for a ``/dev/...`` path: a null-modem side, or the tty itself."""
    from hvf.plugins.uart import nmdm  # it builds on PtyConsole

    return nmdm.NmdmConsole(spec, owner) if nmdm.is_nmdm(spec) else TtyConsole(spec, owner)


BACKENDS = {
    "stdio": (StdioConsole, "this terminal (raw mode; one port only)"),
    "tty": (tty_backend, "/dev/PATH: an existing terminal device, e.g. a pty's other side; "
            "/dev/nmdmNA: a pty linked as /dev/nmdmNB"),
    "pty": (PtyConsole, "a new pseudo-terminal, whose path is printed"),
    "tcp": (TcpConsole, "tcp=ADDRESS:PORT: listen for one client at a time"),
    "unix": (UnixConsole, "unix=PATH: listen on a UNIX socket, one client at a time"),
    "file": (FileConsole, "file=PATH: append guest output to a file (no input)"),
}
