# SPDX-License-Identifier: BSD-2-Clause
"""The migration stream's framing, its addresses (``tcp:HOST:PORT``, ``unix:PATH``) and
the sockets under it; :mod:`hvf.migration` has the protocol.

A frame is a 16-byte header and a payload::

    offset  size  field
    0       4     magic b"HVFM"
    4       2     u16 message type (:class:`Kind`)
    6       2     u16 flags, 0
    8       4     u32 payload length L
    12      4     u32 checksum of bytes 0..12 and of the payload
    16      L     payload

The checksum is CRC-32C (Castagnoli: :func:`crc32c`, the CPU's ``crc32`` instruction)
except in the messages two versions of hvf exchange to learn whether they can talk,
HELLO, READY and REFUSE, which keep zlib's CRC-32 (protocol 1's only checksum), so
that a peer of another protocol version is told so rather than of a corrupt message.
All integers are little-endian. A receiver refuses a frame whose magic, flags, type or
length is wrong before reading its payload (each kind has its own limit, none above
:data:`MAX_PAYLOAD`), reads the payload in pieces as it arrives (it never allocates
more than it has been sent), and refuses it when the CRC disagrees.
"""

from __future__ import annotations

import array
import enum
import os
import re
import socket
import struct
import zlib
from collections.abc import Callable, Sequence

import attrs

from hvf._pages import ffi as _ffi
from hvf._pages import lib as _lib
from hvf.errors import MigrationError, UsageError

MAGIC = b"HVFM"
HEADER = struct.Struct("<4sHHII")
#: No frame's payload is longer (a pages frame: its run table and 4 MiB of pages; the
#: device state: kilobytes, rarely megabytes).
MAX_PAYLOAD = 64 * 1024 * 1024
#: Descriptors one frame may carry (``--local``: guest RAM's).
MAX_FDS = 1
#: Bytes read at a time into a payload buffer.
_PIECE = 1 << 20

_TCP = re.compile(r"tcp:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})")


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """The CRC-32C of ``data`` continuing from ``value``, as :func:`zlib.crc32` continues."""
    view = memoryview(data)
    return int(_lib.hvf_crc32c(value, _ffi.from_buffer(view), view.nbytes))


Checksum = Callable[[bytes | bytearray | memoryview, int], int]


class ConnectionLost(MigrationError):
    """The connection failed, was closed, or stayed silent too long."""


class Kind(enum.IntEnum):
    """Message types (the module docstring of :mod:`hvf.migration` says what each holds)."""

    HELLO = 1
    READY = 2
    REFUSE = 3
    PAGES = 4
    STATE = 5
    LOADED = 6
    GO = 7
    RUNNING = 8


#: The messages that keep protocol 1's CRC-32 (see the module docstring).
_CRC32_KINDS = frozenset({Kind.HELLO, Kind.READY, Kind.REFUSE})


def checksum(kind: Kind) -> Checksum:
    """The checksum of ``kind``'s frames (a function folding bytes into a value)."""
    return zlib.crc32 if kind in _CRC32_KINDS else crc32c


@attrs.frozen
class Uri:
    """Where a migration goes: TCP ``host`` and ``port``, or a UNIX socket ``path``."""

    text: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        return self.text


