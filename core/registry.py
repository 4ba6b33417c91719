# SPDX-License-Identifier: BSD-2-Clause
"""Name registries that plugins fill through the ``hvf_register_*`` hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs

from hvf.errors import PluginError


@attrs.frozen
class Entry:
    """One registered name: what builds it, a line of help and the plugin behind it."""

    name: str
    factory: Callable[..., Any]
    help: str = ""
    plugin: str = ""
    parse: Callable[[list[str]], dict[str, str]] | None = None


class Registry:
    """Names of one kind (PCI devices, LPC devices, console backends, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self.current_plugin = ""

    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        help: str = "",
        parse: Callable[[list[str]], dict[str, str]] | None = None,
    ) -> None:
        """Register ``name``; a name already taken by another plugin is an error."""
        key = name.lower()
        if key in self._entries:
            other = self._entries[key].plugin
            raise PluginError(
                f"{self.kind} '{name}' registered by plugin '{self.current_plugin}' "
                f"is already provided by plugin '{other}'"
            )
        self._entries[key] = Entry(name, factory, help, self.current_plugin, parse)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name.lower())

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return [e.name for e in self]


class CtlCommands(Registry):
    """``hvf ctl`` commands: name → handler(vm=, args=) run inside the VM process."""

    def __init__(self) -> None:
        super().__init__("ctl command")
