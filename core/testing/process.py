# SPDX-License-Identifier: BSD-2-Clause
"""Running hvf as a user would (``python -m hvf``), waiting on it and stopping it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tty
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["BASE_ARGS", "popen_hvf", "raw_pty", "run_guest", "run_hvf", "stop",
           "wait_for_text"]

#: The machine a test guest runs on: host bridge, LPC, pc-testdev (a guest's write of
#: v to port 0xF4 exits with ``(v << 1) | 1``), the debug console (port 0x402) on stdout.
BASE_ARGS = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev", "-l", "debugcon,stdio")


def run_hvf(
    args: Sequence[str | os.PathLike[str]], *, timeout: float = 120,
    env: dict[str, str] | None = None, input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hvf ARGS`` to completion, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "hvf", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input.decode() if input is not None else None,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def run_guest(
    guest: os.PathLike[str] | str, *extra: str, append: str | None = None,
    timeout: float = 120, env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Boot the kernel ``guest`` on :data:`BASE_ARGS` plus ``extra`` options; its debug
    console is the result's ``stdout``."""
    args = [*BASE_ARGS, *extra, "--kernel", str(guest)]
    if append is not None:
        args += ["--append", append]
    return run_hvf([*args, "testvm"], timeout=timeout, env=env)


def popen_hvf(args: Iterable[str | os.PathLike[str]], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``python -m hvf ARGS``: no stdin, stdout and stderr piped, unless ``popen``
    says otherwise."""
    kw: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                          "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, "-m", "hvf", *map(str, args)], **kw)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL,
         timeout: float | None = None) -> None:
    """End ``proc`` with ``sig`` if it still runs, reap it and close its pipes."""
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def wait_for_text(path: Path, found: str, proc: subprocess.Popen[bytes], timeout: float,
                  *, regex: bool = False) -> str:
    """The text of ``path`` once it contains ``found`` (with ``regex``, once the multi-line
    regular expression ``found`` matches in it); fails if ``proc`` exits first or
    ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if (re.search(found, text, re.MULTILINE) if regex else found in text):
            return text
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"hvf exited with {proc.returncode} before {found!r} "
                                 f"appeared in {path}: {err}\ngot: {text[-3000:]!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{found!r} did not appear in {path} within {timeout} s; "
                                 f"got: {text[-3000:]!r}")
        time.sleep(0.02)


@contextmanager
def raw_pty() -> Iterator[tuple[int, int, str]]:
    """A new pty, its master raw so bytes pass unchanged: (master, slave, slave path);
    give hvf the path (``-l com1,PATH``)."""
    master, slave = os.openpty()
    try:
        tty.setraw(master)
        yield master, slave, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)
