# SPDX-License-Identifier: BSD-2-Clause
"""Serial ports on real KVM: the 16550 test kernels against real ptys, sockets and files.

The ``serial_*`` guests (tests/guests/README.md) drive COM1-COM4 or the PCI UART and
print their results on the debug console, which is hvf's stdout here. ``serial_echo``
and ``serial_rx`` wait for input forever, so every test here enforces its own deadline
and kills hvf on any failure (:class:`Hvf`, or try/finally for the stdio tests, where
hvf's standard streams are a pty).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import signal
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BASE_ARGS, PVM, popen_hvf, raw_pty, stop, wait_for_text

pytestmark = pytest.mark.kvm

#: Guest → host bulk size: 256 KiB, four times a pty's or a pipe's buffer, so the reader
#: falls behind and hvf's buffering is exercised. ``mode=rep`` output costs ~30 µs a byte
#: on kvm_pvm (the guest's emulated fill loop and an exit a byte), ~8 s a transfer there.
TX_BYTES = 256 << 10
#: Host → guest bulk size.
RX_BYTES = 64 << 10
#: Output for the stalled-reader tests: more than hvf's 256 KiB buffer plus what the
#: kernel holds for an unread pty (at most ~68 KiB) or UNIX socket (at most ~210 KiB; far
#: less in practice, as each small write costs a whole skb), so bytes must be dropped.
STALL_BYTES = 512 << 10
#: Deadline for one bulk run (~30 s on an idle kvm_pvm host; shared hosts are slower).
BULK_TIMEOUT = 300
FNV_BASIS, FNV_PRIME = 0x811C9DC5, 0x01000193


def tx_pattern(n: int) -> bytes:
    """What ``serial_tx n=N`` sends: byte i = (i·7 + (i >> 8)) & 0xff."""
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(n))


def fnv1a(data: bytes) -> int:
    h = FNV_BASIS
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFF
    return h


def test_pattern_matches_the_guest_readme() -> None:
    assert tx_pattern(260)[:4] == bytes([0, 7, 14, 21])
    assert tx_pattern(260)[256:258] == bytes([(256 * 7 + 1) & 0xFF, (257 * 7 + 1) & 0xFF])
    assert fnv1a(b"a") == 0xE40C292C  # the published FNV-1a 32 test vector


# ---- running hvf ----


class Hvf:
    """``python -m hvf ARGS`` as a child with stdout (the debug console) and stderr read
    by threads; :meth:`kill` (also on leaving the ``with``) ends it for sure."""

    def __init__(self, args: Sequence[str], **popen: object) -> None:
        self.lines: list[tuple[float, str]] = []  # (monotonic time seen, line)
        self.stderr = ""
        self._cond = threading.Condition()
        self.started = time.monotonic()
        self.proc = popen_hvf(args, **popen)
        self._threads = []
        if self.proc.stdout is not None:
            self._threads.append(threading.Thread(target=self._read_stdout, daemon=True))
        if self.proc.stderr is not None:
            self._threads.append(threading.Thread(target=self._read_stderr, daemon=True))
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.stderr += raw.decode(errors="replace")
                self._cond.notify_all()

    @property
    def stdout(self) -> list[str]:
        with self._cond:
            return [line for _, line in self.lines]

    def wait_line(self, match: Callable[[str], bool] | str, timeout: float) -> tuple[float, str]:
        """The first stdout line that ``match``es (or equals it), with when it was seen."""
        pred = match if callable(match) else (lambda line: line == match)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for seen in self.lines:
                    if pred(seen[1]):
                        return seen
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive()):
                    raise AssertionError(f"no line {match!r} within {timeout} s: "
                                         f"stdout {self.stdout!r}, stderr {self.stderr!r}")
                self._cond.wait(min(left, 0.1))

    def _alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def wait_stderr(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = re.search(pattern, self.stderr)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive()):
                    raise AssertionError(f"no {pattern!r} on stderr within {timeout} s: "
                                         f"{self.stderr!r}")
                self._cond.wait(min(left, 0.1))

    def wait(self, timeout: float) -> int:
        """hvf's exit status (kills it and fails if it runs past ``timeout``)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"hvf still running after {timeout} s: stdout "
                                 f"{self.stdout!r}, stderr {self.stderr!r}") from None
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._threads:
            t.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def __enter__(self) -> Hvf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def guest_args(guest: Path, append: str, *extra: str, base: Sequence[str] = BASE_ARGS) -> list[str]:
    return [*base, *extra, "--kernel", str(guest), "--append", append, "serialvm"]


