# SPDX-License-Identifier: BSD-2-Clause
"""The control socket: how ``hvf ctl`` talks to a running VM.

Each VM listens on ``RUNTIME_DIR/NAME.sock`` (mode 0600). Only peers with the VM
owner's uid are served (``SO_PEERCRED``). The protocol is one JSON object per line:

- on connect the VM sends a greeting: ``{"hvf": {"version": V, "protocol": 1, "vm": NAME}}``
- a request: ``{"id": ANY, "command": NAME, "args": {...}}``
- a reply: ``{"id": ANY, "return": {...}}`` or ``{"id": ANY, "error": {"class": C, "desc": D}}``

A client may send several requests on one connection. Requests larger than
:data:`MAX_REQUEST` bytes, malformed JSON and unknown commands get error replies.
Commands come from the ``hvf_register_ctl_commands`` hook.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvf
from hvf.errors import ConfigError, CtlError, HvfError

if TYPE_CHECKING:
    from hvf.vm import Machine

log = logging.getLogger("hvf.control")

PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024
_UCRED = struct.Struct("3i")


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


def is_live(path: Path) -> bool:
    """Whether a VM answers on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class ControlServer:
    """Listens for control clients and runs their commands on a thread each."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
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
        self.listener.listen(8)
        self._closed = False

    def start(self) -> None:
        """Serve on a thread of its own: it must answer while the VM (and its I/O
        thread) is paused."""
        threading.Thread(target=self._accept_loop, name="hvf ctl listener", daemon=True).start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        try:
            if self.path.exists():
                self.path.unlink()
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="hvf ctl", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                uid = peer_uid(conn)
                if uid != os.getuid():
                    log.warning("control socket: refused a client with uid %d", uid)
                    self._send(conn, {"error": {"class": "PermissionDenied",
                                                "desc": f"uid {uid} may not control this VM"}})
                    return
                self._send(conn, {"hvf": {"version": hvf.__version__,
                                          "protocol": PROTOCOL_VERSION, "vm": self.vm.name}})
                reader = conn.makefile("rb")
                while True:
                    line = reader.readline(MAX_REQUEST + 1)
                    if not line:
                        return
                    if len(line) > MAX_REQUEST and not line.endswith(b"\n"):
                        self._send(conn, _error(None, "RequestTooLarge",
                                                f"requests are limited to {MAX_REQUEST} bytes"))
                        return
                    self._send(conn, self.handle(line, conn))
            except OSError:
                return

    def handle(self, line: bytes, conn: socket.socket | None = None) -> dict[str, Any]:
        """Run one request line; always returns a reply object.

        With ``"progress": true`` in its args, a long command sends
        ``{"progress": {"done": N, "total": M}}`` lines before its reply.
        """
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(None, "MalformedRequest", f"not a JSON object: {e}")
        if not isinstance(request, dict):
            return _error(None, "MalformedRequest", "a request must be a JSON object")
        rid = request.get("id")
        command = request.get("command")
        args = request.get("args", {})
        if not isinstance(command, str) or not isinstance(args, dict):
            return _error(rid, "MalformedRequest",
                          "a request needs \"command\" (a string) and optional \"args\" (an object)")
        args.pop("_progress", None)  # reserved for the server
        if args.pop("progress", False) and conn is not None:
            args["_progress"] = lambda done, total: self._send(
                conn, {"id": rid, "progress": {"done": done, "total": total}})
        entry = self.vm.plugins.ctl_commands.get(command)
        if entry is None:
            known = ", ".join(self.vm.plugins.ctl_commands.names())
            return _error(rid, "UnknownCommand", f"unknown command '{command}' (known: {known})")
        try:
            result = entry.factory(vm=self.vm, args=args)
        except HvfError as e:
            return _error(rid, type(e).__name__, str(e))
        except (KeyError, TypeError, ValueError) as e:
            return _error(rid, "InvalidArguments", f"{command}: {e}")
        except Exception as e:  # report, never kill the VM for a bad request
            log.exception("control command %s failed", command)
            return _error(rid, "InternalError", f"{command}: {type(e).__name__}: {e}")
        return {"id": rid, "return": result if result is not None else {}}

    @staticmethod
    def _send(conn: socket.socket, message: dict[str, Any]) -> None:
        conn.sendall(json.dumps(message).encode() + b"\n")


def _error(rid: Any, cls: str, desc: str) -> dict[str, Any]:
    return {"id": rid, "error": {"class": cls, "desc": desc}}


class ControlClient:
    """A connection to one VM's control socket."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as e:
            self.sock.close()
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise CtlError(f"no VM is listening on {path}") from None
            raise CtlError(f"cannot connect to {path}: {e.strerror}") from None
        self.reader = self.sock.makefile("rb")
        try:
            greeting = self._receive()
            if "hvf" not in greeting:
                error = greeting.get("error", {})
                raise CtlError(error.get("desc", f"unexpected greeting from {path}"))
        except BaseException:
            self.close()
            raise
        self.greeting = greeting["hvf"]
        self._next_id = 1

    def _receive(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise CtlError("the VM closed the control connection")
        try:
            message = json.loads(line)
        except ValueError:
            raise CtlError("the VM sent a malformed reply") from None
        if not isinstance(message, dict):
            raise CtlError("the VM sent a malformed reply")
        return message

    def call(
        self, command: str, *, progress: Callable[[int, int], None] | None = None, **args: Any
    ) -> dict[str, Any]:
        """Run ``command``; raises CtlError with the VM's message on an error reply."""
        rid = self._next_id
        self._next_id += 1
        if progress is not None:
            args["progress"] = True
        self.sock.sendall(json.dumps({"id": rid, "command": command, "args": args}).encode() + b"\n")
        reply = self._receive()
        while "progress" in reply:
            if progress is not None:
                p = reply["progress"]
                progress(int(p.get("done", 0)), int(p.get("total", 0)))
            reply = self._receive()
        if "error" in reply:
            error = reply["error"]
            raise CtlError(f"{command}: {error.get('desc', 'failed')}")
        result = reply.get("return", {})
        return result if isinstance(result, dict) else {"result": result}

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