def parse_uri(text: str) -> Uri:
    """``tcp:HOST:PORT`` (``tcp:[V6]:PORT``; an empty host listens on every address)
    or ``unix:PATH``; anything else is a :class:`UsageError`."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path or "\0" in path or len(os.fsencode(path)) > 107:
            raise UsageError(f"'{text}': a unix: address needs a socket path of 1 to 107 bytes")
        return Uri(text, path=path)
    m = _TCP.fullmatch(text)
    if m is None:
        raise UsageError(f"'{text}' is not a migration address (tcp:HOST:PORT or unix:PATH)")
    port = int(m["port"])
    if not 0 < port < 65536:
        raise UsageError(f"'{text}': port {port} is not between 1 and 65535")
    return Uri(text, host=m["v6"] or m["host"] or "", port=port)


def connect(uri: Uri, timeout: float) -> socket.socket:
    """A connection to the destination listening at ``uri``."""
    try:
        if uri.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(uri.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((uri.host or "localhost", uri.port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        raise MigrationError(f"cannot connect to {uri}: {e.strerror or e}") from None
    return sock


def listen(uri: Uri) -> socket.socket:
    """A socket listening at ``uri`` for one source (a unix: path must not exist)."""
    try:
        if uri.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                old = os.umask(0o177)
                try:
                    sock.bind(uri.path)
                finally:
                    os.umask(old)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_server((uri.host, uri.port), reuse_port=False,
                                        family=socket.AF_INET6 if ":" in uri.host
                                        else socket.AF_INET)
        sock.listen(1)
    except OSError as e:
        raise MigrationError(f"cannot listen on {uri}: {e.strerror or e}") from None
    return sock


@attrs.frozen
class Frame:
    """A received message: its kind, its payload and the descriptors it carried."""

    kind: Kind
    payload: bytes
    fds: tuple[int, ...] = ()


class Channel:
    """Frames over a connected stream socket; every wait is bounded by ``timeout``
    and every failure is a :class:`MigrationError` saying what the ``peer`` did."""

    def __init__(self, sock: socket.socket, *, timeout: float, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.sent = 0  # bytes
        sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    # ---- sending ----

    def send(self, kind: Kind, *parts: bytes | bytearray | memoryview,
             fds: Sequence[int] = ()) -> None:
        length = sum(len(p) for p in parts)
        if length > MAX_PAYLOAD:
            raise MigrationError(f"cannot send a {kind.name} message of {length} bytes "
                                 f"(at most {MAX_PAYLOAD})")
        head = HEADER.pack(MAGIC, kind, 0, length, 0)[:12]
        fold = checksum(kind)
        crc = fold(head, 0)
        for part in parts:
            crc = fold(part, crc)
        buffers = [head + struct.pack("<I", crc), *parts]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds \
            else []
        try:
            done = self.sock.sendmsg(buffers, ancillary)
            for buffer in buffers:  # what did not fit, without the descriptors again
                view = memoryview(buffer).cast("B")
                if done < len(view):
                    self.sock.sendall(view[done:])
                done = max(0, done - len(view))
        except TimeoutError:
            raise ConnectionLost(f"{self.peer} took no data for {self.sock.gettimeout():g} s") \
                from None
        except OSError as e:
            raise ConnectionLost(f"the connection to {self.peer} failed: "
                                 f"{e.strerror or e}") from None
        self.sent += 16 + length

    # ---- receiving ----

    def receive(self, limits: dict[Kind, int]) -> Frame:
        """The next frame, which must be of a kind in ``limits``, with a payload of at
        most that many bytes."""
        kind, length, crc, fds = self.receive_header(limits)
        try:
            payload = bytearray()
            while len(payload) < length:
                piece = self._recv(min(_PIECE, length - len(payload)))
                payload += piece
            self.check_crc(kind, length, payload, crc)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Frame(kind, bytes(payload), fds)

    def receive_header(self, limits: dict[Kind, int]) -> tuple[Kind, int, int, tuple[int, ...]]:
        """A frame's header, checked: (kind, length, crc, descriptors)."""
        head, fds = self._recv_head()
        try:
            magic, raw_kind, flags, length, crc = HEADER.unpack(head)
            if magic != MAGIC:
                raise MigrationError(f"{self.peer} sent something that is not an hvf "
                                     f"migration stream (magic {magic!r})")
            try:
                kind = Kind(raw_kind)
            except ValueError:
                raise MigrationError(f"{self.peer} sent a message of unknown type "
                                     f"{raw_kind}") from None
            if flags:
                raise MigrationError(f"{self.peer} sent a {kind.name} message with flags "
                                     f"{flags:#x} (none are defined)")
            if kind not in limits:
                expected = " or ".join(k.name for k in limits)
                raise MigrationError(f"{self.peer} sent {kind.name} where {expected} "
                                     f"was expected")
            if length > limits[kind]:
                raise MigrationError(f"{self.peer} sent a {kind.name} message of {length} "
                                     f"bytes (at most {limits[kind]})")
            if fds and kind is not Kind.HELLO:
                raise MigrationError(f"{self.peer} sent descriptors with {kind.name}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return kind, length, crc, fds

    def check_crc(self, kind: Kind, length: int, payload: bytes | bytearray | memoryview,
                  crc: int, running: int | None = None) -> None:
        """Refuse a payload whose checksum (``running``, when already folded over it)
        disagrees with the header's."""
        fold = checksum(kind)
        value = fold(payload, self.crc_start(kind, length)) if running is None else running
        if value != crc:
            name = "CRC-32" if fold is zlib.crc32 else "CRC-32C"
            raise MigrationError(f"{self.peer} sent a corrupt {kind.name} message "
                                 f"({name} {value:#010x}, the header says {crc:#010x})")

    def crc_start(self, kind: Kind, length: int) -> int:
        """The checksum of ``kind``'s header (a receiver folds the payload on)."""
        return checksum(kind)(HEADER.pack(MAGIC, kind, 0, length, 0)[:12], 0)

    def receive_into(self, view: memoryview, kind: Kind, crc: int) -> int:
        """Fill ``view`` from the stream; returns ``kind``'s checksum folded over it."""
        done = 0
        while done < len(view):
            n = self._recv_into(view[done:])
            done += n
        return checksum(kind)(view, crc)

    def _recv_head(self) -> tuple[bytes, tuple[int, ...]]:
        space = socket.CMSG_SPACE(MAX_FDS * 4)
        try:
            data, ancillary, msg_flags, _ = self.sock.recvmsg(HEADER.size, space)
        except TimeoutError:
            raise self._silent() from None
        except OSError as e:
            raise self._failed(e) from None
        fds: list[int] = []
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % 4
                fds.extend(array.array("i", cdata[:usable]))
        if msg_flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise MigrationError(f"{self.peer} sent more descriptors than a frame may carry")
        try:
            if not data:
                raise self._closed()
            head = data
            while len(head) < HEADER.size:
                head += self._recv(HEADER.size - len(head))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return head, tuple(fds)

    def _recv(self, n: int) -> bytes:
        try:
            data = self.sock.recv(n)
        except TimeoutError:
            raise self._silent() from None
        except OSError as e:
            raise self._failed(e) from None
        if not data:
            raise self._closed()
        return data

    def _recv_into(self, view: memoryview) -> int:
        try:
            n = self.sock.recv_into(view)
        except TimeoutError:
            raise self._silent() from None
        except OSError as e:
            raise self._failed(e) from None
        if not n:
            raise self._closed()
        return n

    def _silent(self) -> ConnectionLost:
        return ConnectionLost(f"{self.peer} sent nothing for {self.sock.gettimeout():g} s")

    def _failed(self, e: OSError) -> ConnectionLost:
        return ConnectionLost(f"the connection to {self.peer} failed: {e.strerror or e}")

    def _closed(self) -> ConnectionLost:
        return ConnectionLost(f"{self.peer} closed the connection before the migration "
                              f"completed")
