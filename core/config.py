# SPDX-License-Identifier: BSD-2-Clause
"""The configuration tree, with bhyve's node names (bhyve_config(5)).

Every source of configuration (command-line options, ``-o key=value``, ``-k`` files in
bhyve's ``key=value`` form or as TOML) writes dotted keys into one tree of strings, in
order, so a later setting overrides an earlier one: ``pci.0.31.0.device=lpc``,
``lpc.com1.path=stdio``, ``memory.size=512M``, ``cpus=2``, ``name=vm0``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from hvf.errors import ConfigError

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}

#: Values set before any option is parsed (bhyve's defaults; ``cpus`` has none, so that
#: a topology alone gives the count).
DEFAULTS = {"memory.size": "256M"}
#: The most a ``-k`` file may hold.
MAX_CONFIG_FILE = 1 << 20

#: The variables the core reads, or bhyve_config(5) defines (those the command line
#: sets), as patterns: ``*`` stands for one name, a trailing ``**`` for a subtree.
#: Plugins add theirs through ``hvf_config_keys``; a configured device's subtree (see
#: :func:`unknown_keys`) is the device's own.
CORE_KEYS = (
    "name", "cpus", "sockets", "cores", "threads", "uuid", "keyboard.layout",
    "memory.size", "memory.wired", "memory.guest_in_core", "memory.shared",
    "acpi_tables", "destroy_on_poweroff", "virtio_msix", "config.dump", "config.strict",
    "x86.mptable", "x86.x2apic", "x86.strictio", "x86.strictmsr", "x86.vmexit_on_hlt",
    "x86.vmexit_on_pause", "x86.emulate", "vcpu.*.cpuset", "cpu.model", "cpu.features",
    "gdb.address", "gdb.port", "gdb.wait", "rtc.use_localtime",
    "bios.**", "system.**", "board.**", "chassis.**",
    "boot.kernel", "boot.initrd", "boot.append", "pci.enable_bars",
    "lpc.bootvars", "lpc.pcireg.**",
)


class Config:
    """A tree of string values addressed by dotted keys."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._root: dict[str, Any] = {}
        for key, value in (values or {}).items():
            self.set(key, value)

    def set(self, key: str, value: str) -> None:
        """Set ``key`` to ``value``; a key naming an existing subtree is refused."""
        if not _KEY_RE.match(key):
            raise ConfigError(f"invalid configuration variable name '{key}'")
        *path, leaf = key.split(".")
        node = self._root
        for i, part in enumerate(path):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"cannot set '{key}': '{'.'.join(path[: i + 1])}' is a value, not a node"
                )
            node = child
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"cannot set '{key}': it is a node holding other variables")
        node[leaf] = str(value)

    def _find(self, key: str) -> Any:
        node: Any = self._root
        for part in key.split(".") if key else ():
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def get(self, key: str, default: str | None = None) -> str | None:
        value = self._find(key)
        return value if isinstance(value, str) else default

    def node(self, key: str) -> dict[str, Any]:
        """The subtree at ``key`` as nested dicts (empty when absent; ``""``: the root)."""
        value = self._find(key)
        return value if isinstance(value, dict) else {}

    def get_bool(self, key: str, default: bool = False) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ConfigError(f"invalid boolean value '{value}' for '{key}'")

    def get_int(self, key: str, default: int) -> int:
        value = self.get(key)
        if value is None:
            return default
        try:
            return int(value, 0)
        except ValueError:
            raise ConfigError(f"invalid integer value '{value}' for '{key}'") from None

    def items(self) -> Iterator[tuple[str, str]]:
        """Every ``(key, value)`` leaf, in sorted order."""

        def walk(prefix: str, node: dict[str, Any]) -> Iterator[tuple[str, str]]:
            for name in sorted(node, key=_natural):
                key = f"{prefix}{name}"
                if isinstance(node[name], dict):
                    yield from walk(key + ".", node[name])
                else:
                    yield key, node[name]

        return walk("", self._root)

    def dump(self) -> str:
        return "".join(f"{k}={v}\n" for k, v in self.items())

    def as_dict(self) -> dict[str, str]:
        return dict(self.items())

    def load_file(self, path: str) -> None:
        """Load a ``-k`` file: TOML when it ends in ``.toml``, else bhyve's key=value lines."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CONFIG_FILE + 1)
        except OSError:
            raise ConfigError(f"Failed to open configuration file {path}") from None
        if len(data) > MAX_CONFIG_FILE:
            raise ConfigError(f"-k {path}: larger than {MAX_CONFIG_FILE >> 20} MiB, so not a "
                              "configuration file")
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise ConfigError(f"-k {path}: not UTF-8 text (byte {data[e.start]:#04x} at "
                              f"offset {e.start})") from None
        if path.endswith(".toml"):
            self._load_toml(path, text)
        else:
            self._load_lines(path, text)

    def _load_toml(self, path: str, text: str) -> None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None

        def walk(prefix: str, table: dict[str, Any]) -> None:
            for name, value in table.items():
                key = f"{prefix}{name}"
                if isinstance(value, dict):
                    walk(key + ".", value)
                elif isinstance(value, bool):
                    self.set(key, "true" if value else "false")
                elif isinstance(value, (int, float, str)):
                    self.set(key, str(value))
                else:
                    raise ConfigError(
                        f"{path}: '{key}' must be a string, number or boolean, "
                        f"not {type(value).__name__}"
                    )

        walk("", data)

    def _load_lines(self, path: str, text: str) -> None:
        for n, line in enumerate(text.splitlines(), 1):
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key or " " in line:
                raise ConfigError(f"{path} line {n}: invalid config option '{line}'")
            self.set(key, value)


def unknown_keys(config: Config, patterns: Iterable[str], device_nodes: Iterable[str]) -> \
        Iterator[tuple[str, str | None]]:
    """Each key of ``config`` that no pattern (see :data:`CORE_KEYS`) matches and that
    is not one of ``device_nodes`` or inside one (a device checks its own options), with
    the known name it most resembles, or None."""
    compiled = [_pattern(p) for p in patterns]
    names = [p for p in patterns if "*" not in p]
    nodes = set(device_nodes)
    inside = tuple(f"{node}." for node in nodes)
    for key, _value in config.items():
        if key in nodes or key.startswith(inside) or any(p.fullmatch(key) for p in compiled):
            continue
        import difflib

        close = difflib.get_close_matches(key, names, n=1)
        yield key, close[0] if close else None


def _pattern(pattern: str) -> re.Pattern[str]:
    parts = [r"[^.]+" if part == "*" else re.escape(part) for part in pattern.split(".")]
    text = r"\.".join(parts)
    return re.compile(text.replace(re.escape("**"), r"[^.]+(\.[^.]+)*"))


@attrs.frozen
class ConfigView:
    """A read-only view of the subtree at ``key`` of a :class:`Config`, with keys relative
    to it: ``key=""`` is the whole tree, ``None`` an empty subtree."""

    _config: Config
    key: str | None

    def _full(self, key: str) -> str:
        return ".".join(part for part in (self.key, key) if part)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value at ``key``, or ``default``."""
        return default if self.key is None else self._config.get(self._full(key), default)

    def get_int(self, key: str, default: int) -> int:
        """The integer at ``key`` (``0x`` and other prefixes as Python reads them)."""
        return default if self.key is None else self._config.get_int(self._full(key), default)

    def get_bool(self, key: str, default: bool = False) -> bool:
        """The boolean at ``key`` (true/on/yes/1 or false/off/no/0)."""
        return default if self.key is None else self._config.get_bool(self._full(key), default)

    def node(self, key: str = "") -> dict[str, Any]:
        """A copy of the subtree at ``key`` (the view's own by default), as nested dicts."""
        return {} if self.key is None else copy.deepcopy(self._config.node(self._full(key)))


def _natural(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)
