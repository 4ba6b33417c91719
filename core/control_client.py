# SPDX-License-Identifier: BSD-2-Clause
"""The client side of the control socket (:mod:`hvf.control` has the protocol).

Every wait is bounded by the client's timeout: connecting (a VM whose backlog is full
is retried until then), the greeting, and each line of a reply; a long command that
reports progress does not time out while the reports come.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvf.errors import CtlError

#: Pause between attempts to connect to a VM whose backlog is full.
_CONNECT_RETRY = 0.02


def is_live(path: Path) -> bool:
    """Whether a VM listens on the socket at ``path`` (never waits)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
        return True
    except BlockingIOError:
        return True  # listening, with a full backlog
    except OSError:
        return False
    finally:
        probe.close()


class ControlClient:
    """A connection to one VM's control socket; ``timeout`` None waits forever."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._sent = False  # a request: a timeout from now on leaves it running
        self.who = f"VM '{path.name.removesuffix('.sock')}'"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(timeout)
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

    def _connect(self, path: Path) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.sock.setblocking(deadline is None)
        while True:
            try:
                self.sock.connect(str(path))
                return
            except BlockingIOError:  # the VM's backlog is full: it is busy or stuck
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._timed_out() from None
                time.sleep(_CONNECT_RETRY)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    raise CtlError(f"no VM is listening on {path}") from None
                raise CtlError(f"cannot connect to {path}: {e.strerror}") from None

    def _timed_out(self) -> CtlError:
        started = "; the command it was given goes on" if self._sent else ""
        return CtlError(f"{self.who} did not answer within {self.timeout:g} s{started} "
                        f"(--timeout SECONDS waits longer)")

    def _receive(self) -> dict[str, Any]:
        import json  # here, not at the top: the VM's own import of this module needs none

        try:
            line = self.reader.readline()
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as e:
            raise CtlError(f"{self.who}: the control connection failed: {e.strerror or e}") \
                from None
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
        import json

        rid = self._next_id
        self._next_id += 1
        if progress is not None:
            args["progress"] = True
        try:
            self.sock.sendall(json.dumps({"id": rid, "command": command, "args": args}).encode()
                              + b"\n")
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as e:
            raise CtlError(f"{self.who}: the control connection failed: {e.strerror or e}") \
                from None
        self._sent = True
        reply = self._receive()
        while "progress" in reply:
            if progress is not None:
                p = reply["progress"]
                progress(int(p.get("done", 0)), int(p.get("total", 0)))
            reply = self._receive()
        error = reply.get("error")
        if error is not None:
            desc = error.get("desc", "failed") if isinstance(error, dict) else str(error)
            raise CtlError(f"{command}: {desc}")
        result = reply.get("return", {})
        return result if isinstance(result, dict) else {"result": result}

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
