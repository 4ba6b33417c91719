# SPDX-License-Identifier: BSD-2-Clause
"""The control socket under hostile clients, without KVM: the file descriptor limit,
the client cap and idle timeout, deep JSON, clients that leave in the middle of a
command, and ``hvf ctl``'s timeout. Real sockets and a real plugin manager throughout;
the file descriptor limit is this process's own, lowered with ``setrlimit``."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

import hvf
from hvf import ctl
from hvf.control import MAX_DEPTH, MAX_REQUEST, ControlClient, ControlServer
from hvf.pluginmanager import Plugins

_names = itertools.count()


class SlowWork:
    """A command that reports progress in steps and records how far it got."""

    __name__ = "slow-work"

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.steps_done = 0

    @hvf.hookimpl
    def hvf_register_ctl_commands(self, commands: Any) -> None:
        commands.add("none", lambda *, vm, args: None, help="return nothing")
        commands.add("echo", lambda *, vm, args: args, help="return the arguments")
        commands.add("slow", self.slow, help="report progress slowly, then return")
        commands.add("hang", lambda *, vm, args: time.sleep(float(args["seconds"])) or {},
                     help="take a while")

    def slow(self, *, vm: Any, args: dict[str, Any]) -> dict[str, Any]:
        report = args.get("_progress")
        for step in range(int(args.get("steps", 10))):
            if report is not None:
                report(step, 10)
            time.sleep(0.02)
            self.steps_done = step + 1
        self.finished.set()
        return {"steps": self.steps_done}


class FakeVm:
    def __init__(self, plugin: SlowWork) -> None:
        self.name = f"hard{os.getpid()}-{next(_names)}"
        self.plugins = Plugins(load_entry_points=False, extra=(plugin,))


@pytest.fixture
def work() -> SlowWork:
    return SlowWork()


@pytest.fixture
def make_server(work: SlowWork, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("HVF_RUNTIME_DIR", str(tmp_path / "run"))
    servers: list[ControlServer] = []

    def make(**kw: Any) -> ControlServer:
        srv = ControlServer(FakeVm(work), **kw)  # type: ignore[arg-type]
        servers.append(srv)
        srv.start()
        return srv

    yield make
    for srv in servers:
        srv.close()


def connect(server: ControlServer, timeout: float = 5) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(server.path))
    return s


def read_line(s: socket.socket) -> bytes:
    """One line from ``s`` (b"" at end of file), read a byte at a time so nothing
    past it is consumed."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = s.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def status_within(server: ControlServer, seconds: float) -> float:
    """Seconds a new client takes to connect, be greeted and get a reply."""
    started = time.monotonic()
    with ControlClient(server.path, timeout=seconds) as client:
        assert client.call("none") == {}
    return time.monotonic() - started


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (after whatever it sent)."""
    s.settimeout(0)
    try:
        while data := s.recv(65536):
            del data
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def lowest_free_fd() -> int:
    """As a soft RLIMIT_NOFILE, this leaves no descriptor to spare: every number below
    it is in use (a limit bounds the numbers, not how many are open)."""
    fd = os.dup(0)
    os.close(fd)
    return fd


@contextlib.contextmanager
def fd_limit(soft: int) -> Iterator[None]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


# ---- the file descriptor limit ----


def test_accept_loop_survives_running_out_of_file_descriptors(make_server: Any) -> None:
    server = make_server()
    assert status_within(server, 5) < 5
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(40)]
    try:
        # every socket exists already: only the server's accept() can now run out
        with fd_limit(lowest_free_fd() + 3):
            for c in clients:
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    c.connect(str(server.path))
            time.sleep(0.5)  # the server meets EMFILE on accept, again and again
        # the limit is back: a new client is served at once
        assert status_within(server, 2) < 1.0
    finally:
        for c in clients:
            c.close()
    assert status_within(server, 2) < 1.0


def test_at_the_limit_an_idle_client_makes_room_for_a_new_one(make_server: Any) -> None:
    server = make_server()
    idle = [connect(server) for _ in range(3)]
    for s in idle:
        assert b'"hvf"' in read_line(s)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        with fd_limit(lowest_free_fd()):  # not one descriptor to spare in the process
            probe.connect(str(server.path))
            greeting = read_line(probe)
        assert b'"hvf"' in greeting, greeting
        probe.sendall(b'{"id": 1, "command": "none"}\n')
        assert json.loads(read_line(probe)) == {"id": 1, "return": {}}
        # the client idle the longest was closed, with a notice saying why
        notice = read_line(idle[0])
        assert b"TooManyClients" in notice or notice == b"", notice
        assert closed_by_server(idle[0])
    finally:
        probe.close()
        for s in idle:
            s.close()


def test_out_of_descriptors_with_every_client_busy_a_newcomer_is_told(
        make_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = make_server()
    busy = [connect(server) for _ in range(3)]
    for s in busy:
        assert read_line(s)
        s.sendall(b'{"id": 1, "command": "hang", "args": {"seconds": 1.0}}\n')
    time.sleep(0.2)  # all three commands run: no client is idle
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        with fd_limit(lowest_free_fd()):
            probe.connect(str(server.path))
            reply = json.loads(read_line(probe))
        assert reply["error"] == {"class": "TooManyClients",
                                  "desc": "hvf cannot take a client now: Too many open files"}
        assert "Too many open files; refusing clients until some close" in caplog.text
        assert status_within(server, 2) < 1.0  # the limit is back: served again
        for s in busy:  # and the busy ones got their replies
            assert json.loads(read_line(s)) == {"id": 1, "return": {}}
    finally:
        probe.close()
        for s in busy:
            s.close()


# ---- the client cap and the idle timeout ----


def test_client_cap_keeps_threads_and_connections_bounded(make_server: Any) -> None:
    server = make_server(max_clients=8)
    threads_before = threading.active_count()
    clients = [connect(server) for _ in range(50)]
    try:
        for s in clients:
            assert read_line(s)  # greeted (the newest), or told why it was closed
        time.sleep(0.2)
        open_ones = [s for s in clients if not closed_by_server(s)]
        assert len(open_ones) <= 8
        assert open_ones == clients[-len(open_ones):]  # the newest were kept
        assert threading.active_count() <= threads_before + 1
        assert status_within(server, 2) < 1.0
    finally:
        for s in clients:
            s.close()


def test_commands_of_clients_that_left_still_count_against_the_cap(make_server: Any) -> None:
    server = make_server(max_clients=2)
    threads_before = threading.active_count()
    for _ in range(5):  # each leaves its greeting unread: the server sees a reset
        with connect(server) as s, contextlib.suppress(BrokenPipeError):
            s.sendall(b'{"id": 1, "command": "hang", "args": {"seconds": 1.5}}\n')
            time.sleep(0.05)  # (past the first two, the server refuses: all are busy)
    time.sleep(0.2)
    assert threading.active_count() <= threads_before + 1 + 2
    with connect(server) as late:
        reply = json.loads(read_line(late))
    assert reply["error"]["class"] == "TooManyClients"
    assert "all 2 control clients are busy" in reply["error"]["desc"]
    time.sleep(1.5)  # the commands end: room again
    assert status_within(server, 2) < 1.0


def test_idle_clients_are_closed_after_the_idle_timeout(make_server: Any) -> None:
    server = make_server(idle_timeout=0.5)
    silent = connect(server)
    half = connect(server)
    assert read_line(silent) and read_line(half)
    half.sendall(b'{"id": 1, "comm')  # a request that never ends
    busy = connect(server)
    assert read_line(busy)
    busy.sendall(b'{"id": 2, "command": "hang", "args": {"seconds": 1.2}}\n')
    time.sleep(1.0)
    assert closed_by_server(silent) and closed_by_server(half)
    assert not closed_by_server(busy)  # a client waiting on its command is not idle
    busy.settimeout(5)
    assert json.loads(read_line(busy)) == {"id": 2, "return": {}}
    for s in (silent, half, busy):
        s.close()


# ---- hostile requests ----


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, MAX_REQUEST // 2 - 10])
def test_deeply_nested_json_gets_an_error_reply(make_server: Any, depth: int) -> None:
    server = make_server()
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
        body = opener * depth + b"1" + closer * depth
        if len(body) > MAX_REQUEST:
            body = b"[" * depth + b"]" * depth
        s = connect(server)
        with s:
            assert read_line(s)
            s.sendall(body + b"\n")
            reply = json.loads(read_line(s))
            assert reply["error"]["class"] == "MalformedRequest"
            assert f"nested more than {MAX_DEPTH} deep" in reply["error"]["desc"]
            s.sendall(b'{"id": 3, "command": "none"}\n')  # the connection goes on
            assert json.loads(read_line(s)) == {"id": 3, "return": {}}


@pytest.mark.parametrize("line", [
    b'"\\' * 30000,  # an unterminated string of escapes (quadratic for a naive regex)
    b'{"x": "' + b"[" * 60000 + b'"}',  # brackets inside a string do not nest
    b'[' * 65000,
    b'{"a":' * 13000,
    b"[1," * 21000 + b"]" * 10,
])
def test_pathological_lines_are_answered_at_once(make_server: Any, line: bytes) -> None:
    server = make_server()
    with ControlClient(server.path, timeout=5):
        pass
    s = connect(server)
    with s:
        assert read_line(s)
        started = time.monotonic()
        s.sendall(line[:MAX_REQUEST] + b"\n")
        reply = json.loads(read_line(s))
        assert time.monotonic() - started < 0.5
        assert reply["error"]["class"] in ("MalformedRequest", "UnknownCommand"), reply


def test_nesting_up_to_the_limit_is_served(make_server: Any) -> None:
    server = make_server()
    value: Any = 1
    for _ in range(MAX_DEPTH - 2):  # the request object and "args" are two levels
        value = [value]
    with ControlClient(server.path, timeout=5) as client:
        assert client.call("none", deep=value) == {}


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                     max_leaves=40)


@pytest.fixture(scope="module")
def parser_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlServer]:
    """A server that is never started: :meth:`ControlServer.handle` alone."""
    old = os.environ.get("HVF_RUNTIME_DIR")
    os.environ["HVF_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("run"))
    try:
        server = ControlServer(FakeVm(SlowWork()))  # type: ignore[arg-type]
    finally:
        if old is None:
            del os.environ["HVF_RUNTIME_DIR"]
        else:
            os.environ["HVF_RUNTIME_DIR"] = old
    yield server
    server.close()


@settings(max_examples=300, deadline=None)
@given(prefix=st.binary(max_size=40), nesting=st.integers(0, 20_000),
       brackets=st.sampled_from([b"[", b"{", b'{"x":[', b'"\\', b'["']), tail=_json)
def test_any_request_line_gets_a_reply_object(parser_only: ControlServer, prefix: bytes,
                                              nesting: int, brackets: bytes,
                                              tail: Any) -> None:
    line = prefix + brackets * nesting + json.dumps(tail).encode()
    reply = parser_only.handle(line[:MAX_REQUEST])
    assert isinstance(reply, dict) and ("error" in reply or "return" in reply)


# ---- a client that leaves in the middle ----


def test_a_command_finishes_when_its_client_leaves(
        make_server: Any, work: SlowWork, caplog: pytest.LogCaptureFixture) -> None:
    server = make_server()
    s = connect(server)
    assert read_line(s)
    s.sendall(b'{"id": 1, "command": "slow", "args": {"progress": true}}\n')
    assert b'"progress"' in read_line(s)
    s.close()  # gone, with progress and the reply still to come
    assert work.finished.wait(5), f"the command stopped at step {work.steps_done}"
    assert work.steps_done == 10
    deadline = time.monotonic() + 5
    while "after its client disconnected" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "'slow' finished after its client disconnected" in caplog.text
    assert status_within(server, 2) < 1.0


def test_requests_sent_before_the_client_left_are_still_run(
        make_server: Any, work: SlowWork) -> None:
    server = make_server()
    s = connect(server)
    assert read_line(s)
    s.sendall(b'{"id": 1, "command": "slow", "args": {"progress": true}}\n')
    s.close()
    assert work.finished.wait(5) and work.steps_done == 10


def test_a_client_that_never_reads_is_cut_off_not_buffered_forever(make_server: Any) -> None:
    server = make_server()
    with connect(server) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood = b'{"id": 1, "command": "echo", "args": {"pad": "' + b"x" * 60_000 + b'"}}\n'
        sent = 0
        s.settimeout(0.5)
        with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
            for _ in range(2000):  # ~120 MB of requests whose replies are never read
                s.sendall(flood)
                sent += 1
        assert sent < 50  # the server stopped reading once a few replies were unread
        assert status_within(server, 2) < 1.0


# ---- hvf ctl's timeout ----


@pytest.fixture
def silent_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A control socket for VM 'mute' that accepts and never says a word."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("HVF_RUNTIME_DIR", str(run))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run / "mute.sock"))
    listener.listen(16)
    with listener:
        yield listener


def test_ctl_times_out_with_a_clear_message(
        silent_vm: socket.socket, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    status = ctl.ctl_main(["--vm", "mute", "--timeout", "0.5", "status"])
    took = time.monotonic() - started
    assert status == 1 and took < 3
    err = capsys.readouterr().err
    assert "hvf ctl: VM 'mute' did not answer within 0.5 s" in err
    assert "Traceback" not in err


def test_ctl_times_out_when_the_vm_never_accepts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("HVF_RUNTIME_DIR", str(run))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run / "stuck.sock"))
    listener.listen(0)
    fillers = []
    for _ in range(4):  # fill the backlog: a blocking connect() now waits
        f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(str(run / "stuck.sock"))
        fillers.append(f)
    try:
        started = time.monotonic()
        assert ctl.ctl_main(["--vm", "stuck", "--timeout", "0.3", "status"]) == 1
        assert time.monotonic() - started < 3
        assert "did not answer within 0.3 s" in capsys.readouterr().err
    finally:
        for f in fillers:
            f.close()
        listener.close()


def test_ctl_timeout_default_and_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.DEFAULT_TIMEOUT == 30
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_:
            ctl.ctl_main(["--timeout", bad, "status"])
        assert exit_.value.code == 64
        assert "--timeout" in capsys.readouterr().err
