# SPDX-License-Identifier: BSD-2-Clause
"""Shared fixtures: KVM availability, the test guests, running hvf as a user would."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every test kernel under tests/guests, assembled and linked once per session."""
    out = tmp_path_factory.mktemp("guests")
    return {name: build_guest(name, out) for name in GUESTS}


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
