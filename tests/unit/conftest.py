# SPDX-License-Identifier: BSD-2-Clause
"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


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
