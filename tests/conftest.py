# SPDX-License-Identifier: BSD-2-Clause
"""Shared fixtures: KVM availability, the test guests, running hvf as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

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
