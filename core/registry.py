# SPDX-License-Identifier: BSD-2-Clause
"""Name registries that plugins fill through the ``hvf_register_*`` hooks.

Each registry holds one kind of factory, with its own signature (the protocols
below): ``Registry[PciDeviceFactory]`` for ``-s`` emulations, and so on. A registry
whose bus plugin is disabled (``HVF_DISABLE_PLUGINS``) stays empty and says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import attrs

from hvf.errors import PluginError

if TYPE_CHECKING:
    from hvf.config import Config
    from hvf.console import ConsoleBackend
    from hvf.device import Device
    from hvf.vm import Machine


class PciDeviceFactory(Protocol):
    """Builds the device for one ``pci.B.S.F`` node (a ``PciDevice``)."""

    def __call__(self, *, vm: Machine, slot: tuple[int, int, int],
                 config: dict[str, Any]) -> Device: ...


class LpcDeviceFactory(Protocol):
    """Builds an LPC device from the configuration, or None when it is not wanted."""

    def __call__(self, *, vm: Machine, config: Config) -> Device | None: ...


class ConsoleBackendFactory(Protocol):
    """Makes the console backend for a SPEC, for the device named ``owner``."""

    def __call__(self, spec: str, owner: str) -> ConsoleBackend: ...


class SnapshotStoreFactory(Protocol):
    """Opens the snapshot at ``path`` (``save``, ``load``, ``open_ram``, ``verify``,
    ``describe``: see ``hvf.plugins.snapshot.store.SnapshotStore``)."""

    def __call__(self, path: Path) -> Any: ...


class CtlHandler(Protocol):
    """Runs an ``hvf ctl`` command inside the VM process; returns the JSON reply."""

    def __call__(self, *, vm: Machine, args: dict[str, Any]) -> dict[str, Any]: ...


F = TypeVar("F", bound=Callable[..., Any])


@attrs.frozen
class Entry(Generic[F]):
    """One registered name: what builds it, a line of help and the plugin behind it;
    ``shares_ram``: its back end, another process, maps guest RAM itself."""

    name: str
    factory: F
    help: str = ""
    plugin: str = ""
    parse: Callable[[list[str]], dict[str, str]] | None = None
    shares_ram: bool = False


class Registry(Generic[F]):
    """Names of one kind (PCI devices, LPC devices, console backends, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}
        self.current_plugin = ""
        #: Why nothing can be registered here (its bus plugin is disabled), or None.
        self.unavailable: str | None = None

    def add(
        self,
        name: str,
        factory: F,
        *,
        help: str = "",
        parse: Callable[[list[str]], dict[str, str]] | None = None,
        shares_ram: bool = False,
    ) -> None:
        """Register ``name``; a name already taken by another plugin is an error.
        ``shares_ram`` (a PCI device whose back end, another process, maps guest RAM,
        as vhost-user's): a machine with one gets its RAM as a memfd (``memory.shared``)."""
        key = name.lower()
        if key in self._entries:
            other = self._entries[key].plugin
            raise PluginError(
                f"{self.kind} '{name}' registered by plugin '{self.current_plugin}' "
                f"is already provided by plugin '{other}'"
            )
        self._entries[key] = Entry(name, factory, help, self.current_plugin, parse, shares_ram)

    def get(self, name: str) -> Entry[F] | None:
        return self._entries.get(name.lower())

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def __iter__(self) -> Iterator[Entry[F]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return [e.name for e in self]


class CtlCommands(Registry[CtlHandler]):
    """``hvf ctl`` commands: name → handler(vm=, args=) run inside the VM process."""

    def __init__(self) -> None:
        super().__init__("ctl command")
