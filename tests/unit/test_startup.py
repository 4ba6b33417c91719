# SPDX-License-Identifier: BSD-2-Clause
"""Start-up: plugins are found without importlib.metadata, as it would find them, and
a machine's command line loads only what that machine uses (bench/startup times it)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvf.pluginmanager import EntryPoint, entry_points, lazy


@pytest.mark.parametrize("group", ["hvf", "pytest11", "console_scripts"])
def test_entry_points_are_those_importlib_metadata_finds(group: str) -> None:
    ours = [(ep.name, ep.value) for ep in entry_points(group)]
    theirs = [(ep.name, ep.value) for ep in importlib.metadata.entry_points(group=group)]
    assert sorted(ours) == sorted(theirs)
    if group == "hvf":
        assert ours == theirs  # the same order: plugins register in it
        assert {"pci", "lpc", "uart", "snapshot"} <= {name for name, _ in ours}


def _dist(where: Path, dirname: str, text: str | None) -> None:
    (where / dirname).mkdir(parents=True)
    if text is not None:
        (where / dirname / "entry_points.txt").write_text(text)


def test_each_distribution_counts_once_first_on_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _dist(first, "Some_Dist-1.0.dist-info",
          "# a comment\n[console_scripts]\nx = y:z\n\n[hvf]\n one = pkg.one \n"
          "two=pkg.two:plugin [extra]\n; another comment\n[other]\nthree = pkg.three\n")
    _dist(first, "nothing-2.0.dist-info", None)  # no entry points at all
    _dist(second, "some_dist.egg-info", "[hvf]\nshadowed = pkg.old\n")  # same name, later
    _dist(second, "later-0.1.dist-info", "[hvf]\nlate = pkg.late\n")
    (second / "plain.txt").write_text("")
    monkeypatch.setattr(sys, "path", [str(first), str(tmp_path / "missing"), str(second)])
    assert entry_points() == [EntryPoint("one", "pkg.one", "Some_Dist"),
                              EntryPoint("two", "pkg.two:plugin [extra]", "Some_Dist"),
                              EntryPoint("late", "pkg.late", "later")]
    assert [ep.name for ep in entry_points("other")] == ["three"]


def test_an_entry_point_loads_its_module_and_attribute() -> None:
    import os.path

    assert EntryPoint("j", "os.path:join", "d").load() is os.path.join
    assert EntryPoint("p", "os.path", "d").load() is os.path
    assert EntryPoint("x", "os.path:join [extra]", "d").load() is os.path.join


def test_lazy_imports_on_the_first_call() -> None:
    join = lazy("os.path:join")
    assert join("a", "b") == "a/b" and join.__name__ == "join"


#: Modules a machine without disks, network cards, -G or a TOML file never needs; the
#: process reports what it imported up to the machine's creation.
NOT_NEEDED = (
    "importlib.metadata", "email", "zipfile", "csv", "pycparser", "cffi.cparser", "tomllib",
    "difflib", "pytest", "_pytest", "hypothesis", "hvf.gdbstub",
    "datetime", "uuid", "hvf.plugins.block.uring",  # the RTC set, a UUID, aio=io_uring
    "hvf.plugins.ahci.factory", "hvf.plugins.ahci.config", "hvf.plugins.nvme.controller",
    "hvf.plugins.nvme.options", "hvf.plugins.virtio.blk", "hvf.plugins.virtio.vhost_user_blk",
    "hvf.plugins.snapshot.store", "hvf.plugins.snapshot.statefile",
    "hvf.plugins.lpc.bootrom", "hvf.smbios",
)
_PROBE = """
import json, sys
from hvf import preflight
from hvf.cli import parse_args
from hvf.pluginmanager import Plugins
plugins = Plugins()
config = parse_args(sys.argv[1:], plugins)
preflight.check(config, plugins)
import hvf.vm
before = set(sys.modules)
parse = plugins.pci_devices.get("ahci-hd").parse
parse(["/nonexistent.img"])
print(json.dumps({"modules": sorted(before), "after": sorted(set(sys.modules) - before)}))
"""


def test_a_plain_machine_loads_only_what_it_uses() -> None:
    args = ["-s", "0,hostbridge", "-s", "31,lpc", "-l", "com1,stdio", "-l", "pc-testdev",
            "-m", "64M", "--kernel", "/boot/kernel.elf", "vm"]
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    loaded = set(got["modules"])
    assert not [m for m in NOT_NEEDED if m in loaded or any(
        name.startswith(m + ".") for name in loaded)]
    assert {"hvf.plugins.pci", "hvf.plugins.lpc", "hvf.plugins.uart"} <= loaded
    # the registered parser is the AHCI module's, loaded on its first use
    assert "hvf.plugins.ahci.config" in got["after"]
