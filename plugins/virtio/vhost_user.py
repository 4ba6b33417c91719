# SPDX-License-Identifier: BSD-2-Clause
"""The front-end (VMM) side of the vhost-user protocol, over a UNIX stream socket.

A vhost-user back end (qemu-storage-daemon, SPDK, ...) runs a virtio device's queues in
its own process. The front end gives it guest RAM as file descriptors with their
addresses (``SET_MEM_TABLE``), the rings' addresses, and per queue two eventfds: the
*kick* (our ioeventfd doorbell, so the guest's notification goes from KVM straight to
the back end) and the *call* (an irqfd, so its interrupt goes straight into KVM).

Every message is a 12-byte header (request, flags, payload size) and a payload; file
descriptors ride along as ``SCM_RIGHTS``. The peer is untrusted: a reply with the wrong
request, a missing reply flag, a bad size or a failed acknowledgement raises
:class:`~hvf.errors.DeviceError` naming it; a dead peer raises ``OSError``.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from collections.abc import Sequence

import attrs

from hvf.errors import DeviceError

HEADER = struct.Struct("<III")
VERSION = 1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

#: The vhost-user feature bit that says the back end speaks protocol features.
F_PROTOCOL_FEATURES = 1 << 30
#: The back end logs the guest-RAM pages it writes (dirty logging, for migration).
F_LOG_ALL = 1 << 26
P_MQ = 1 << 0
P_LOG_SHMFD = 1 << 1
P_REPLY_ACK = 1 << 3
P_CONFIG = 1 << 9
#: Protocol features this front end uses.
PROTOCOL_FEATURES = P_MQ | P_LOG_SHMFD | P_REPLY_ACK | P_CONFIG
#: SET_VRING_ADDR flag: log the used ring's writes at its guest-physical address too.
VRING_F_LOG = 1 << 0

MAX_REGIONS = 8
MAX_CONFIG = 256
MAX_PAYLOAD = 4096
VRING_NOFD = 1 << 8

_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_CONFIG_HEADER = struct.Struct("<III")
_LOG = struct.Struct("<QQ")


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24


@attrs.frozen
class MemoryRegion:
    """A piece of guest RAM as the back end maps it: ``size`` bytes at ``guest_base``,
    at ``host_addr`` in our address space, at ``offset`` in the file ``fd``."""

    guest_base: int
    size: int
    host_addr: int
    offset: int
    fd: int


class VhostUserClient:
    """One connection to a back end at ``path``; every call blocks for at most
    ``timeout`` seconds."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.protocol_features = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        # The same connection without a timeout, to look at it from the I/O thread.
        self._probe = socket.socket(fileno=os.dup(self.sock.fileno()))
        self._probe.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def hung_up(self) -> bool | None:
        """Whether the peer hung up (True), sent bytes nobody has read (False), or
        neither (None). It never blocks and never consumes anything."""
        try:
            return not self._probe.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return True

    def close(self) -> None:
        self._probe.close()
        self.sock.close()

    # ---- messages ----

    def _send(self, request: Request, payload: bytes = b"", fds: Sequence[int] = (),
              *, need_reply: bool = False) -> None:
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = HEADER.pack(request, flags, len(payload)) + payload
        ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                     if fds else [])
        sent = self.sock.sendmsg([data], ancillary)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def _recv_exact(self, length: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < length:
            chunk = self.sock.recv(length - len(chunks))
            if not chunk:
                raise ConnectionResetError(f"vhost-user back end at {self.path} hung up")
            chunks += chunk
        return bytes(chunks)

    def _reply(self, request: Request) -> bytes:
        got, flags, size = HEADER.unpack(self._recv_exact(HEADER.size))
        if got != request or not flags & FLAG_REPLY or flags & 0x3 != VERSION:
            raise DeviceError(f"vhost-user back end at {self.path} answered {request.name} "
                              f"with request {got}, flags {flags:#x}")
        if size > MAX_PAYLOAD:
            raise DeviceError(f"vhost-user back end at {self.path} sent a {size}-byte reply "
                              f"to {request.name}")
        return self._recv_exact(size)

    def _call(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a message that has no reply; with REPLY_ACK, wait for its acknowledgement."""
        ack = bool(self.protocol_features & P_REPLY_ACK)
        self._send(request, payload, fds, need_reply=ack)
        if ack:
            status = self._u64(self._reply(request), request)
            if status:
                raise DeviceError(f"vhost-user back end at {self.path} refused {request.name} "
                                  f"(status {status})")

    def _u64(self, payload: bytes, request: Request) -> int:
        if len(payload) != _U64.size:
            raise DeviceError(f"vhost-user back end at {self.path} sent a {len(payload)}-byte "
                              f"reply to {request.name}, not 8")
        return int(_U64.unpack(payload)[0])

    def _get_u64(self, request: Request) -> int:
        self._send(request)
        return self._u64(self._reply(request), request)

    # ---- the requests ----

    def set_owner(self) -> None:
        self._send(Request.SET_OWNER)

    def get_features(self) -> int:
        return self._get_u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        # Acknowledged as any other message when REPLY_ACK is on (the spec allows it).
        self._call(Request.SET_FEATURES, _U64.pack(features))

    def get_protocol_features(self) -> int:
        return self._get_u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self._send(Request.SET_PROTOCOL_FEATURES, _U64.pack(features))
        self.protocol_features = features

    def get_queue_num(self) -> int:
        return self._get_u64(Request.GET_QUEUE_NUM)

    def get_config(self, size: int) -> bytes:
        """The first ``size`` bytes of the device's configuration space."""
        if not 0 < size <= MAX_CONFIG:
            raise ValueError(f"config size {size}")
        self._send(Request.GET_CONFIG, _CONFIG_HEADER.pack(0, size, 0) + bytes(size))
        reply = self._reply(Request.GET_CONFIG)
        if len(reply) != _CONFIG_HEADER.size + size:
            raise DeviceError(f"vhost-user back end at {self.path} sent {len(reply)} bytes "
                              f"of configuration, not {_CONFIG_HEADER.size + size}")
        return reply[_CONFIG_HEADER.size:]

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        if not 0 < len(regions) <= MAX_REGIONS:
            raise ValueError(f"{len(regions)} memory regions")
        payload = struct.pack("<II", len(regions), 0) + b"".join(
            _REGION.pack(r.guest_base, r.size, r.host_addr, r.offset) for r in regions)
        self._call(Request.SET_MEM_TABLE, payload, [r.fd for r in regions])

    def set_vring_num(self, index: int, size: int) -> None:
        self._call(Request.SET_VRING_NUM, _STATE.pack(index, size))

    def set_vring_base(self, index: int, base: int) -> None:
        self._call(Request.SET_VRING_BASE, _STATE.pack(index, base))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int,
                       log: int | None = None) -> None:
        """Ring addresses in the front end's address space (as the memory table maps);
        with ``log``, the used ring's guest-physical address, whose writes are logged."""
        self._call(Request.SET_VRING_ADDR, _ADDR.pack(
            index, 0 if log is None else VRING_F_LOG, desc, used, avail, log or 0))

    def set_log_base(self, size: int, fd: int) -> None:
        """Log dirty pages into the ``size``-byte bitmap in ``fd`` (LOG_SHMFD) from now
        on; when this returns the back end no longer writes the previous one."""
        self._send(Request.SET_LOG_BASE, _LOG.pack(size, 0), [fd])
        self._reply(Request.SET_LOG_BASE)  # its u64 says nothing more

    def get_vring_base(self, index: int) -> int:
        """Stop queue ``index``; its next available-ring position."""
        self._send(Request.GET_VRING_BASE, _STATE.pack(index, 0))
        reply = self._reply(Request.GET_VRING_BASE)
        if len(reply) != _STATE.size:
            raise DeviceError(f"vhost-user back end at {self.path} sent a {len(reply)}-byte "
                              "vring state")
        got, base = _STATE.unpack(reply)
        if got != index or base > 0xFFFF:
            raise DeviceError(f"vhost-user back end at {self.path} sent vring state "
                              f"({got}, {base}) for queue {index}")
        return int(base)

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._call(Request.SET_VRING_KICK, _U64.pack(index), [fd])

    def set_vring_call(self, index: int, fd: int) -> None:
        self._call(Request.SET_VRING_CALL, _U64.pack(index), [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._call(Request.SET_VRING_ENABLE, _STATE.pack(index, int(enable)))
