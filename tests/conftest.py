# SPDX-License-Identifier: BSD-2-Clause
"""Shared fixtures and helpers: KVM availability, the test guests, running hvf as a user
would, waiting on it and stopping it."""

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

import pytest

from hvf.kvm import is_pvm, kvm_unavailable_reason

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS / "guests"))

from build import GUESTS, build_guest  # noqa: E402

#: The machine most test kernels run on: host bridge, LPC, pc-testdev, debug console.
BASE_ARGS = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev", "-l", "debugcon,stdio")

PVM = is_pvm()
PVM_REASON = "this host's /dev/kvm is kvm_pvm (no hardware virtualization)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private control-socket directory, so tests never meet other VMs' sockets."""
    path = tmp_path_factory.mktemp("run")
    os.environ["HVF_RUNTIME_DIR"] = str(path)
    return path


class GuestKernels(dict):  # type: ignore[type-arg]
    """Test kernels by name, each assembled and linked the first time it is asked for."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def __missing__(self, name: str) -> Path:
        assert name in GUESTS, f"unknown test guest {name}"
        self[name] = path = build_guest(name, self.out)
        return path


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test kernels under tests/guests, built on first use."""
    return GuestKernels(tmp_path_factory.mktemp("guests"))


def run_hvf(
    args: Sequence[str], *, timeout: float = 120, env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hvf ARGS`` to completion, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "hvf", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input.decode() if input is not None else None,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def run_guest(
    guest: Path, *extra: str, append: str | None = None, timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Boot a test kernel on the base machine plus ``extra`` options."""
    args = [*BASE_ARGS, *extra, "--kernel", str(guest)]
    if append is not None:
        args += ["--append", append]
    return run_hvf([*args, "testvm"], timeout=timeout, env=env)


def popen_hvf(args: Iterable[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``python -m hvf ARGS``: no stdin, stdout and stderr piped, unless ``popen``
    says otherwise."""
    kw: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                          "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, "-m", "hvf", *args], **kw)


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
    """A new pty, its master raw so bytes pass unchanged: (master, slave, slave path)."""
    master, slave = os.openpty()
    try:
        tty.setraw(master)
        yield master, slave, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)
