# SPDX-License-Identifier: BSD-2-Clause
"""Plugin discovery: the ``hvf`` entry-point group, built-ins included.

Entry points are read straight from each distribution's ``entry_points.txt`` on
``sys.path`` (:func:`entry_points`), as :func:`importlib.metadata.entry_points`
finds them but without loading its machinery or reading anything else of any
distribution: discovery costs a directory listing per path entry, not a tenth of hvf's
start-up. ``HVF_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name before they
load.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import attrs
import pluggy

from hvf import hookspecs
from hvf.errors import PluginError
from hvf.registry import (
    F,
    ConsoleBackendFactory,
    CtlCommands,
    LpcDeviceFactory,
    PciDeviceFactory,
    Registry,
    SnapshotStoreFactory,
)

ENTRY_POINT_GROUP = "hvf"
#: The plugins that provide the PCI bus and the LPC bus behind it.
PCI_PLUGIN, LPC_PLUGIN = "pci", "lpc"
_METADATA_DIRS = (".dist-info", ".egg-info")


@attrs.frozen
class EntryPoint:
    """``name = module[:attr]`` of distribution ``dist``."""

    name: str
    value: str
    dist: str

    def load(self) -> object:
        module, _, attr = self.value.partition("[")[0].partition(":")
        target: object = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            target = getattr(target, part)
        return target


def entry_points(group: str = ENTRY_POINT_GROUP) -> list[EntryPoint]:
    """The entry points of ``group`` that the distributions on ``sys.path`` declare;
    of several distributions of one name, the first on the path counts (as for
    :mod:`importlib.metadata`). Zipped eggs are not searched."""
    seen: set[str] = set()
    found = []
    for path in sys.path:
        try:
            names = sorted(os.listdir(path or "."))
        except OSError:
            continue
        for entry in names:
            if not entry.endswith(_METADATA_DIRS):
                continue
            dist = entry.rsplit(".", 1)[0].partition("-")[0]
            key = dist.lower().replace("-", "_").replace(".", "_")
            if key in seen:
                continue
            seen.add(key)
            try:
                with open(os.path.join(path or ".", entry, "entry_points.txt")) as f:
                    text = f.read()
            except OSError:
                continue
            if f"[{group}]" in text:
                found += [EntryPoint(name, value, dist) for name, value in _section(text, group)]
    return found


def _section(text: str, group: str) -> Iterator[tuple[str, str]]:
    """The ``name = value`` lines of section ``[group]`` of an INI-style file."""
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == group and "=" in line:
            name, _, value = line.partition("=")
            yield name.strip(), value.strip()


def lazy(target: str) -> Callable[..., Any]:
    """``"module:name"`` as a callable that imports ``module`` when first called and
    calls its ``name``: plugins register factories and option parsers this way, so a
    device's modules load only in a process that uses the device."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = name
    return call


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for name in filter(None, os.environ.get("HVF_DISABLE_PLUGINS", "").split(",")):
        pm.set_blocked(name.strip())
    for ep in entry_points():
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party plugin must name itself
            raise PluginError(
                f"plugin '{ep.name}' (from {ep.dist}) failed to load: {type(e).__name__}: {e}"
            ) from e
        try:
            pm.register(plugin, name=ep.name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin '{ep.name}' is invalid: {e}") from e


class Plugins:
    """The plugin manager plus the registries its plugins fill (a typed facade)."""

    def __init__(self, load_entry_points: bool = True, extra: tuple[object, ...] = ()) -> None:
        self.pm = pluggy.PluginManager("hvf")
        self.pm.add_hookspecs(hookspecs)
        from hvf.commands import CommandsPlugin
        from hvf.snapshot import CorePlugin

        self.pm.register(CorePlugin(), name="core")
        self.pm.register(CommandsPlugin(), name="core-commands")
        if load_entry_points:
            _load_entry_points(self.pm)
        for plugin in extra:
            self.pm.register(plugin, name=getattr(plugin, "__name__", type(plugin).__name__))
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise PluginError(str(e)) from e
        self.hook = self.pm.hook

    def _fill(self, registry: Registry[F], hook_name: str, arg: str,
              needs: tuple[str, ...] = ()) -> Registry[F]:
        """Let every plugin register into ``registry``; with a plugin it ``needs``
        (the bus) blocked or absent, it stays empty and says so."""
        missing = [name for name in needs if self.pm.get_plugin(name) is None]
        if missing:
            blocked = "disabled by HVF_DISABLE_PLUGINS" if self.pm.is_blocked(missing[0]) \
                else "not installed"
            registry.unavailable = f"the '{missing[0]}' plugin is {blocked}"
            return registry
        hook = getattr(self.hook, hook_name)
        for impl in hook.get_hookimpls():  # in registration order: built-ins first
            registry.current_plugin = impl.plugin_name
            impl.function(**{arg: registry})
        registry.current_plugin = ""
        return registry

    @cached_property
    def pci_devices(self) -> Registry[PciDeviceFactory]:
        return self._fill(Registry("PCI device"), "hvf_register_pci_devices", "registry",
                          needs=(PCI_PLUGIN,))

    @cached_property
    def lpc_devices(self) -> Registry[LpcDeviceFactory]:
        # the LPC bus hangs off the PCI bus: no LPC devices without both plugins
        return self._fill(Registry("LPC device"), "hvf_register_lpc_devices", "registry",
                          needs=(PCI_PLUGIN, LPC_PLUGIN))

    @cached_property
    def console_backends(self) -> Registry[ConsoleBackendFactory]:
        return self._fill(
            Registry("console backend"), "hvf_register_console_backends", "registry"
        )

    @cached_property
    def snapshot_backends(self) -> Registry[SnapshotStoreFactory]:
        return self._fill(
            Registry("snapshot backend"), "hvf_register_snapshot_backends", "registry"
        )

    @cached_property
    def ctl_commands(self) -> CtlCommands:
        registry = self._fill(CtlCommands(), "hvf_register_ctl_commands", "commands")
        assert isinstance(registry, CtlCommands)
        return registry
