# SPDX-License-Identifier: BSD-2-Clause
"""Console backends against real ptys, sockets and files (no guest needed)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvf.console import OUTPUT_LIMIT, backend_name
from hvf.errors import ConfigError
from hvf.eventloop import EventLoop
from hvf.plugins.uart.backends import (
    FileConsole, PtyConsole, StdioConsole, TcpConsole, TtyConsole, UnixConsole,
)


class FifoReceiver:
    """A receiver with a bounded buffer, like a UART's receive FIFO."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.data = bytearray()
        self.lock = threading.Lock()
        self.idles = 0

    def room(self) -> int:
        with self.lock:
            return self.capacity - len(self.data)

    def push(self, data: bytes) -> int:
        with self.lock:
            n = min(len(data), self.capacity - len(self.data))
            self.data += data[:n]
            return n

    def idle(self) -> None:
        self.idles += 1

    def take(self) -> bytes:
        with self.lock:
            out = bytes(self.data)
            self.data.clear()
            return out


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop()
    yield loop
    loop.close()


def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def read_exactly(fd: int, n: int, timeout: float = 5.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            out += os.read(fd, n - len(out))
        except BlockingIOError:
            time.sleep(0.005)
    return out


@pytest.mark.parametrize(("spec", "name"), [
    ("stdio", "stdio"), ("/dev/pts/3", "tty"), ("tcp=127.0.0.1:99", "tcp"),
    ("unix=/tmp/x", "unix"), ("file=/tmp/log", "file"), ("pty", "pty"),
])
def test_backend_names(spec: str, name: str) -> None:
    assert backend_name(spec) == name


def test_pty_both_directions_and_flow_control(loop: EventLoop) -> None:
    rx = FifoReceiver(capacity=16)
    console = PtyConsole("pty", "com1")
    console.open(loop, rx)
    loop.start()
    peer = os.open(console.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        console.write(b"hello guest")
        assert read_exactly(peer, 11) == b"hello guest"
        payload = bytes(range(256)) * 4  # more than the FIFO holds
        os.write(peer, payload)
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < len(payload) and time.monotonic() < deadline:
            wait_for(lambda: rx.room() == 0 or len(got) + (16 - rx.room()) >= len(payload))
            got += rx.take()  # the "guest" reads the FIFO...
            console.input_wanted()  # ...and the backend resumes reading
        assert got == payload  # nothing lost while the FIFO was full
    finally:
        os.close(peer)
        console.close()


def test_stalled_pty_reader_drops_and_counts(loop: EventLoop) -> None:
    console = PtyConsole("pty", "com1")
    console.open(loop, FifoReceiver())
    loop.start()
    total = OUTPUT_LIMIT * 2
    chunk = b"x" * 4096
    start = time.monotonic()
    for _ in range(total // len(chunk)):
        console.write(chunk)  # never blocks, although nobody reads the pty
    assert time.monotonic() - start < 2.0
    wait_for(lambda: console.dropped > 0)
    time.sleep(0.1)
    held = len(console._out)
    assert held <= OUTPUT_LIMIT
    assert console.dropped + console.written + held == total
    console.close()


def test_tcp_one_client_at_a_time(loop: EventLoop) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    rx = FifoReceiver()
    console = TcpConsole(f"tcp=127.0.0.1:{port}", "com1")
    console.open(loop, rx)
    loop.start()
    console.write(b"before anyone connects")  # discarded, as bhyve does
    first = socket.create_connection(("127.0.0.1", port))
    wait_for(lambda: console.client is not None)
    second = socket.create_connection(("127.0.0.1", port))
    second.settimeout(5)
    assert b"already has a client" in second.recv(100)
    assert second.recv(100) == b""  # and closed
    second.close()
    console.write(b"to the client")
    first.settimeout(5)
    assert first.recv(100) == b"to the client"
    first.sendall(b"typed")
    wait_for(lambda: bytes(rx.data) == b"typed")
    first.close()
    wait_for(lambda: console.client is None)
    third = socket.create_connection(("127.0.0.1", port))  # the slot is free again
    wait_for(lambda: console.client is not None)
    third.close()
    console.close()


def test_unix_socket_replaces_stale_socket(loop: EventLoop, tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    console = UnixConsole(f"unix={path}", "com2")
    console.open(loop, FifoReceiver())
    loop.start()
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    wait_for(lambda: console.client is not None)
    console.write(b"over unix")
    client.settimeout(5)
    assert client.recv(100) == b"over unix"
    client.close()
    console.close()
    assert not path.exists()


def test_file_log(loop: EventLoop, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    console = FileConsole(f"file={log}", "com1")
    console.open(loop, FifoReceiver())
    loop.start()
    console.write(b"line 1\n")
    console.write(b"line 2\n")
    wait_for(lambda: log.read_bytes() == b"line 1\nline 2\n")
    console.close()


def test_tty_path_must_be_a_terminal(loop: EventLoop, tmp_path: Path) -> None:
    plain = tmp_path / "not-a-tty"
    plain.write_text("")
    with pytest.raises(ConfigError, match="is not a terminal device"):
        TtyConsole(str(plain), "LPC device com1").open(loop, FifoReceiver())
    with pytest.raises(ConfigError, match="cannot open '/dev/nonexistent'"):
        TtyConsole("/dev/nonexistent", "LPC device com1").open(loop, FifoReceiver())


def test_tty_path_on_a_pty(loop: EventLoop) -> None:
    master, slave = os.openpty()
    try:
        rx = FifoReceiver()
        console = TtyConsole(os.ttyname(slave), "com2")
        console.open(loop, rx)
        loop.start()
        os.write(master, b"abc")
        wait_for(lambda: bytes(rx.data) == b"abc")
        console.write(b"xyz")
        assert read_exactly(master, 3) == b"xyz"
        console.close()
    finally:
        os.close(master)
        os.close(slave)


def test_only_one_port_may_own_stdio(loop: EventLoop) -> None:
    first = StdioConsole("stdio", "LPC device com1")
    first.open(loop, FifoReceiver())
    try:
        with pytest.raises(ConfigError, match="already the console of LPC device com1"):
            StdioConsole("stdio", "LPC device com2").open(loop, FifoReceiver())
    finally:
        first.close()


def test_bad_specs(loop: EventLoop) -> None:
    with pytest.raises(ConfigError, match="expected tcp=ADDRESS:PORT"):
        TcpConsole("tcp=nohost", "com1").open(loop, FifoReceiver())
    with pytest.raises(ConfigError, match="expected file=PATH"):
        FileConsole("file=", "com1").open(loop, FifoReceiver())


def test_ctrl_a_x_quits_and_ctrl_a_twice_sends_one(loop: EventLoop) -> None:
    console = StdioConsole("stdio", "com1")
    quits: list[bool] = []
    console.on_quit = lambda: quits.append(True)
    console._escaped = False
    assert console.filter_input(b"ab\x01\x01c") == b"ab\x01c"
    assert console.filter_input(b"\x01") == b"" and not quits
    assert console.filter_input(b"x rest") == b" rest" and quits == [True]
    assert console.filter_input(b"\x01z") == b"\x01z"  # other keys pass through
