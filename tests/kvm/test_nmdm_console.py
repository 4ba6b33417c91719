# SPDX-License-Identifier: BSD-2-Clause
"""bhyve's null-modem consoles on Linux: ``-l com2,/dev/nmdmNA`` makes a pty and the
link ``/dev/nmdmNB`` to it; a program on the B side talks to the guest (``com_echo``,
polled COM2), the link goes at exit, a pair in use is refused, stale links are
replaced. Pair numbers are unique to this test run, far above what anyone uses."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import BASE_ARGS, popen_hvf, run_hvf, stop

pytestmark = pytest.mark.kvm

EchoArgs = Callable[[str, int, str], list[str]]


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """A test-unique pair: (A path, B path, lock path); whatever is left is removed."""
    number = 900_000 + os.getpid() % 10_000 * 10 + len(request.node.name) % 10
    paths = tuple(f"/dev/nmdm{number}{suffix}" for suffix in ("A", "B", ".lock"))
    if not os.access("/dev", os.W_OK):
        pytest.skip("nmdm consoles are made in /dev, which this user cannot write")
    yield paths  # type: ignore[misc]
    for path in paths:
        if os.path.lexists(path):
            os.unlink(path)


@pytest.fixture
def echo_args(guests: dict[str, Path]) -> EchoArgs:
    """The command line of ``com_echo`` with COM2 on SPEC, echoing N bytes, VM NAME."""
    def args(spec: str, n: int, name: str) -> list[str]:
        return [*BASE_ARGS, "-l", f"com2,{spec}", "--kernel", str(guests["com_echo"]),
                "--append", f"n={n}", name]
    return args


def wait_ready(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline()
            assert line == b"ready\n", (line, proc.stderr.read() if proc.stderr else b"")
            return
    raise AssertionError("the guest did not get ready")


def read_exactly(fd: int, n: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < n and select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]:
        data += os.read(fd, n - len(data))
    return data


def test_a_program_on_the_b_side_talks_to_the_guest(pair: tuple[str, str, str],
                                                    echo_args: EchoArgs) -> None:
    a_side, b_side, lock = pair
    payload = b"null modem \x00\x7f\xff"
    proc = popen_hvf(echo_args(a_side, len(payload), "nmdm-echo"))
    try:
        wait_ready(proc)
        assert os.readlink(b_side).startswith("/dev/pts/")
        assert not os.path.lexists(a_side)  # hvf's own end has no name
        assert Path(lock).read_text() == f"{proc.pid}\n"
        fd = os.open(b_side, os.O_RDWR | os.O_NOCTTY)
        try:
            tty.setraw(fd)
            os.write(fd, payload)
            echoed = read_exactly(fd, len(payload), 20)
        finally:
            os.close(fd)
        assert proc.wait(30) == 1
        assert proc.stdout is not None and proc.stdout.read() == f"echoed {len(payload)}\n".encode()
    finally:
        stop(proc)
    assert echoed == payload
    assert not os.path.lexists(b_side) and not os.path.lexists(lock)


def test_a_pair_in_use_is_refused(pair: tuple[str, str, str],
                                  echo_args: EchoArgs) -> None:
    a_side, b_side, _lock = pair
    proc = popen_hvf(echo_args(a_side, 1, "nmdm-first"))
    try:
        wait_ready(proc)
        target = os.readlink(b_side)
        for spec in (a_side, b_side):
            r = run_hvf(echo_args(spec, 1, "nmdm-second"), timeout=60)
            assert r.returncode == 4
            pair_name = os.path.basename(a_side)[:-1]
            assert (f"the null-modem pair {pair_name} is in use by hvf process {proc.pid}"
                    in r.stderr), r.stderr
        assert os.readlink(b_side) == target  # the first one's link is untouched
    finally:
        stop(proc)


def test_links_left_by_a_killed_hvf_are_replaced(pair: tuple[str, str, str],
                                                 echo_args: EchoArgs) -> None:
    a_side, b_side, lock = pair
    proc = popen_hvf(echo_args(a_side, 1, "nmdm-killed"))
    try:
        wait_ready(proc)
    finally:
        stop(proc, signal.SIGKILL)
    assert os.path.islink(b_side) and os.path.exists(lock)  # left behind
    os.symlink("/dev/pts/nonexistent", a_side)  # and one more, as from an hvf on 0B
    proc = popen_hvf(echo_args(a_side, 1, "nmdm-after"))
    try:
        wait_ready(proc)
        live = os.readlink(b_side)
        assert os.path.exists(live) and not os.path.lexists(a_side)
    finally:
        stop(proc, signal.SIGTERM, timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not os.path.lexists(b_side) and not os.path.lexists(lock)  # gone on SIGTERM


def test_what_is_not_a_link_is_never_replaced(pair: tuple[str, str, str],
                                              echo_args: EchoArgs) -> None:
    a_side, b_side, lock = pair
    Path(b_side).write_text("someone's file\n")
    r = run_hvf(echo_args(a_side, 1, "nmdm-file"), timeout=60)
    assert r.returncode == 4
    assert f"{b_side} exists and is not a link that hvf made" in r.stderr, r.stderr
    assert Path(b_side).read_text() == "someone's file\n"
    assert not os.path.lexists(lock)
