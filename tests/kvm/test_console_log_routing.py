# SPDX-License-Identifier: BSD-2-Clause
"""hvf's log never lands in a guest's console on the same terminal: with a console on
stdio and stderr that terminal, "unhandled port" lines go to NAME.log in the runtime
directory (hvf says where, once); without a terminal they stay on stderr."""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_guest

pytestmark = pytest.mark.kvm

BASE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev")


def run_on_terminal(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run hvf with stdin, stdout and stderr on a new pty; its exit status and all that
    reached the terminal."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "hvf", *args],
                                stdin=slave, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError as e:  # EIO: every slave descriptor is closed
                    assert e.errno == errno.EIO
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        status = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return status, out.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.parametrize("consoles", [("-l", "debugcon,stdio"),
                                      ("-l", "com1,stdio", "-l", "debugcon,stdio")],
                         ids=["debugcon", "com1-and-debugcon"])
def test_unhandled_ports_go_to_the_log_file_not_the_console(
    guests: dict[str, Path], hvf_runtime_dir: Path, consoles: tuple[str, ...],
) -> None:
    log = hvf_runtime_dir / "onterm.log"
    status, terminal = run_on_terminal(
        [*BASE, *consoles, "--kernel", str(guests["strictio"]), "onterm"])
    assert status == 1, terminal
    assert "unhandled" not in terminal
    assert "read 1234 ff\nwrote 1234\n" in terminal  # the guest's output, unbroken
    assert terminal.count(f"log messages go to {log}") == 1
    text = log.read_text()
    assert "unhandled inb port 0x1234" in text and "unhandled outb port 0x1234" in text
    assert log.stat().st_mode & 0o777 == 0o600


def test_without_a_terminal_the_log_stays_on_stderr(
    guests: dict[str, Path], hvf_runtime_dir: Path,
) -> None:
    r = run_guest(guests["strictio"], "-l", "com1,stdio")
    assert r.stdout.splitlines() == ["read 1234 ff", "wrote 1234"]
    assert "unhandled inb port 0x1234" in r.stderr
    assert not (hvf_runtime_dir / "testvm.log").exists()
