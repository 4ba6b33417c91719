# SPDX-License-Identifier: BSD-2-Clause
"""The GDB remote serial protocol: framing, and parsing gdb's packets into commands.

Everything here is pure and bounded: the peer is untrusted, so malformed input becomes
a :class:`PacketError` (answered with an ``Exx`` reply) and never any other exception.
Packets are ``$payload#cs`` with a two-digit hex checksum; ``}`` escapes ``#$}*`` in
binary data (the byte that follows is XORed with 0x20); a lone 0x03 byte is an
interrupt request. Thread ids are vCPU index + 1 (0: any thread, -1: all threads).
"""

from __future__ import annotations

import errno
import re
import signal

import attrs

#: Longest packet accepted and advertised (PacketSize), payload bytes.
PACKET_SIZE = 0x4000
#: Most bytes one ``m`` reply carries (two hex digits each).
MAX_READ = PACKET_SIZE // 2 - 16
INTERRUPT = 0x03
ESCAPE = 0x7D
_NEEDS_ESCAPE = frozenset(b"#$}*")
ANY_THREAD = 0
ALL_THREADS = -1
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_XFER = re.compile(rb"qXfer:features:read:([^:]*):([0-9a-fA-F]{1,8}),([0-9a-fA-F]{1,8})\Z")


class PacketError(Exception):
    """A packet gdb sent cannot be used; ``code`` is the errno of the ``Exx`` reply."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.code = code

    @property
    def reply(self) -> bytes:
        return b"E%02x" % (self.code & 0xFF)


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in _NEEDS_ESCAPE:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append(next(it, 0x20) ^ 0x20 if b == ESCAPE else b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """The packet ``payload`` as sent on the wire (escaped, with its checksum)."""
    body = escape(payload)
    return b"$%s#%02x" % (body, checksum(body))


@attrs.frozen
class Packet:
    """A packet that arrived intact; ``payload`` is unescaped."""

    payload: bytes


@attrs.frozen
class BadPacket:
    """A packet that arrived damaged (``retry``: gdb is asked to send it again) or too
    long to use (answered with an error)."""

    reason: str
    retry: bool = False


@attrs.frozen
class Interrupt:
    """gdb asks the running guest to stop (Ctrl-C)."""


Event = Packet | BadPacket | Interrupt


class PacketReader:
    """Splits the byte stream from gdb into packets and interrupts.

    Acks (``+``, ``-``) and bytes outside packets are skipped. A ``$`` inside a packet
    starts it again. A packet over :data:`PACKET_SIZE` is read to its end and reported
    as a :class:`BadPacket`.
    """

    def __init__(self) -> None:
        self._body: bytearray | None = None  # inside a packet
        self._sum: bytearray | None = None  # reading the checksum digits
        self._overflow = False

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for b in data:
            if self._sum is not None:
                self._sum.append(b)
                if len(self._sum) == 2:
                    events.append(self._finish())
            elif self._body is None:
                if b == INTERRUPT:
                    events.append(Interrupt())
                elif b == ord("$"):
                    self._start()
            elif b == ord("$"):
                self._start()
            elif b == ord("#"):
                self._sum = bytearray()
            elif len(self._body) >= PACKET_SIZE:
                self._overflow = True
            else:
                self._body.append(b)
        return events

    def _start(self) -> None:
        self._body, self._sum, self._overflow = bytearray(), None, False

    def _finish(self) -> Event:
        assert self._body is not None and self._sum is not None
        body, digits, overflow = bytes(self._body), bytes(self._sum), self._overflow
        self._body = self._sum = None
        if overflow:
            return BadPacket(f"packet longer than {PACKET_SIZE} bytes")
        if not set(digits) <= _HEX_DIGITS or int(digits, 16) != checksum(body):
            return BadPacket("bad checksum", retry=True)
        return Packet(unescape(body))


@attrs.frozen
class Stop:
    """Why the guest stopped: the vCPU, the signal gdb is told, the stop reason
    (``swbreak:``, ``hwbreak:``, ``watch:ADDR``...)."""

    vcpu: int
    signal: int = signal.SIGTRAP
    reason: str = ""

    def reply(self) -> bytes:
        return b"T%02xthread:%x;%s" % (self.signal, self.vcpu + 1,
                                       (self.reason + ";").encode() if self.reason else b"")


# ---- commands ----

@attrs.frozen
class Query:
    """A packet answered from the stub's state: ``?``, ``g``, ``qC``, ``qfThreadInfo``,
    ``qSupported`` and the like (``name`` is the packet without arguments)."""

    name: str


@attrs.frozen
class WriteRegisters:
    data: bytes


@attrs.frozen
class ReadRegister:
    number: int


@attrs.frozen
class WriteRegister:
    number: int
    data: bytes


@attrs.frozen
class ReadMemory:
    address: int
    length: int


@attrs.frozen
class WriteMemory:
    address: int
    data: bytes


@attrs.frozen
class Breakpoint:
    """``Z``/``z``: ``kind`` 0 software, 1 hardware, 2 write, 3 read, 4 access watchpoint;
    ``length`` is gdb's kind (the watched length; ignored for breakpoints)."""

    insert: bool
    kind: int
    address: int
    length: int


