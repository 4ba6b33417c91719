# SPDX-License-Identifier: BSD-2-Clause
"""The configuration tree and its file formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvf.config import Config
from hvf.errors import ConfigError


def test_set_get_and_override() -> None:
    c = Config({"memory.size": "256M"})
    c.set("memory.size", "1G")
    c.set("pci.0.31.0.device", "lpc")
    assert c.get("memory.size") == "1G"
    assert c.node("pci") == {"0": {"31": {"0": {"device": "lpc"}}}}
    assert c.get("pci.0.31") is None and c.get("absent", "d") == "d"


def test_value_and_node_clash() -> None:
    c = Config({"lpc.com1.path": "stdio"})
    with pytest.raises(ConfigError, match="node holding other variables"):
        c.set("lpc.com1", "x")
    with pytest.raises(ConfigError, match="is a value"):
        c.set("lpc.com1.path.more", "x")


def test_dump_is_sorted_naturally() -> None:
    c = Config({"pci.0.10.0.device": "b", "pci.0.2.0.device": "a", "cpus": "2"})
    assert c.dump() == "cpus=2\npci.0.2.0.device=a\npci.0.10.0.device=b\n"


@pytest.mark.parametrize(("text", "value"), [("on", True), ("YES", True), ("0", False), ("off", False)])
def test_booleans(text: str, value: bool) -> None:
    assert Config({"x": text}).get_bool("x") is value


def test_bad_boolean_and_integer_name_the_key() -> None:
    c = Config({"x86.strictio": "maybe", "cpus": "two"})
    with pytest.raises(ConfigError, match="'maybe' for 'x86.strictio'"):
        c.get_bool("x86.strictio")
    with pytest.raises(ConfigError, match="'two' for 'cpus'"):
        c.get_int("cpus", 1)


def test_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('name = "vm1"\ncpus = 2\n[memory]\nsize = "1G"\n[pci.0.31.0]\ndevice = "lpc"\n'
                 '[x86]\nstrictio = true\n')
    c = Config()
    c.load_file(str(f))
    assert c.as_dict() == {
        "cpus": "2", "memory.size": "1G", "name": "vm1", "pci.0.31.0.device": "lpc",
        "x86.strictio": "true",
    }


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("cpus = [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad.toml: 'cpus' must be a string"):
        Config().load_file(str(f))


def test_bhyve_key_value_file(tmp_path: Path) -> None:
    f = tmp_path / "vm.conf"
    f.write_text("# comment\n\nname=vm2\nlpc.com1.path=stdio\n")
    c = Config()
    c.load_file(str(f))
    assert c.get("lpc.com1.path") == "stdio" and c.get("name") == "vm2"
    f.write_text("name=vm2\nbad line\n")
    with pytest.raises(ConfigError, match="line 2: invalid config option 'bad line'"):
        Config().load_file(str(f))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="Failed to open configuration file /nonexistent"):
        Config().load_file("/nonexistent")
