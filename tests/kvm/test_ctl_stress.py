# SPDX-License-Identifier: BSD-2-Clause
"""The control socket of a real VM (the counter guest, printing on COM1 all along)
under thousands of clients: idle, half-open and malicious ones, then a run into the
file descriptor limit of the hvf process (lowered with ``prlimit``). Afterwards
``hvf ctl status`` answers within a second, and hvf's threads and memory are back
where they started. Also: a client that leaves in the middle of ``checkpoint`` or
``suspend`` leaves a whole snapshot behind, and the log says so."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hvf.control import MAX_CLIENTS, MAX_REQUEST, ControlClient, socket_path
from hvf.plugins.snapshot.store import SnapshotStore

from conftest import popen_hvf, run_hvf

pytestmark = pytest.mark.kvm

MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev")
IDLE_CLIENTS = 3000


@contextlib.contextmanager
def counter_vm(guests: dict[str, Path], tmp_path: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """The counter guest as VM ``name``, answering on its control socket; its stderr
    goes to ``tmp_path/NAME.stderr``."""
    com1 = tmp_path / f"{name}.com1"
    with open(tmp_path / f"{name}.stderr", "wb") as err:
        proc = popen_hvf([*MACHINE, "-l", f"com1,file={com1}", "--kernel", guests["counter"],
                          name], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not (com1.exists() and com1.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None, (tmp_path / f"{name}.stderr").read_text()
            assert time.monotonic() < deadline, "the counter guest printed nothing in 60 s"
            time.sleep(0.05)
        status_latency(name)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def proc_status(pid: int) -> dict[str, int]:
    """Threads and VmRSS (KiB) of ``pid``, and its open file descriptors."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines())
    return {"threads": int(fields["Threads"]), "rss_kib": int(fields["VmRSS"].split()[0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def status_latency(name: str) -> float:
    """Seconds from connecting to ``name``'s socket to its ``status`` reply."""
    started = time.monotonic()
    with ControlClient(socket_path(name), timeout=5) as client:
        assert client.call("status")["name"] == name
    return time.monotonic() - started


def ctl_status(name: str) -> dict[str, Any]:
    r = run_hvf(["ctl", "--vm", name, "--json", "--timeout", "5", "status"], timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr)
    reply: dict[str, Any] = json.loads(r.stdout)
    return reply


def connect(name: str, *, blocking: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if blocking:
        s.settimeout(10)
        deadline = time.monotonic() + 10
        while True:
            try:
                s.connect(str(socket_path(name)))
                break
            except BlockingIOError:  # the backlog is full for a moment
                assert time.monotonic() < deadline, "the VM accepts no more clients"
                time.sleep(0.01)
    else:
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(str(socket_path(name)))
    return s


def read_line(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    line = bytearray()
    while not line.endswith(b"\n"):
        try:
            byte = s.recv(1)
        except ConnectionResetError:
            break
        if not byte:
            break
        line += byte
    return bytes(line)


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room in this process for thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_CLIENTS + 1000
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}; this test needs {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def malicious_clients(name: str) -> list[socket.socket]:
    """Clients that each misbehave in their own way; those still open are returned."""
    kept = []
    for _ in range(200):  # half-open: a request that never ends
        s = connect(name)
        s.sendall(b'{"id": 1, "command": "sta')
        kept.append(s)
    for _ in range(200):  # gone at once, the greeting unread (the VM sees a reset)
        connect(name).close()
    for body in (b"[" * 30000 + b"]" * 30000, b'{"a":' * 10000 + b"}" * 10000,
                 b"\xff\xfe\x00garbage", b'{"id": 1e999999, "command": 7}', b"1" * 5000):
        with connect(name) as s:
            assert b'"hvf"' in read_line(s)
            s.sendall(body + b"\n")
            reply = json.loads(read_line(s))
            assert reply["error"]["class"] == "MalformedRequest", reply
    with connect(name) as s:  # larger than any request may be
        assert read_line(s)
        with contextlib.suppress(OSError):
            s.sendall(b"x" * (MAX_REQUEST + 100))
        assert b"RequestTooLarge" in read_line(s)
    with connect(name) as s:  # many requests at once, then half-closed: all answered
        assert read_line(s)
        s.sendall(b'{"id": 2, "command": "status"}\n' * 500)
        s.shutdown(socket.SHUT_WR)
        replies = [json.loads(read_line(s)) for _ in range(500)]
        assert all(r["id"] == 2 and r["return"]["name"] == name for r in replies)
        assert read_line(s) == b""
    for _ in range(4):  # flooders that never read a reply
        s = connect(name)
        s.settimeout(0.3)
        with contextlib.suppress(OSError):
            for _ in range(400):
                s.sendall(b'{"id": 3, "command": "status"}\n' * 100)
        kept.append(s)
    return kept


def stress(name: str, pid: int) -> dict[str, Any]:
    """One round: idle clients, malicious ones, the fd limit; what was measured."""
    start = proc_status(pid)
    # 3,000 idle clients: at most MAX_CLIENTS stay connected, the rest are closed
    idle = [connect(name) for _ in range(IDLE_CLIENTS)]
    during = proc_status(pid)
    assert during["threads"] <= start["threads"] + 1, (start, during)
    assert during["fds"] <= start["fds"] + MAX_CLIENTS + 1, (start, during)
    with_idle = status_latency(name)
    kept = malicious_clients(name)
    with_malicious = status_latency(name)
    for s in idle + kept:
        s.close()

    # the file descriptor limit: a few to spare, then hundreds of clients at once
    time.sleep(0.3)
    fds = proc_status(pid)["fds"]
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (fds + 8, hard))
    try:
        crowd = [connect(name, blocking=False) for _ in range(500)]
        time.sleep(0.5)
        assert proc_status(pid)["fds"] <= fds + 8
        at_limit = status_latency(name)  # an idle client makes room
        for s in crowd:
            s.close()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    time.sleep(0.3)
    after = status_latency(name)
    ctl_started = time.monotonic()
    assert ctl_status(name)["state"] == "running"
    return {"start": start, "during": during, "end": proc_status(pid),
            "ms": {"with idle": with_idle * 1e3, "with malicious": with_malicious * 1e3,
                   "at the fd limit": at_limit * 1e3, "after": after * 1e3},
            "hvf ctl status s": time.monotonic() - ctl_started}


def test_thousands_of_clients_and_the_fd_limit(guests: dict[str, Path], tmp_path: Path,
                                               many_fds: None) -> None:
    name = "ctlstress"
    with counter_vm(guests, tmp_path, name) as vm:
        for _ in range(3):
            status_latency(name)
        measured = stress(name, vm.pid)
    print(f"\n{measured}")
    start, during, end = measured["start"], measured["during"], measured["end"]
    assert max(measured["ms"].values()) < 1000, measured
    assert end["threads"] <= start["threads"] + 1 and end["fds"] <= start["fds"] + 2, measured
    # idle clients cost nothing; what the others left is the allocator's high-water mark
    # (repeated rounds level off there: no leak)
    assert during["rss_kib"] <= start["rss_kib"] + 1024, measured
    assert end["rss_kib"] <= start["rss_kib"] + 4096, measured
    stderr = (tmp_path / f"{name}.stderr").read_text()
    assert "Traceback" not in stderr, stderr
    assert "control socket: Too many open files; closing idle clients" in stderr, stderr


@pytest.mark.parametrize("command", ["checkpoint", "suspend"])
def test_a_save_whose_client_leaves_is_finished(guests: dict[str, Path], tmp_path: Path,
                                                command: str) -> None:
    name = f"leave{command}"
    snap = tmp_path / "snap"
    with counter_vm(guests, tmp_path, name):
        with connect(name) as s:
            assert b'"hvf"' in read_line(s)
            s.sendall(json.dumps({"id": 1, "command": command,
                                  "args": {"path": str(snap), "progress": True}}).encode()
                      + b"\n")
        # gone before the first progress report
        stderr_path = tmp_path / f"{name}.stderr"
        deadline = time.monotonic() + 60
        while "after its client disconnected" not in stderr_path.read_text():
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
        stderr = stderr_path.read_text()
        assert f"'{command}' finished after its client disconnected" in stderr, stderr
        state, ram = SnapshotStore(snap).load()
        assert state.machine["memory_size"] == ram.stat().st_size
        expected = "paused" if command == "suspend" else "running"
        assert ctl_status(name)["state"] == expected