@attrs.frozen
class Resume:
    """``c``, ``s``, ``C``, ``S`` and ``vCont``: ``actions`` pairs ``'c'`` or ``'s'``
    with a thread id (``ALL_THREADS`` for the default action); signals are ignored."""

    actions: tuple[tuple[str, int], ...]
    legacy: bool = False

    def plan(self, threads: int, step_thread: int) -> tuple[set[int], set[int]]:
        """(vCPUs to run, of which to single-step) among ``threads`` vCPUs; a legacy
        ``s`` steps ``step_thread`` alone, ``c`` runs them all. Raises PacketError for
        a thread that does not exist."""
        everyone = set(range(threads))
        if self.legacy:
            return ({step_thread}, {step_thread}) if self.actions[0][0] == "s" else (everyone,
                                                                                    set())
        run: set[int] = set()
        steps: set[int] = set()
        for action, thread in self.actions:  # the leftmost action for a thread wins
            if thread > threads:
                raise PacketError(f"no thread {thread:x}")
            chosen = (everyone if thread in (ANY_THREAD, ALL_THREADS) else {thread - 1}) - run
            run |= chosen
            if action == "s":
                steps |= chosen
        return run, steps


@attrs.frozen
class SetThread:
    """``Hg``/``Hc``: the thread later register accesses (``g``) or resumes use."""

    op: str
    thread: int


@attrs.frozen
class ThreadQuery:
    """``T`` (is the thread alive) and ``qThreadExtraInfo``."""

    name: str
    thread: int


@attrs.frozen
class ReadFeatures:
    annex: str
    offset: int
    length: int


@attrs.frozen
class Unsupported:
    """A packet the stub does not implement (answered with an empty reply)."""


Command = (Query | WriteRegisters | ReadRegister | WriteRegister | ReadMemory | WriteMemory
           | Breakpoint | Resume | SetThread | ThreadQuery | ReadFeatures | Unsupported)

_QUERIES = {
    b"?": "?", b"g": "g", b"D": "D", b"k": "k", b"qC": "qC", b"qAttached": "qAttached",
    b"qfThreadInfo": "qfThreadInfo", b"qsThreadInfo": "qsThreadInfo", b"vCont?": "vCont?",
    b"QStartNoAckMode": "QStartNoAckMode",
}


