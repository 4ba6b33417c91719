# SPDX-License-Identifier: BSD-2-Clause
"""hvf's own test kernels, and the helpers every test module shares: running hvf as a
user would, waiting on it and stopping it come from :mod:`hvf.testing`, whose pytest
plugin (the ``kvm`` marker, the ``hvf_*`` fixtures) pytest loads through its entry
point."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvf.kvm import is_pvm
from hvf.testing import (  # noqa: F401  (re-exported to the test modules)
    BASE_ARGS,
    popen_hvf,
    raw_pty,
    run_guest,
    run_hvf,
    stop,
    wait_for_text,
)

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS / "guests"))

from build import GUESTS, build_guest  # noqa: E402

#: tests/unit/test_testing.py runs pytest on the hvf plugin.
pytest_plugins = ["pytester"]
#: The third-party plugin distribution has its own tests, run by tests/kvm/test_plugin.py.
collect_ignore = ["plugin_dist"]

PVM = is_pvm()
PVM_REASON = "this host's /dev/kvm is kvm_pvm (no hardware virtualization)"


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


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system that can do O_DIRECT (tmp_path, or /var/tmp)."""
    for base in (tmp_path, Path("/var/tmp")):
        where = base / "dio"
        where.mkdir(exist_ok=True)
        try:
            os.close(os.open(where / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
            yield where
            return
        except OSError:
            continue
        finally:
            shutil.rmtree(where)
    pytest.skip("no file system here can do O_DIRECT")
