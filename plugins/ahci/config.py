# SPDX-License-Identifier: BSD-2-Clause
"""The AHCI controller's configuration, as bhyve spells it.

Command line: ``-s S,ahci,hd:PATH[,OPTION...],cd:PATH[,OPTION...]...`` makes ports 0,
1, 2... in order (a port's options run until the next ``hd:`` or ``cd:``);
``-s S,ahci-hd,PATH[,OPTION...]`` and ``-s S,ahci-cd,PATH[,OPTION...]`` make port 0.
The configuration tree holds each port under ``pci.B.S.F.port.N``: ``type`` (``hd`` or
``cd``), ``path``, the block options (``ro``, ``nocache``, ``direct``/``sync``,
``nodelete``, ``sectorsize``, ``aio``; a CD is always read-only), and ``ser`` (at most 20
characters), ``model`` (40), ``rev`` (8), ``nmrr`` (the nominal media rotation rate: 1
for a solid-state disk) and ``bootindex``. An ``ahci-hd``/``ahci-cd`` node may also
hold port 0's settings directly (``pci.B.S.F.path``). Unknown or malformed settings
are refused naming the port and the setting.
"""

from __future__ import annotations

from typing import Any

import attrs

from hvf.bootorder import parse_bootindex
from hvf.config import Config
from hvf.errors import ConfigError
from hvf.plugins.ahci.spec import MAX_PORTS
from hvf.plugins.block.options import IMAGE_KEYS, ImageOptions, default_serial, legacy_config

HD, CD = "hd", "cd"
BLOCK_KEYS = IMAGE_KEYS | {"path"}
PORT_KEYS = BLOCK_KEYS | {"type", "ser", "model", "rev", "nmrr", "bootindex"}
DEFAULT_MODEL = {HD: "HVF SATA DISK", CD: "HVF SATA DVD ROM"}
DEFAULT_REVISION = "001"
#: The most characters of each identity string (IDENTIFY's fields).
LIMITS = {"ser": 20, "model": 40, "rev": 8}


@attrs.frozen
class PortConfig:
    """One port: what is behind it and how it presents itself."""

    index: int
    kind: str
    path: str
    options: ImageOptions
    serial: str
    model: str
    revision: str
    rotation: int
    bootindex: int | None


def _port_values(conf: list[str], emulation: str, kind: str, index: int) -> dict[str, str]:
    values = {"type": kind, **legacy_config(conf, emulation)}
    return {f"port.{index}.{key}": value for key, value in values.items()}


def parse_ahci(conf: list[str]) -> dict[str, str]:
    """``hd:PATH[,OPTION...],cd:PATH[,OPTION...]...`` as ``port.N.*`` values."""
    ports: list[tuple[str, list[str]]] = []
    for token in conf:
        kind, sep, rest = token.partition(":")
        if sep and kind in (HD, CD):
            ports.append((kind, [rest]))
        elif not ports:
            raise ConfigError(f'ahci: missing or invalid type for port 0: "{token}" '
                              f"(hd:PATH or cd:PATH)")
        else:
            ports[-1][1].append(token)
    if len(ports) > MAX_PORTS:
        raise ConfigError(f"ahci: {len(ports)} ports given, at most {MAX_PORTS}")
    values: dict[str, str] = {}
    for index, (kind, port_conf) in enumerate(ports):
        values.update(_port_values(port_conf, "ahci", kind, index))
    return values


def parse_hd(conf: list[str]) -> dict[str, str]:
    """``PATH[,OPTION...]`` of ``ahci-hd``: port 0, a disk."""
    return _port_values(conf, "ahci-hd", HD, 0)


def parse_cd(conf: list[str]) -> dict[str, str]:
    """``PATH[,OPTION...]`` of ``ahci-cd``: port 0, a CD-ROM."""
    return _port_values(conf, "ahci-cd", CD, 0)


def _text(values: Config, key: str, default: str, where: str) -> str:
    text = values.get(key, default) or ""
    if len(text) > LIMITS[key] or not text.isascii() or not text.isprintable():
        raise ConfigError(f"{where}: {key}= takes at most {LIMITS[key]} printable ASCII "
                          f"characters, not '{text}'")
    return text


def _rotation(values: Config, where: str) -> int:
    rate = values.get_int("nmrr", 0)
    if rate not in (0, 1) and not 0x401 <= rate <= 0xFFFE:
        raise ConfigError(f"{where}: nmrr={rate} is not a rotation rate (0: not reported, "
                          f"1: solid state, 1025-65534: revolutions per minute)")
    return rate


def port_config(index: int, node: dict[str, Any], where: str,
                default_kind: str | None = None) -> PortConfig:
    """Port ``index`` from its configuration ``node``; ``ConfigError`` names the problem."""
    where = f"{where} port {index}"
    if any(isinstance(v, dict) for v in node.values()):
        raise ConfigError(f"{where}: unexpected configuration below it")
    for key in node:
        if key not in PORT_KEYS:
            raise ConfigError(f"{where}: unknown option '{key}'")
    values = Config({k: v for k, v in node.items() if isinstance(v, str)})
    kind = values.get("type", default_kind)
    if kind not in (HD, CD):
        raise ConfigError(f"{where}: type '{kind}' is not hd or cd" if kind else
                          f"{where}: no type (hd or cd)")
    path = values.get("path")
    if not path:
        raise ConfigError(f"{where}: no image given ('path')")
    options = ImageOptions.from_config(values)
    if kind == CD:
        if options.sectorsize is not None:
            raise ConfigError(f"{where}: sectorsize does not apply to a CD (2048-byte blocks)")
        options = attrs.evolve(options, readonly=True)
    return PortConfig(
        index, kind, path, options,
        serial=_text(values, "ser", default_serial(path), where),
        model=_text(values, "model", DEFAULT_MODEL[kind], where),
        revision=_text(values, "rev", DEFAULT_REVISION, where),
        rotation=_rotation(values, where),
        bootindex=parse_bootindex(values.get("bootindex"), where))


def ports_config(config: dict[str, Any], where: str, emulation: str) -> list[PortConfig]:
    """Every port of a controller's configuration node, by number."""
    ports = config.get("port", {})
    if not isinstance(ports, dict):
        raise ConfigError(f"{where}: 'port' must hold the ports (port.N.path, ...)")
    default_kind = {"ahci-hd": HD, "ahci-cd": CD}.get(emulation)
    direct = {k: v for k, v in config.items() if k in PORT_KEYS}
    if direct:
        if default_kind is None or "0" in ports:
            raise ConfigError(f"{where}: '{sorted(direct)[0]}' belongs under a port "
                              f"(port.N.{sorted(direct)[0]})")
        ports = {**ports, "0": direct}
    for key in config:
        if key not in ("device", "port") and key not in PORT_KEYS:
            raise ConfigError(f"{where}: unknown option '{key}'")
    result = []
    for key, node in sorted(ports.items(), key=lambda item: (len(item[0]), item[0])):
        if not key.isdigit() or int(key) >= MAX_PORTS or not isinstance(node, dict):
            raise ConfigError(f"{where}: 'port.{key}' is not a port (0 to {MAX_PORTS - 1})")
        result.append(port_config(int(key), node, where, default_kind if key == "0" else None))
    return result
