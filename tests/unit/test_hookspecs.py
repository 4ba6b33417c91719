# SPDX-License-Identifier: BSD-2-Clause
"""Every hook is prefixed, documented, and every argument is described."""

from __future__ import annotations

import inspect

import pytest

from hvf import hookspecs
from hvf.cli import parse_args
from hvf.errors import ConfigError, PluginError, UsageError
from hvf.pluginmanager import Plugins

SPECS = [(n, f) for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("hvf_")]


def test_all_hooks_prefixed() -> None:
    names = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if f.__module__ == hookspecs.__name__]
    assert names and all(n.startswith("hvf_") for n in names)


@pytest.mark.parametrize(("name", "spec"), SPECS, ids=[n for n, _ in SPECS])
def test_hook_documented_with_every_argument(name: str, spec: object) -> None:
    doc = inspect.getdoc(spec) or ""
    assert doc, name
    for arg in inspect.signature(spec).parameters:  # type: ignore[arg-type]
        assert f":param {arg}:" in doc, f"{name}: argument '{arg}' is not documented"


def test_builtin_plugins_come_through_entry_points() -> None:
    plugins = Plugins()
    assert {"pci", "lpc"} <= {name for name, _ in plugins.pm.list_name_plugin()}
    assert "hostbridge" in plugins.pci_devices and "pc-testdev" in plugins.lpc_devices
    assert plugins.pci_devices.get("LPC").plugin == "lpc"


def test_duplicate_name_names_both_plugins() -> None:
    import hvf

    class Clash:
        @hvf.hookimpl
        def hvf_register_pci_devices(self, registry: object) -> None:
            registry.add("hostbridge", object)  # type: ignore[attr-defined]

    plugins = Plugins(extra=(Clash(),))
    with pytest.raises(PluginError, match="PCI device 'hostbridge' registered by plugin 'Clash' "
                                          "is already provided by plugin 'pci'"):
        _ = plugins.pci_devices


def test_a_disabled_bus_plugin_leaves_its_registries_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVF_DISABLE_PLUGINS", "pci")
    plugins = Plugins()
    assert plugins.pci_devices.names() == [] and plugins.lpc_devices.names() == []
    assert plugins.pci_devices.unavailable == "the 'pci' plugin is disabled by HVF_DISABLE_PLUGINS"
    assert plugins.lpc_devices.unavailable == plugins.pci_devices.unavailable
    with pytest.raises(ConfigError, match="no PCI devices: the 'pci' plugin is disabled"):
        parse_args(["-s", "0,hostbridge", "vm"], plugins)
    with pytest.raises(UsageError, match="no LPC devices: the 'pci' plugin is disabled"):
        parse_args(["-l", "com1,stdio", "vm"], plugins)


def test_com_ports_come_from_the_uart_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"com1", "com4", "pc-testdev"} <= set(Plugins().lpc_devices.names())
    assert Plugins().lpc_devices.get("com1").plugin == "uart"  # type: ignore[union-attr]
    monkeypatch.setenv("HVF_DISABLE_PLUGINS", "uart")
    names = set(Plugins().lpc_devices.names())
    assert "pc-testdev" in names and "com1" not in names