def parse(payload: bytes) -> Command:
    """The command in ``payload``; raises PacketError when it is malformed."""
    if payload in _QUERIES:
        return Query(_QUERIES[payload])
    if payload.startswith((b"D;", b"vKill;")):
        return Query("D" if payload[:1] == b"D" else "k")
    if payload.startswith(b"qSupported"):
        return Query("qSupported")
    head, rest = payload[:1], payload[1:]
    if head == b"G":
        return WriteRegisters(hex_bytes(rest))
    if head == b"p":
        return ReadRegister(hex_int(rest, 16))
    if head == b"P":
        number, _, value = _split(rest, b"=")
        return WriteRegister(hex_int(number, 16), hex_bytes(value))
    if head == b"m":
        address, _, length = _split(rest, b",")
        return ReadMemory(hex_int(address, 64), min(hex_int(length, 32), MAX_READ))
    if head in (b"M", b"X"):
        return _write_memory(head == b"X", rest)
    if head in (b"Z", b"z"):
        return _breakpoint(head == b"Z", rest)
    if head in (b"c", b"s", b"C", b"S"):
        # c[addr], s[addr], Csig[;addr], Ssig[;addr]: resuming at an address is refused.
        if rest and (head in (b"c", b"s") or b";" in rest):
            raise PacketError("resuming at another address is not supported")
        if head in (b"C", b"S"):
            hex_int(rest, 8)
        return Resume(((head.decode().lower(), ALL_THREADS),), legacy=True)
    if payload.startswith(b"vCont;"):
        return _vcont(payload[6:])
    if head == b"H" and rest[:1] in (b"g", b"c"):
        return SetThread(rest[:1].decode(), thread_id(rest[1:]))
    if head == b"T":
        return ThreadQuery("T", thread_id(rest))
    if payload.startswith(b"qThreadExtraInfo,"):
        return ThreadQuery("qThreadExtraInfo", thread_id(payload[17:]))
    if payload.startswith(b"qXfer:features:read:"):
        m = _XFER.match(payload)
        if m is None:
            raise PacketError("malformed qXfer request")
        return ReadFeatures(m[1].decode("ascii", "replace"), int(m[2], 16), int(m[3], 16))
    return Unsupported()


def hex_int(text: bytes, bits: int) -> int:
    """A hexadecimal number of at most ``bits`` bits."""
    if not text or not set(text) <= _HEX_DIGITS or len(text.lstrip(b"0")) > (bits + 3) // 4:
        raise PacketError(f"bad number {text[:20]!r}")
    value = int(text, 16)
    if value >> bits:
        raise PacketError(f"number {value:#x} is too large")
    return value


def hex_bytes(text: bytes) -> bytes:
    if len(text) % 2 or not set(text) <= _HEX_DIGITS:
        raise PacketError("bad hex data")
    return bytes.fromhex(text.decode())


def thread_id(text: bytes) -> int:
    """A thread id: hex, ``0`` (any) or ``-1`` (all); ``pPID.TID`` gives TID."""
    if text.startswith(b"p"):
        text = text.partition(b".")[2] or b"-1"
    if text == b"-1":
        return ALL_THREADS
    return hex_int(text, 31)


def _split(text: bytes, sep: bytes) -> tuple[bytes, bytes, bytes]:
    before, found, after = text.partition(sep)
    if not found:
        raise PacketError(f"expected {sep.decode()!r}")
    return before, found, after


def _write_memory(binary: bool, rest: bytes) -> WriteMemory:
    header, _, data = _split(rest, b":")
    address, _, length_text = _split(header, b",")
    length = hex_int(length_text, 32)
    value = data if binary else hex_bytes(data)
    if len(value) != length:
        raise PacketError(f"length {length} does not match the {len(value)} bytes sent")
    return WriteMemory(hex_int(address, 64), value)


def _breakpoint(insert: bool, rest: bytes) -> Breakpoint:
    fields = rest.split(b";", 1)[0].split(b",")  # conditions after ';' are ignored
    if len(fields) != 3:
        raise PacketError("expected type,address,kind")
    kind = hex_int(fields[0], 8)
    if kind > 4:
        raise PacketError(f"unknown breakpoint type {kind}")
    return Breakpoint(insert, kind, hex_int(fields[1], 64), hex_int(fields[2], 32))


def _vcont(rest: bytes) -> Resume:
    actions: list[tuple[str, int]] = []
    for item in rest.split(b";"):
        action, colon, thread = item.partition(b":")
        if action[:1] in (b"C", b"S") and len(action) > 1:
            hex_int(action[1:], 8)
            action = action[:1].lower()
        if action not in (b"c", b"s"):
            raise PacketError(f"unsupported vCont action {action[:8]!r}")
        actions.append((action.decode(), thread_id(thread) if colon else ALL_THREADS))
    return Resume(tuple(actions))
