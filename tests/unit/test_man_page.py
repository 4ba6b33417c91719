# SPDX-License-Identifier: BSD-2-Clause
"""hvf(8): it renders without warnings, documents every option, and installs where
man(1) looks for it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from hvf import cli

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "man" / "hvf.8"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed here")
    return path


def test_groff_renders_it_without_warnings() -> None:
    r = subprocess.run([_tool("groff"), "-mandoc", "-Tutf8", "-ww", "-z", str(PAGE)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")


def test_man_renders_it_without_warnings() -> None:
    r = subprocess.run([_tool("man"), "-l", str(PAGE)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_STDERR": "1"})
    assert (r.returncode, r.stderr) == (0, "")
    assert "hvf — run a guest operating system on Linux KVM" in r.stdout
    assert "EXIT STATUS" in r.stdout


def test_every_option_has_an_entry() -> None:
    source = PAGE.read_text()
    entries = set(re.findall(r"^\.It Fl (\S+)", source, re.MULTILINE))
    letters = set(cli.SHORT_OPTS.replace(":", ""))
    longs = {f"-{o.rstrip('=')}" for o in cli.LONG_OPTS if o != "help"}
    assert letters | longs <= entries, sorted((letters | longs) - entries)


def test_installed_where_man_finds_it(tmp_path: Path) -> None:
    """pip puts the data file under PREFIX/share/man/man8; with PREFIX/bin on PATH (where
    the hvf script goes), ``man hvf`` finds it."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert data["data-files"]["share/man/man8"] == ["man/hvf.8"]
    (tmp_path / "bin").mkdir()
    (tmp_path / "share" / "man" / "man8").mkdir(parents=True)
    shutil.copy(PAGE, tmp_path / "share" / "man" / "man8")
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    r = subprocess.run([_tool("man"), "-w", "hvf"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.stdout.strip() == str(tmp_path / "share" / "man" / "man8" / "hvf.8"), r.stderr