def read_some(fd: int, n: int) -> bytes:
    """``os.read``, with EIO (a pty whose other side has closed) read as end of file."""
    try:
        return os.read(fd, n)
    except OSError as e:
        if e.errno == errno.EIO:
            return b""
        raise


def read_exactly(fd: int, n: int, timeout: float) -> bytes:
    """Read from ``fd`` until ``n`` bytes, EOF/EIO or ``timeout``; whatever came."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = read_some(fd, max(65536, n - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_pending(fd: int) -> bytes:
    """Everything that can be read from ``fd`` right now, without waiting."""
    data = bytearray()
    while select.select([fd], [], [], 0)[0]:
        chunk = read_some(fd, 1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data)


class Collector(threading.Thread):
    """Reads ``fd`` continuously until ``n`` bytes or EOF (or ``stop()``)."""

    def __init__(self, fd: int, n: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.fd, self.n, self.timeout = fd, n, timeout
        self.data = b""
        self.done_at = 0.0
        self.start()

    def run(self) -> None:
        self.data = read_exactly(self.fd, self.n, self.timeout)
        self.done_at = time.monotonic()


def connect_unix(path: Path, proc: Hvf, timeout: float = 20) -> socket.socket:
    """Connect as soon as hvf listens. Guest output before hvf accepts a client is
    discarded (as in bhyve) and the serial guests cannot wait, so poll tightly: hvf
    listens while it builds the machine, well before the vCPU runs."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline or proc.proc.poll() is not None:
                raise AssertionError(f"no listener on {path}: {proc.stderr!r}") from None
            time.sleep(0.002)


# ---- 1. echo with interrupts, loopback, the PCI UART, COM2-COM4 ----

#: The UARTs the echo test drives: name → (other options, the option that gets the pty's
#: path appended, cmdline, expected port and IRQ). COM1-COM4 always exist, so COM3 shares IRQ 4 with
#: COM1 and COM4 IRQ 3 with COM2 (wired-OR); PCI slots 2 and 10 share a PIRQ
#: (bhyve's (4 + slot + pin) % 8), and the second case drives the UART in slot 10.
ECHO_SETUPS = {
    "com1": ((), ("-l", "com1,"), "", "03f8", 4),
    "com2": ((), ("-l", "com2,"), "port=0x2f8", "02f8", 3),
    "com3": ((), ("-l", "com3,"), "port=0x3e8", "03e8", 4),
    "com4": ((), ("-l", "com4,"), "port=0x2e8", "02e8", 3),
    "pci": ((), ("-s", "2,uart,"), "pci=1", None, None),
    "pci-shared-pirq": (("-s", "2,uart"), ("-s", "10,uart,"), "pci=2", None, None),
}


@pytest.mark.parametrize("setup", list(ECHO_SETUPS))
def test_echo_with_interrupts_through_a_pty(guests: dict[str, Path], setup: str) -> None:
    extra, (flag, value), append, port, irq = ECHO_SETUPS[setup]
    payload = bytes(range(0x30, 0x30 + 40))  # 40 bytes: two FIFO trigger levels and more
    with raw_pty() as (master, _slave, path):
        args = guest_args(guests["serial_echo"], f"{append} n={len(payload)}".strip(),
                          *extra, flag, value + path)
        with Hvf(args) as vm:
            first = vm.wait_line(lambda l: l.startswith("uart"), 30)[1]
            vm.wait_line("ready", 30)
            os.write(master, payload)
            echoed = read_exactly(master, len(payload), 20)
            rc = vm.wait(20)
    assert echoed == payload
    m = re.fullmatch(r"uart ([0-9a-f]{4}) irq (\d+)", first)
    assert m, first
    if port is not None:
        assert (m[1], int(m[2])) == (port, irq)
    else:  # the PCI UART: an I/O BAR and a routed ISA IRQ
        assert int(m[1], 16) >= 0x1000 and int(m[1], 16) % 8 == 0
        assert int(m[2]) in {3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15}
    lines = vm.stdout
    assert lines[-2].startswith("iir ") and lines[-2] in {"iir c4", "iir cc"}, lines
    m2 = re.fullmatch(r"echoed (\d+) bytes in (\d+) interrupts", lines[-1])
    assert m2 and int(m2[1]) == len(payload) and int(m2[2]) >= 1, lines
    assert not any(l.startswith(("stray", "exception")) for l in lines)
    assert rc == 1, vm.stderr


