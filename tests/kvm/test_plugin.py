# SPDX-License-Identifier: BSD-2-Clause
"""A third-party plugin, installed from its own distribution, extends hvf."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import BASE_ARGS, run_guest, run_hvf

PLUGIN_DIST = Path(__file__).parent.parent / "plugin_dist"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose Python path holds the installed test plugin."""
    target = tmp_path_factory.mktemp("plugin")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(PLUGIN_DIST)],
        check=True, capture_output=True,
    )
    assert (target / "hvf_testplugin-1.0.dist-info" / "entry_points.txt").exists()
    return {**os.environ, "PYTHONPATH": str(target)}


def test_help_lists_the_plugin_device(plugin_env: dict[str, str]) -> None:
    before = run_hvf(["-s", "help"])
    after = run_hvf(["-s", "help"], env=plugin_env)
    assert "testdev" not in before.stdout
    assert "testdev" in after.stdout and after.returncode == 0
    for name in ("hostbridge", "lpc"):
        assert name in before.stdout


@pytest.mark.kvm
def test_guest_finds_and_drives_the_plugin_device(
    guests: dict[str, Path], plugin_env: dict[str, str]
) -> None:
    scan = run_guest(guests["pciscan"], "-s", "3,testdev", env=plugin_env)
    assert "pci 00:03.0 1dd1:0001 class ff0000" in scan.stdout, scan.stderr
    bars = scan.stdout.split("pci 00:03.0")[1].split("pci ")[0]
    assert "bar 0 orig 00002021 mask fffffff1" in bars  # 16 I/O ports, above pc-testdev's
    assert "bar 1 orig c0000000 mask fffff000" in bars  # 4 KiB of 32-bit memory

    move = run_guest(guests["barmove"], "-s", "3,testdev", env=plugin_env)
    assert move.returncode == 1, move.stderr
    assert move.stdout.splitlines() == [
        "io 2020 21465648",
        "io moved 2120 new 21465648 old ffffffff",
        "mem c0000000 21465648",
        "mem moved c0100000 new 21465648 old ffffffff",
        "io decode off ffffffff",
    ]


def test_the_plugins_own_tests_pass(plugin_env: dict[str, str], tmp_path: Path) -> None:
    """The distribution's tests (tests/plugin_dist/tests) use only hvf's public API and
    hvf.testing, whose fixtures pytest loads through hvf's ``pytest11`` entry point."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
         "--basetemp", str(tmp_path / "tmp"), str(PLUGIN_DIST / "tests")],
        cwd=tmp_path, env=plugin_env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    loaded = rf"^plugins: .*\bhvf-{re.escape(version('hvf'))}\b"  # by its entry point
    assert re.search(loaded, r.stdout, re.M), r.stdout
    assert re.search(r"^=+ \d+ passed", r.stdout.splitlines()[-1]), r.stdout


def test_disabling_a_plugin(plugin_env: dict[str, str]) -> None:
    r = run_hvf(["-s", "help"], env={**plugin_env, "HVF_DISABLE_PLUGINS": "testdev"})
    assert "testdev" not in r.stdout
    assert BASE_ARGS  # the base machine does not depend on the plugin
