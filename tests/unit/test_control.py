# SPDX-License-Identifier: BSD-2-Clause
"""The control protocol without KVM: :class:`ControlServer` with a fake machine that
has a real plugin manager (the core's commands plus a test plugin's), over real
sockets where the framing matters."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hvf
from hvf import control
from hvf.control import MAX_REQUEST, PROTOCOL_VERSION, ControlClient, ControlServer
from hvf.errors import ConfigError, CtlError, SnapshotError
from hvf.pluginmanager import Plugins

_names = itertools.count()


class CommandsPlugin:
    """A plugin that adds commands for the tests; records what each handler was given."""

    __name__ = "test-commands"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hvf.hookimpl
    def hvf_register_ctl_commands(self, commands: Any) -> None:
        commands.add("echo", self.echo, help="return the arguments")
        commands.add("none", lambda *, vm, args: None, help="return nothing")
        commands.add("scalar", lambda *, vm, args: 42, help="return a bare value")
        commands.add("fail", self.fail, help="raise an HvfError")
        commands.add("needs-x", self.needs_x, help="KeyError without x")
        commands.add("typed", self.typed, help="TypeError/ValueError on bad args")
        commands.add("crash", self.crash, help="an unexpected exception")
        commands.add("work", self.work, help="report progress, then return")
        commands.add("whoami", lambda *, vm, args: {"vm": vm.name}, help="the VM's name")

    def echo(self, *, vm: Any, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("echo", dict(args)))
        return {"args": {k: v for k, v in args.items() if not k.startswith("_")},
                "progress_callable": callable(args.get("_progress"))}

    def fail(self, *, vm: Any, args: dict[str, Any]) -> None:
        raise SnapshotError("disk on fire")

    def needs_x(self, *, vm: Any, args: dict[str, Any]) -> dict[str, Any]:
        return {"x": args["x"]}

    def typed(self, *, vm: Any, args: dict[str, Any]) -> dict[str, Any]:
        return {"n": int(args.get("n", 0)) + 1}

    def crash(self, *, vm: Any, args: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    def work(self, *, vm: Any, args: dict[str, Any]) -> dict[str, Any]:
        report = args.get("_progress")
        total = int(args.get("steps", 3))
        for done in range(total + 1):
            if report is not None:
                report(done * 100, total * 100)
        return {"steps": total}


class FakeVm:
    def __init__(self, plugin: CommandsPlugin) -> None:
        self.name = f"fake{os.getpid()}-{next(_names)}"
        self.plugins = Plugins(load_entry_points=False, extra=(plugin,))


@pytest.fixture
def plugin() -> CommandsPlugin:
    return CommandsPlugin()


@pytest.fixture
def server(plugin: CommandsPlugin, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlServer]:
    monkeypatch.setenv("HVF_RUNTIME_DIR", str(tmp_path / "run"))
    srv = ControlServer(FakeVm(plugin))  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.close()


def handle(server: ControlServer, request: Any) -> dict[str, Any]:
    line = request if isinstance(request, bytes) else json.dumps(request).encode()
    return server.handle(line)


# ---- handle(): one request line, one reply ----


@pytest.mark.parametrize("line", [b"{", b"not json", b"\xff\xfe{}", b"", b'{"a": }'])
def test_malformed_json(server: ControlServer, line: bytes) -> None:
    reply = server.handle(line)
    assert reply["id"] is None
    assert reply["error"]["class"] == "MalformedRequest"
    assert "not a JSON object" in reply["error"]["desc"]


@pytest.mark.parametrize("value", [[], [1, 2], "status", 3, None, True])
def test_request_that_is_not_an_object(server: ControlServer, value: Any) -> None:
    reply = handle(server, value)
    assert reply == {"id": None, "error": {"class": "MalformedRequest",
                                           "desc": "a request must be a JSON object"}}


@pytest.mark.parametrize("request_", [
    {"id": 7},
    {"id": 7, "command": 5},
    {"id": 7, "command": None},
    {"id": 7, "command": "echo", "args": []},
    {"id": 7, "command": "echo", "args": "x=1"},
])
def test_missing_command_or_bad_args(server: ControlServer, request_: dict[str, Any]) -> None:
    reply = handle(server, request_)
    assert reply["id"] == 7  # the id is echoed whenever the request had one
    assert reply["error"]["class"] == "MalformedRequest"
    assert '"command"' in reply["error"]["desc"]


def test_unknown_command_lists_the_known_ones(server: ControlServer) -> None:
    reply = handle(server, {"id": "abc", "command": "frobnicate"})
    assert reply["id"] == "abc"
    assert reply["error"]["class"] == "UnknownCommand"
    desc = reply["error"]["desc"]
    assert "'frobnicate'" in desc
    for name in ("echo", "status", "checkpoint", "suspend", "poweroff"):
        assert name in desc


def test_a_command_and_its_reply(server: ControlServer, plugin: CommandsPlugin) -> None:
    assert handle(server, {"id": 1, "command": "echo", "args": {"a": [1, "two"]}}) == {
        "id": 1, "return": {"args": {"a": [1, "two"]}, "progress_callable": False}}
    assert handle(server, {"id": 2, "command": "echo"})["return"]["args"] == {}
    assert handle(server, {"command": "none"}) == {"id": None, "return": {}}
    assert handle(server, {"id": 3, "command": "scalar"}) == {"id": 3, "return": 42}
    assert handle(server, {"id": 4, "command": "whoami"})["return"] == {"vm": server.vm.name}
    assert handle(server, {"id": {"any": "json"}, "command": "none"})["id"] == {"any": "json"}
    assert [name for name, _ in plugin.calls] == ["echo", "echo"]


def test_command_names_ignore_case(server: ControlServer) -> None:
    assert "return" in handle(server, {"id": 1, "command": "ECHO"})


@pytest.mark.parametrize(("args", "fragment"), [
    ({}, "needs-x: 'x'"),
])
def test_invalid_arguments_key_error(server: ControlServer, args: dict[str, Any],
                                     fragment: str) -> None:
    reply = handle(server, {"id": 9, "command": "needs-x", "args": args})
    assert reply["error"] == {"class": "InvalidArguments", "desc": fragment}
    assert handle(server, {"id": 9, "command": "needs-x", "args": {"x": 1}})["return"] == {"x": 1}


@pytest.mark.parametrize("n", ["seven", [1], {"a": 1}])
def test_invalid_arguments_type_and_value_errors(server: ControlServer, n: Any) -> None:
    reply = handle(server, {"id": 1, "command": "typed", "args": {"n": n}})
    assert reply["error"]["class"] == "InvalidArguments"
    assert reply["error"]["desc"].startswith("typed: ")
    assert handle(server, {"id": 2, "command": "typed", "args": {"n": "4"}})["return"] == {"n": 5}


def test_a_handler_raising_an_hvf_error(server: ControlServer) -> None:
    reply = handle(server, {"id": 5, "command": "fail"})
    assert reply == {"id": 5, "error": {"class": "SnapshotError", "desc": "disk on fire"}}


def test_an_unexpected_exception_is_reported_not_raised(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    reply = handle(server, {"id": 6, "command": "crash"})
    assert reply == {"id": 6, "error": {"class": "InternalError",
                                        "desc": "crash: RuntimeError: boom"}}
    assert "control command crash failed" in caplog.text
    assert "return" in handle(server, {"id": 7, "command": "none"})  # still serving


def test_progress_needs_a_connection_and_cannot_be_injected(
        server: ControlServer, plugin: CommandsPlugin) -> None:
    # handle() without a connection: nowhere to send progress, so no callback
    reply = handle(server, {"id": 1, "command": "echo", "args": {"progress": True}})
    assert reply["return"] == {"args": {}, "progress_callable": False}
    # a client cannot pass its own "_progress"
    reply = handle(server, {"id": 2, "command": "echo", "args": {"_progress": "x", "k": 1}})
    assert reply["return"] == {"args": {"k": 1}, "progress_callable": False}
    assert all("_progress" not in args for _, args in plugin.calls)


# ---- over a real socket: greeting, framing, progress, sizes, peers ----


@pytest.fixture
def running(server: ControlServer) -> ControlServer:
    server.start()
    return server


def raw(server: ControlServer) -> tuple[socket.socket, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(server.path))
    return s, s.makefile("rb")


def recv(reader: Any) -> Any:
    line = reader.readline()
    assert line.endswith(b"\n"), line
    return json.loads(line)


def test_socket_place_and_mode(running: ControlServer, tmp_path: Path) -> None:
    assert running.path == tmp_path / "run" / f"{running.vm.name}.sock"
    assert (running.path.stat().st_mode & 0o777) == 0o600
    assert (running.path.parent.stat().st_mode & 0o777) == 0o700


def test_greeting_format(running: ControlServer) -> None:
    s, reader = raw(running)
    with s, reader:
        line = reader.readline()
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line) == {"hvf": {"version": hvf.__version__,
                                            "protocol": PROTOCOL_VERSION,
                                            "vm": running.vm.name}}
    with ControlClient(running.path, timeout=10) as client:
        assert client.greeting["protocol"] == 1 and client.greeting["vm"] == running.vm.name


def test_several_requests_on_one_connection(running: ControlServer) -> None:
    s, reader = raw(running)
    with s, reader:
        recv(reader)
        s.sendall(b'{"id": 1, "command": "echo", "args": {"a": 1}}\n'
                  b"garbage\n"
                  b'{"id": 3, "command": "nope"}\n'
                  b'{"id": 4, "command": "scalar"}\n')
        replies = [recv(reader) for _ in range(4)]
    assert replies[0] == {"id": 1, "return": {"args": {"a": 1}, "progress_callable": False}}
    assert replies[1]["error"]["class"] == "MalformedRequest"
    assert replies[2]["id"] == 3 and replies[2]["error"]["class"] == "UnknownCommand"
    assert replies[3] == {"id": 4, "return": 42}


def test_progress_lines_come_before_the_reply(running: ControlServer) -> None:
    s, reader = raw(running)
    with s, reader:
        recv(reader)
        s.sendall(b'{"id": "w", "command": "work", "args": {"steps": 3, "progress": true}}\n')
        lines = [recv(reader) for _ in range(5)]
    assert lines[:4] == [{"id": "w", "progress": {"done": d, "total": 300}}
                         for d in (0, 100, 200, 300)]
    assert lines[4] == {"id": "w", "return": {"steps": 3}}


def test_client_call_with_progress(running: ControlServer) -> None:
    seen: list[tuple[int, int]] = []
    with ControlClient(running.path, timeout=10) as client:
        assert client.call("work", steps=2, progress=lambda d, t: seen.append((d, t))) == {
            "steps": 2}
        assert client.call("work", steps=2) == {"steps": 2}  # no progress asked: none sent
        assert client.call("scalar") == {"result": 42}
        with pytest.raises(CtlError, match="fail: disk on fire"):
            client.call("fail")
        with pytest.raises(CtlError, match="unknown command 'zap'"):
            client.call("zap")
        assert client.call("none") == {}  # the connection survives error replies
    assert seen == [(0, 200), (100, 200), (200, 200)]


def test_request_at_the_size_limit_is_served(running: ControlServer) -> None:
    body = b'{"id": 1, "command": "echo", "args": {"pad": "'
    tail = b'"}}'
    line = body + b"x" * (MAX_REQUEST - len(body) - len(tail)) + tail
    assert len(line) == MAX_REQUEST
    s, reader = raw(running)
    with s, reader:
        recv(reader)
        s.sendall(line + b"\n")
        reply = recv(reader)
    assert reply["id"] == 1 and len(reply["return"]["args"]["pad"]) > MAX_REQUEST - 100


@pytest.mark.parametrize("extra", [1, 10_000, 3 * MAX_REQUEST])
def test_oversize_request_is_refused_and_the_connection_closed(
        running: ControlServer, extra: int) -> None:
    s, reader = raw(running)
    with s, reader:
        recv(reader)
        body = b'{"id": 1, "command": "echo", "args": {"pad": "'
        payload = body + b"x" * (MAX_REQUEST + extra - len(body)) + b'"}}\n'
        sender = threading.Thread(target=_send_quietly, args=(s, payload), daemon=True)
        sender.start()
        reply = recv(reader)
        assert reply == {"id": None, "error": {
            "class": "RequestTooLarge", "desc": f"requests are limited to {MAX_REQUEST} bytes"}}
        try:  # closed: EOF, or a reset as the server dropped what it had not read
            assert reader.readline() == b""
        except ConnectionResetError:
            pass
        sender.join(10)
    # the server is fine afterwards
    with ControlClient(running.path, timeout=10) as client:
        assert client.call("scalar") == {"result": 42}


def _send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass  # the server may close before reading it all


def test_peer_with_another_uid_is_refused(
        running: ControlServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(control, "peer_uid", lambda conn: os.getuid() + 1000)
    s, reader = raw(running)
    with s, reader:
        first = recv(reader)
        try:
            s.sendall(b'{"id": 1, "command": "scalar"}\n')
            assert reader.readline() == b""  # nothing served: the VM hung up
        except (ConnectionResetError, BrokenPipeError):
            pass  # it hung up first (our request unread resets the connection)
    assert first == {"error": {"class": "PermissionDenied",
                               "desc": f"uid {os.getuid() + 1000} may not control this VM"}}
    assert f"refused a client with uid {os.getuid() + 1000}" in caplog.text


def test_client_to_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(CtlError, match="no VM is listening"):
        ControlClient(tmp_path / "none.sock", timeout=1)


@pytest.mark.parametrize(("first_line", "error"), [
    (b"", "closed the control connection"),
    (b'{"error": {"class": "PermissionDenied", "desc": "go away"}}\n', "go away"),
])
def test_client_closes_its_socket_when_the_greeting_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_line: bytes, error: str) -> None:
    path = tmp_path / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def accept_and_close() -> None:
        conn, _ = listener.accept()
        conn.sendall(first_line)  # no greeting
        conn.close()

    t = threading.Thread(target=accept_and_close, daemon=True)
    t.start()
    created: list[socket.socket] = []

    class Tracked(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(socket, "socket", Tracked)
    try:
        with pytest.raises(CtlError, match=error):
            ControlClient(path, timeout=5)
        t.join(5)  # (its accepted socket is closed once it is done)
        left_open = [s for s in created if s.fileno() != -1]
    finally:
        monkeypatch.undo()
        for s in created:
            s.close()  # (so that a leak fails this test only, not a later one)
        t.join(5)
        listener.close()
    assert created and not left_open  # (the listener thread's accepted socket is counted too)


# ---- the socket file ----


def test_a_live_name_is_refused_and_a_stale_socket_replaced(
        plugin: CommandsPlugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVF_RUNTIME_DIR", str(tmp_path / "run"))
    vm = FakeVm(plugin)
    first = ControlServer(vm)  # type: ignore[arg-type]
    try:
        with pytest.raises(ConfigError, match="already running"):
            ControlServer(vm)  # type: ignore[arg-type]
    finally:
        # a VM that died without cleaning up: the file stays, nobody listens
        first.listener.close()
    assert first.path.exists()
    second = ControlServer(vm)  # type: ignore[arg-type]
    try:
        second.start()
        with ControlClient(second.path, timeout=10) as client:
            assert client.greeting["vm"] == vm.name
    finally:
        second.close()
    assert not second.path.exists()


def test_a_file_that_is_not_a_socket_is_left_alone(
        plugin: CommandsPlugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVF_RUNTIME_DIR", str(tmp_path))
    vm = FakeVm(plugin)
    (tmp_path / f"{vm.name}.sock").write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(vm)  # type: ignore[arg-type]
    assert (tmp_path / f"{vm.name}.sock").read_text() == "precious"


@pytest.mark.parametrize("name", ["", "a/b", ".", "..", "x\0y"])
def test_names_that_cannot_name_a_socket(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid VM name"):
        control.socket_path(name)