def test_pci_uarts_sharing_a_pirq_get_the_same_irq(guests: dict[str, Path]) -> None:
    """Slots 2 and 10 use the same PIRQ (bhyve's (4 + slot + pin) % 8), so one IRQ."""
    irqs = []
    for n in (1, 2):
        args = guest_args(guests["serial_loopback"], f"pci={n}", "-s", "2,uart", "-s", "10,uart")
        with Hvf(args) as vm:
            rc = vm.wait(30)
        assert vm.stdout[-1] == "loopback ok" and rc == 1, (vm.stdout, vm.stderr)
        irqs.append(vm.stdout[0].split()[-1])
    assert irqs[0] == irqs[1]


@pytest.mark.parametrize("append", ["", "fifo=0", "pci=1"])
def test_loopback(guests: dict[str, Path], append: str) -> None:
    extra = ("-s", "2,uart") if append.startswith("pci") else ("-l", "com1,pty")
    with Hvf(guest_args(guests["serial_loopback"], append, *extra)) as vm:
        rc = vm.wait(30)
    assert vm.stdout[-1] == "loopback ok", (vm.stdout, vm.stderr)
    assert rc == 1


# ---- 2. bulk transfers, both directions ----


def test_guest_output_to_a_file_is_byte_exact(guests: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "com1.out"
    args = guest_args(guests["serial_tx"], f"n={TX_BYTES}", "-l", f"com1,file={out}")
    with Hvf(args) as vm:
        rc = vm.wait(BULK_TIMEOUT)
    assert vm.stdout == ["uart 03f8 irq 4", f"tx done {TX_BYTES}"], vm.stderr
    assert rc == 1
    assert "dropped" not in vm.stderr
    data = out.read_bytes()
    assert len(data) == TX_BYTES
    assert data == tx_pattern(TX_BYTES)


def test_guest_output_to_a_pty_reader_is_byte_exact(guests: dict[str, Path]) -> None:
    """A reader on a real pty that reads all along (the pty, unlike a listening socket,
    holds output written before the reader starts, so nothing races)."""
    with raw_pty() as (master, _slave, path):
        args = guest_args(guests["serial_tx"], f"n={TX_BYTES}", "-l", f"com1,{path}")
        with Hvf(args) as vm:
            reader = Collector(master, TX_BYTES, BULK_TIMEOUT)
            rc = vm.wait(BULK_TIMEOUT)
            reader.join(10)
            got = reader.data + read_pending(master)
    assert vm.stdout == ["uart 03f8 irq 4", f"tx done {TX_BYTES}"], vm.stderr
    assert rc == 1
    assert "dropped" not in vm.stderr
    assert len(got) == TX_BYTES
    assert got == tx_pattern(TX_BYTES)


def test_host_input_through_a_pty_reaches_the_guest_byte_exact(guests: dict[str, Path]) -> None:
    data = os.urandom(RX_BYTES)
    with raw_pty() as (master, _slave, path):
        with Hvf(guest_args(guests["serial_rx"], f"n={RX_BYTES}", "-l", f"com1,{path}")) as vm:
            vm.wait_line("ready", 30)
            writer = threading.Thread(target=os.write, args=(master, data), daemon=True)
            # os.write on a blocking pty master returns when all is written or it fails.
            writer.start()
            rc = vm.wait(BULK_TIMEOUT)
            writer.join(5)
    m = re.fullmatch(r"rx (\d+) fnv ([0-9a-f]{8}) irqs (\d+)", vm.stdout[-1])
    assert m, (vm.stdout, vm.stderr)
    assert int(m[1]) == RX_BYTES
    assert int(m[2], 16) == fnv1a(data)
    assert int(m[3]) >= 1
    assert rc == 1


# ---- 3. a stalled host reader never stops the vCPU ----


@dataclass
class TxRun:
    seconds: float  # from starting hvf to the guest's "tx done" line
    got: bytes  # what the host side received
    dropped: int  # what hvf reported dropping
    rc: int
    stdout: list[str]
    stderr: str


def _tx_run(guest: Path, backend: str, n: int, read: bool, tmp_path: Path) -> TxRun:
    """One ``serial_tx n=N`` run on COM1 with a pty or a UNIX socket client that reads
    all along (``read``) or never, in which case the test reads what was delivered
    only after hvf has exited."""
    def args(spec: str) -> list[str]:
        return guest_args(guest, f"n={n}", "-l", f"com1,{spec}")

    if backend == "pty":
        with raw_pty() as (master, _slave, path):
            with Hvf(args(path)) as vm:
                reader = Collector(master, n, BULK_TIMEOUT) if read else None
                seen, _ = vm.wait_line(f"tx done {n}", BULK_TIMEOUT)
                rc = vm.wait(30)
                if reader is not None:
                    reader.join(10)
                    got = reader.data + read_pending(master)
                else:  # what hvf delivered waits in the pty, which the test holds open
                    got = read_pending(master)
    else:
        sock_path = tmp_path / "com1.sock"
        with Hvf(args(f"unix={sock_path}")) as vm:
            with connect_unix(sock_path, vm) as s:
                reader = Collector(s.fileno(), n, BULK_TIMEOUT) if read else None
                seen, _ = vm.wait_line(f"tx done {n}", BULK_TIMEOUT)
                rc = vm.wait(30)
                if reader is not None:
                    reader.join(10)
                    got = reader.data
                else:  # queued in the socket; EOF once hvf has closed its end
                    got = read_exactly(s.fileno(), n, 5)
    m = re.search(r"(\d+) bytes of guest output were dropped", vm.stderr)
    return TxRun(seen - vm.started, got, int(m[1]) if m else 0, rc, vm.stdout, vm.stderr)


def _unsent_prefix(got: bytes, want: bytes) -> int:
    """Where ``got`` starts in ``want``: 0, or for a socket the few bytes the guest sent
    before hvf accepted the test's connection, which hvf discards (as bhyve does) and
    does not count. The pattern repeats every 64 KiB; far less is ever missed."""
    if not got:
        return 0
    start = want.find(got[:4096])
    assert 0 <= start < 65536, "the bytes received are not a run of the pattern"
    return start


@pytest.mark.parametrize("backend", ["pty", "unix"])
def test_a_stalled_reader_never_stops_the_vcpu(
    guests: dict[str, Path], tmp_path: Path, backend: str,
) -> None:
    n = STALL_BYTES
    want = tx_pattern(n)
    reading = _tx_run(guests["serial_tx"], backend, n, True, tmp_path)
    stalled = _tx_run(guests["serial_tx"], backend, n, False, tmp_path)
    for run in (reading, stalled):
        assert run.rc == 1, run.stderr
        assert run.stdout == ["uart 03f8 irq 4", f"tx done {n}"], run.stderr
    skip = _unsent_prefix(reading.got, want) if backend == "unix" else 0
    assert reading.got == want[skip:] and reading.dropped == 0, reading.stderr
    # The stalled reader: hvf buffered what it could, counted the rest, and every byte
    # is accounted for; since the reader never resumed, the dropped bytes are the tail.
    got = stalled.got
    skip = _unsent_prefix(got, want) if backend == "unix" else 0
    assert stalled.dropped > 0, stalled.stderr
    assert skip + len(got) + stalled.dropped == n, (skip, len(got), stalled.dropped)
    assert got == want[skip:skip + len(got)]
    # ... and the guest did not wait for the reader.
    assert stalled.seconds < 2 * reading.seconds + 2, (
        f"stalled {stalled.seconds:.2f} s, reading {reading.seconds:.2f} s")


# ---- 4. stdio restores the (controlling) terminal ----


def _blocking_flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def _make_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


STDIO_CASES = {
    # case: (guest, extra options)
    "exit": ("hello", ()),
    "sigterm": ("serial_echo", ()),
    "triple-fault": ("triplefault", ()),  # the guest crashes: exit 3
    # hvf stops on an error (status 4): kvm_pvm cannot emulate the guest's int3 itself,
    # and with user-space emulation off hvf reports KVM's emulation failure.
    "emulation-failure": ("triplefault", ("-o", "x86.emulate=false")),
}


@pytest.mark.parametrize("case", list(STDIO_CASES))
def test_stdio_restores_the_controlling_terminal(
    guests: dict[str, Path], tmp_path: Path, case: str,
) -> None:
    if case == "emulation-failure" and not PVM:
        pytest.skip("only kvm_pvm fails to emulate int3; hardware runs it")
    guest, extra = STDIO_CASES[case]
    debug = tmp_path / "debugcon.out"
    base = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev", "-l", f"debugcon,{debug}")
    args = guest_args(guests[guest], "n=1000 exit=0", *extra, "-l", "com1,stdio", base=base)
    master, slave = os.openpty()
    # A cooked terminal as a shell leaves it (the pty default is already cooked).
    before = termios.tcgetattr(slave)
    nonblock_before = _blocking_flags(slave)
    assert before[3] & termios.ECHO and before[3] & termios.ICANON
    terminal = bytearray()
    drained = threading.Event()

    def drain() -> None:  # hvf's stderr goes to the terminal: keep reading it
        while not drained.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    terminal.extend(os.read(master, 65536))
                except OSError:
                    return

    proc = popen_hvf(args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                     preexec_fn=_make_controlling_tty)
    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        if case == "sigterm":
            wait_for_text(debug, "ready\n", proc, 30)
            during = termios.tcgetattr(slave)
            assert not during[3] & (termios.ECHO | termios.ICANON | termios.ISIG), during
            assert not during[1] & termios.OPOST
            # COM1 really is this terminal: the guest echoes what is typed.
            with_echo = len(terminal)
            os.write(master, b"typed\x03")  # ^C is data in raw mode, not SIGINT
            deadline = time.monotonic() + 10
            while b"typed\x03" not in terminal[with_echo:] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert b"typed\x03" in terminal[with_echo:], bytes(terminal)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    finally:
        stop(proc)
        drained.set()
        drainer.join(5)
        after = termios.tcgetattr(slave)
        nonblock_after = _blocking_flags(slave)
        os.close(master)
        os.close(slave)
    output = bytes(terminal).decode(errors="replace")
    assert after == before, output
    assert nonblock_after == nonblock_before, output
    text = debug.read_text() if debug.exists() else output
    if case == "exit":
        assert text.startswith("hello\n") and rc == 1, (text, output)
    elif case == "sigterm":
        assert rc == 128 + signal.SIGTERM, (rc, output)
    elif case == "triple-fault":
        assert text == "about to fault\n"
        assert rc == 3, (rc, output)
    else:
        assert text == "about to fault\n"
        assert rc == 4, (rc, output)
        assert "instruction emulation failed" in output


# ---- 5. configuration errors ----


def test_only_one_uart_may_own_stdio(guests: dict[str, Path]) -> None:
    with Hvf(guest_args(guests["hello"], "", "-l", "com1,stdio", "-l", "com2,stdio")) as vm:
        rc = vm.wait(30)
    assert rc == 4
    assert "stdio is already the console of" in vm.stderr
    assert "com1" in vm.stderr and "com2" in vm.stderr
    assert vm.stdout == []


def test_a_non_terminal_path_is_refused(guests: dict[str, Path]) -> None:
    with Hvf(guest_args(guests["hello"], "", "-l", "com1,/etc/passwd")) as vm:
        rc = vm.wait(30)
    assert rc == 4
    assert "'/etc/passwd' is not a terminal" in vm.stderr
    assert vm.stdout == []
