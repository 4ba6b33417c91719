# SPDX-License-Identifier: BSD-2-Clause
"""Control requests: one JSON line in, one reply object out (:mod:`hvf.control` has
the protocol and the connections).

A request larger than :data:`MAX_REQUEST` bytes (the server's check) or nested
deeper than :data:`MAX_DEPTH` gets an error reply, as malformed JSON and unknown
commands do (:func:`json.loads` is linear in its input and stops deep nesting at the
interpreter's recursion limit; the depth of what it returns is checked after). A command's exceptions become error
replies; nothing a client sends raises here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from hvf.errors import HvfError

if TYPE_CHECKING:
    from hvf.registry import CtlHandler, Entry
    from hvf.vm import Machine

log = logging.getLogger("hvf.control")

MAX_REQUEST = 64 * 1024
#: Deepest nesting of lists and objects in a request (the request object is level 1).
MAX_DEPTH = 32

Send = Callable[[bytes], None]


def nesting_depth(value: Any, limit: int) -> int:
    """How deeply the lists and dicts of a decoded JSON ``value`` nest (the value
    itself is level 1), counting no further than ``limit + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            break
        stack.extend((child, depth + 1) for child in item)
    return deepest


@attrs.define
class Request:
    """A parsed request, ready to run."""

    rid: Any
    command: str
    entry: Entry[CtlHandler]
    args: dict[str, Any]
    progress: bool


class Requests:
    """Parses request lines and runs them on ``vm`` with its plugins' commands."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm

    def handle(self, line: bytes, send: Send | None = None) -> dict[str, Any]:
        """Run one request line; always returns a reply object.

        With ``"progress": true`` in its args (and ``send``), a long command sends
        ``{"progress": {"done": N, "total": M}}`` lines before its reply.
        """
        request = self.parse(line)
        return request if isinstance(request, dict) else self.run(request, send)

    def parse(self, line: bytes) -> Request | dict[str, Any]:
        """The request in ``line``, or the error reply it gets."""
        import json  # on the first request: a VM nobody asks does without json (0.15 MB)

        too_deep = error(None, "MalformedRequest", f"the request is nested more than "
                                                   f"{MAX_DEPTH} deep")
        try:
            request = json.loads(line)
        except RecursionError:  # (the decoder stops at the interpreter's recursion limit)
            return too_deep
        except ValueError as e:
            return error(None, "MalformedRequest", f"not a JSON object: {e}")
        if nesting_depth(request, MAX_DEPTH) > MAX_DEPTH:
            return too_deep
        if not isinstance(request, dict):
            return error(None, "MalformedRequest", "a request must be a JSON object")
        rid = request.get("id")
        command = request.get("command")
        args = request.get("args", {})
        if not isinstance(command, str) or not isinstance(args, dict):
            return error(rid, "MalformedRequest",
                         "a request needs \"command\" (a string) and optional \"args\" (an object)")
        args.pop("_progress", None)  # reserved for the server
        progress = bool(args.pop("progress", False))
        entry = self.vm.plugins.ctl_commands.get(command)
        if entry is None:
            known = ", ".join(self.vm.plugins.ctl_commands.names())
            return error(rid, "UnknownCommand", f"unknown command '{command}' (known: {known})")
        return Request(rid, command, entry, args, progress)

    def run(self, request: Request, send: Send | None = None) -> dict[str, Any]:
        """Run a parsed request; progress lines, if asked for, go to ``send``."""
        rid, command, args = request.rid, request.command, request.args
        if request.progress and send is not None:
            args["_progress"] = lambda done, total: send(encode(
                {"id": rid, "progress": {"done": done, "total": total}}))
        try:
            result = request.entry.factory(vm=self.vm, args=args)
        except HvfError as e:
            return error(rid, type(e).__name__, str(e))
        except (KeyError, TypeError, ValueError) as e:
            return error(rid, "InvalidArguments", f"{command}: {e}")
        except Exception as e:  # report, never kill the VM for a bad request
            log.exception("control command %s failed", command)
            return error(rid, "InternalError", f"{command}: {type(e).__name__}: {e}")
        return {"id": rid, "return": result if result is not None else {}}

    def reply_line(self, request: Request, send: Send) -> bytes:
        """Run ``request`` and encode its reply (a reply that is not JSON is an error)."""
        reply = self.run(request, send)
        try:
            return encode(reply)
        except (TypeError, ValueError, RecursionError) as e:
            return encode(error(request.rid, "InternalError",
                                f"{request.command}: the reply is not JSON: {e}"))


def log_orphan(command: str, line: bytes) -> None:
    """Say how a command ended whose client is gone (it would otherwise go unseen)."""
    import json

    try:
        reply = json.loads(line.splitlines()[-1]) if line.strip() else {}
    except ValueError:
        reply = {}
    failure = reply.get("error")
    if failure:
        log.error("'%s' failed after its client disconnected: %s", command, failure.get("desc"))
    else:
        log.warning("'%s' finished after its client disconnected: %s", command,
                    json.dumps(reply.get("return", {})))


def encode(message: dict[str, Any]) -> bytes:
    import json

    return json.dumps(message).encode() + b"\n"


def error(rid: Any, cls: str, desc: str) -> dict[str, Any]:
    return {"id": rid, "error": {"class": cls, "desc": desc}}
