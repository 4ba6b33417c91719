# SPDX-License-Identifier: BSD-2-Clause
"""The control socket: how ``hvf ctl`` talks to a running VM.

Each VM listens on ``RUNTIME_DIR/NAME.sock`` (mode 0600). Only peers with the VM
owner's uid are served (``SO_PEERCRED``). The protocol is one JSON object per line:

- on connect the VM sends a greeting: ``{"hvf": {"version": V, "protocol": 1, "vm": NAME}}``
- a request: ``{"id": ANY, "command": NAME, "args": {...}}``
- a reply: ``{"id": ANY, "return": {...}}`` or ``{"id": ANY, "error": {"class": C, "desc": D}}``

A client may send several requests on one connection; they run one after another.
Requests larger than :data:`MAX_REQUEST` bytes or nested deeper than :data:`MAX_DEPTH`,
malformed JSON and unknown commands get error replies. Commands come from the
``hvf_register_ctl_commands`` hook.

One thread serves every client (:mod:`selectors`); each command runs on a thread of
its own, and a client has at most one command running, so at most
:data:`MAX_CLIENTS` threads run commands. At that many clients a new one closes the
client idle the longest; a client idle for :data:`IDLE_TIMEOUT` seconds is closed. A
command runs to its end whatever its client does; if the client has gone, the outcome
goes to the log. Running out of file descriptors closes an idle client too, or
refuses the newcomer with a reply, and accepting pauses briefly; no error on the
listening socket stops the server.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import hvf
from hvf.control_client import ControlClient, is_live
from hvf.control_requests import (
    MAX_DEPTH,
    MAX_REQUEST,
    Request,
    Requests,
    Send,
    encode,
    error,
    log_orphan,
)
from hvf.errors import ConfigError

if TYPE_CHECKING:
    from hvf.vm import Machine

__all__ = ["MAX_DEPTH", "MAX_REQUEST", "ControlClient", "ControlServer", "is_live",
           "runtime_dir", "socket_path"]

log = logging.getLogger("hvf.control")

PROTOCOL_VERSION = 1
MAX_CLIENTS = 64
IDLE_TIMEOUT = 60.0
#: Replies a client has not read yet; past this, its requests are not read either.
MAX_UNREAD = 64 * 1024
#: How long accepting pauses when the process has no file descriptor to spare.
ACCEPT_BACKOFF = 0.1
#: A shortage of file descriptors is logged at most this often (seconds).
WARN_INTERVAL = 60.0
#: How long closing waits for the reply of a command that ends the VM (poweroff).
LAST_REPLY_SECONDS = 1.0
_UCRED = struct.Struct("3i")
_FD_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def runtime_dir() -> Path:
    """``$HVF_RUNTIME_DIR``, else /run/hvf for root, else ``$XDG_RUNTIME_DIR/hvf``."""
    override = os.environ.get("HVF_RUNTIME_DIR")
    if override:
        return Path(override)
    if os.getuid() == 0:
        return Path("/run/hvf")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "hvf" if xdg else Path(f"/tmp/hvf-{os.getuid()}")


def socket_path(name: str) -> Path:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ConfigError(f"invalid VM name '{name}' (it names the control socket)")
    return runtime_dir() / f"{name}.sock"


def peer_uid(sock: socket.socket) -> int:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


@attrs.define(eq=False)
class _Client:
    """One connection, owned by the server thread."""

    sock: socket.socket
    active_at: float
    inbox: bytearray = attrs.Factory(bytearray)
    outbox: bytearray = attrs.Factory(bytearray)
    #: The command running for this client, if any.
    command: str | None = None
    #: The command whose reply is queued but not yet sent.
    undelivered: str | None = None
    #: The selector events it is registered for (0: none).
    events: int = 0
    eof: bool = False
    closed: bool = False


class ControlServer:
    """Listens for control clients and serves them all from one thread."""

    def __init__(self, vm: Machine, *, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.vm = vm
        self.requests = Requests(vm)
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.path = socket_path(vm.name)
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ConfigError(f"{self.path} exists and is not a socket")
            if is_live(self.path):
                raise ConfigError(
                    f"a VM named '{vm.name}' is already running (control socket {self.path})"
                )
            self.path.unlink()  # left behind by a VM that died
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self.listener.listen(socket.SOMAXCONN)
        self.listener.setblocking(False)
        self._clients: list[_Client] = []  # oldest first
        self._ready: list[_Client] = []  # clients with a request line waiting
        self._outbox: list[tuple[_Client, bytes, str | None]] = []  # from command threads
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._accept_again_at: float | None = None
        self._warned_at: float | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Serve on a thread of its own: it must answer while the VM (and its I/O
        thread) is paused."""
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="hvf ctl", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(5)
        self._last_replies()
        for client in list(self._clients):
            self._drop(client)
        self._selector.close()
        self.listener.close()
        os.close(self._wake)
        if self._reserve is not None:
            os.close(self._reserve)
        try:
            if self.path.exists():
                self.path.unlink()
        except OSError:
            pass

    def _last_replies(self, timeout: float = LAST_REPLY_SECONDS) -> None:
        """After the server thread: a command that ends the VM (``poweroff``, ``suspend
        --exit``) still gets its reply to its client, which is waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                waiting = any(c.command is not None and not c.closed for c in self._clients) \
                    and not self._outbox
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.005)  # the command's thread is about to post its reply
        self._deliver()
        for client in list(self._clients):
            if client.outbox and not client.closed:
                try:
                    client.sock.settimeout(max(0.0, deadline - time.monotonic()))
                    client.sock.sendall(client.outbox)
                    client.outbox.clear()
                    client.undelivered = None
                except OSError:
                    pass

    def handle(self, line: bytes, send: Send | None = None) -> dict[str, Any]:
        """Run one request line on this thread; always returns a reply object."""
        return self.requests.handle(line, send)

    # ---- command threads ----

    def _run_command(self, client: _Client, request: Request) -> None:
        def progress(line: bytes) -> None:
            self._post(client, line, None)

        self._post(client, self.requests.reply_line(request, progress), request.command)

    def _post(self, client: _Client, line: bytes, finished: str | None) -> None:
        """Hand a line to the server thread; ``finished`` names the command it ends."""
        with self._lock:
            if self._closed:
                if finished:
                    log_orphan(finished, line)
                return
            self._outbox.append((client, line, finished))
            os.eventfd_write(self._wake, 1)

    # ---- the server thread ----

    def _serve(self) -> None:
        while not self._closed:
            try:
                self._step()
            except Exception:  # a bug here must not end the control socket
                log.exception("control socket: unexpected error (serving on)")
                time.sleep(ACCEPT_BACKOFF)

    def _step(self) -> None:
        timeout = 0.0 if self._ready else self._next_timeout()
        for key, events in self._selector.select(timeout):
            if key.fileobj is self.listener:
                self._accept()
            elif key.fileobj == self._wake:
                self._deliver()
            elif not key.data.closed:  # (closed earlier in this batch)
                client = key.data
                if events & selectors.EVENT_WRITE:
                    self._flush(client)
                if events & selectors.EVENT_READ and not client.closed:
                    self._read(client)
        ready, self._ready = self._ready, []
        for client in ready:
            self._next_request(client)
        now = time.monotonic()
        for client in list(self._clients):
            if client.command is None and now - client.active_at > self.idle_timeout:
                self._drop(client)
        if self._accept_again_at is not None and now >= self._accept_again_at:
            self._accept_again_at = None
            self._selector.register(self.listener, selectors.EVENT_READ)

    def _next_timeout(self) -> float | None:
        deadlines = [c.active_at + self.idle_timeout for c in self._clients if c.command is None]
        if self._accept_again_at is not None:
            deadlines.append(self._accept_again_at)
        return max(0.0, min(deadlines) - time.monotonic()) + 0.01 if deadlines else None

    def _accept(self) -> None:
        for _ in range(self.max_clients):  # a burst, then serve the others
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that client is gone; the next one may be waiting
                if e.errno in _FD_SHORTAGE:
                    if self._evict("hvf ran out of file descriptors"):
                        self._warn(e, "closing idle clients to make room")
                        continue
                    self._warn(e, "refusing clients until some close")
                    self._refuse_one(e)
                else:
                    log.warning("control socket: accept failed: %s", e.strerror or e)
                self._selector.unregister(self.listener)
                self._accept_again_at = time.monotonic() + ACCEPT_BACKOFF
                return
            self._admit(sock)

    def _warn(self, cause: OSError, action: str) -> None:
        """Log a shortage of descriptors, at most once every :data:`WARN_INTERVAL`."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning("control socket: %s; %s", cause.strerror, action)

    def _refuse_one(self, cause: OSError) -> None:
        """Out of descriptors with every client busy: tell one waiting client so."""
        if self._reserve is None:
            return
        os.close(self._reserve)
        self._reserve = None
        try:
            sock, _ = self.listener.accept()
            with sock:
                _send_now(sock, error(None, "TooManyClients",
                                      f"hvf cannot take a client now: {cause.strerror}"))
        except OSError:
            pass
        try:
            self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # tried again next time

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            uid = peer_uid(sock)
        except OSError:
            sock.close()
            return
        if uid != os.getuid():
            log.warning("control socket: refused a client with uid %d", uid)
            _send_now(sock, {"error": {"class": "PermissionDenied",
                                       "desc": f"uid {uid} may not control this VM"}})
            sock.close()
            return
        if len(self._clients) >= self.max_clients and not self._evict(
                f"{self.max_clients} control clients are connected"):
            _send_now(sock, error(None, "TooManyClients",
                                   f"all {self.max_clients} control clients are busy; "
                                   f"try again later"))
            sock.close()
            return
        client = _Client(sock, time.monotonic())
        self._clients.append(client)
        self._queue(client, encode({"hvf": {"version": hvf.__version__,
                                             "protocol": PROTOCOL_VERSION,
                                             "vm": self.vm.name}}))

    def _evict(self, why: str) -> bool:
        """Close the client idle the longest (none that waits on a command)."""
        idle = [c for c in self._clients if c.command is None]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.active_at)
        _send_now(victim.sock, error(None, "TooManyClients",
                                      f"closed, idle, to make room for a new client ({why})"))
        self._drop(victim)
        return True

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if data:
            client.inbox += data
        else:
            client.eof = True
        self._next_request(client)

    def _next_request(self, client: _Client) -> None:
        """Start the next request waiting in ``client``'s inbox, if it may run now."""
        if client.closed or client.command is not None or len(client.outbox) > MAX_UNREAD:
            self._want(client)
            return
        end = client.inbox.find(b"\n")
        if end < 0 and (len(client.inbox) > MAX_REQUEST or (client.eof and client.inbox)):
            end = len(client.inbox)
        if end > MAX_REQUEST:
            self._queue(client, encode(error(None, "RequestTooLarge",
                                               f"requests are limited to {MAX_REQUEST} bytes")))
            client.inbox.clear()
            client.eof = True  # read no more; close once the reply is out
        elif end >= 0:
            line = bytes(client.inbox[:end])
            del client.inbox[:end + 1]
            client.active_at = time.monotonic()
            request = self.requests.parse(line)
            if isinstance(request, dict):
                self._queue(client, encode(request))
            else:
                self._start(client, request)
            if client.inbox and not client.closed:
                self._ready.append(client)  # one line per turn: fair to the others
        self._want(client)
        self._close_if_done(client)

    def _start(self, client: _Client, request: Request) -> None:
        client.command = request.command
        try:
            threading.Thread(target=self._run_command, args=(client, request),
                             name=f"hvf ctl {request.command}", daemon=True).start()
        except RuntimeError as e:  # no thread to be had
            client.command = None
            self._queue(client, encode(error(request.rid, "InternalError",
                                               f"{request.command}: {e}")))

    def _deliver(self) -> None:
        """Lines from command threads: progress, and the replies that end commands."""
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        with self._lock:
            posted, self._outbox = self._outbox, []
        for client, line, finished in posted:
            if finished:
                client.command = None
                client.active_at = time.monotonic()
            if client.closed:
                if finished:
                    log_orphan(finished, line)
                    self._clients.remove(client)  # its command no longer counts
                continue
            if finished:
                client.undelivered = finished
                self._queue(client, line)
                self._ready.append(client)
            elif len(client.outbox) < MAX_UNREAD:  # progress: dropped for a slow reader
                self._queue(client, line)

    def _queue(self, client: _Client, line: bytes) -> None:
        client.outbox += line
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        if client.outbox:
            try:
                sent = client.sock.send(client.outbox)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(client)
                return
            if sent:
                del client.outbox[:sent]
                client.active_at = time.monotonic()
                if client.inbox and client not in self._ready:
                    self._ready.append(client)  # requests held back while it was behind
        if not client.outbox:
            client.undelivered = None
        self._want(client)
        self._close_if_done(client)

    def _close_if_done(self, client: _Client) -> None:
        """Close a client that has stopped sending once all it asked for is answered."""
        if (client.eof and not client.closed and client.command is None
                and not client.inbox and not client.outbox):
            self._drop(client)

    def _want(self, client: _Client) -> None:
        """Register for what ``client`` waits on: room to write, requests to read."""
        if client.closed:
            return
        events = selectors.EVENT_WRITE if client.outbox else 0
        if not client.eof and len(client.inbox) <= MAX_REQUEST and len(client.outbox) <= MAX_UNREAD:
            events |= selectors.EVENT_READ
        if events == client.events:
            return
        if not client.events:
            self._selector.register(client.sock, events, client)
        elif not events:
            self._selector.unregister(client.sock)
        else:
            self._selector.modify(client.sock, events, client)
        client.events = events

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        if client.undelivered:
            log_orphan(client.undelivered, bytes(client.outbox))
        if client.command is None:  # else it counts until its command ends
            self._clients.remove(client)
        if client in self._ready:
            self._ready.remove(client)
        if client.events:
            self._selector.unregister(client.sock)
        client.sock.close()


def _send_now(sock: socket.socket, message: dict[str, Any]) -> None:
    """Best effort, never blocking: for a client about to be closed."""
    try:
        sock.send(encode(message), socket.MSG_DONTWAIT)
    except OSError:
        pass

