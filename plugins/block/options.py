# SPDX-License-Identifier: BSD-2-Clause
"""A disk's back-end options, as bhyve's ``block_if`` reads them.

On the command line a disk is ``PATH[,OPTION...]`` after the emulation name
(``-s 4,virtio-blk,/vm/disk.img,nocache,sectorsize=512/4096``); :func:`legacy_config`
turns that list into configuration values (``path``, bare options as ``true``) the way
bhyve's ``blockif_legacy_config`` does, and :meth:`ImageOptions.from_config` reads the
values every disk front end shares:

``ro``
    open read-only; writes fail with ``EROFS`` and the image may be shared with other
    read-only users
``nocache``
    ``O_DIRECT``: bypass the host's page cache
``direct`` (or ``sync``)
    ``O_SYNC``: every write is on stable storage before it completes
``nodelete``
    refuse discard (TRIM) requests, so the image never gets holes from the guest
``sectorsize=L[/P]``
    the logical and physical sector size the guest sees, powers of two with
    512 <= L <= P <= 64 KiB (default: the device's, or 512 and the file system's block
    size for a file)
``aio=threads|io_uring``
    the engine that moves the data, as QEMU's option: worker threads (the default) or
    an io_uring (:mod:`hvf.plugins.block.engine`)

Front-end options (a serial number, say) pass through :func:`legacy_config` untouched;
:func:`default_serial` is the serial a front end reports when none is given.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import attrs

from hvf.errors import ConfigError

MIN_SECTOR = 512
MAX_SECTOR = 64 * 1024
#: The block engines ``aio=`` names.
ENGINES = ("threads", "io_uring")
#: The configuration keys :meth:`ImageOptions.from_config` reads, which every disk
#: front end accepts.
IMAGE_KEYS = frozenset({"ro", "nocache", "direct", "sync", "nodelete", "sectorsize", "aio"})


class BoolConfig(Protocol):
    """What :meth:`ImageOptions.from_config` reads (a ``ConfigView`` or ``Config``)."""

    def get(self, key: str, default: str | None = None) -> str | None: ...

    def get_bool(self, key: str, default: bool = False) -> bool: ...


@attrs.frozen
class SectorSize:
    """The sector sizes a disk presents: ``logical`` is the unit of addressing and
    transfer, ``physical`` the unit the storage writes atomically (an alignment hint)."""

    logical: int
    physical: int

    def __str__(self) -> str:
        return f"{self.logical}/{self.physical}"


def _sector(text: str, spec: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if not MIN_SECTOR <= value <= MAX_SECTOR or value & (value - 1):
        raise ConfigError(f"invalid sector size '{spec}': each size must be a power of two "
                          f"from {MIN_SECTOR} to {MAX_SECTOR}")
    return value


def parse_sectorsize(spec: str) -> SectorSize:
    """``L`` or ``L/P`` (bhyve's ``sectorsize=``); the physical size defaults to the
    logical one and may not be smaller."""
    logical_text, sep, physical_text = spec.partition("/")
    logical = _sector(logical_text, spec)
    physical = _sector(physical_text, spec) if sep else logical
    if physical < logical:
        raise ConfigError(f"invalid sector size '{spec}': the physical sector size is "
                          f"smaller than the logical one")
    return SectorSize(logical, physical)


@attrs.frozen
class ImageOptions:
    """How to open a disk image; ``sectorsize`` None takes the image's own."""

    readonly: bool = False
    nocache: bool = False
    direct: bool = False
    nodelete: bool = False
    sectorsize: SectorSize | None = None
    aio: str = "threads"

    @classmethod
    def from_config(cls, config: BoolConfig) -> ImageOptions:
        """The options in a disk's configuration node (``ro``, ``nocache``, ``direct`` or
        ``sync``, ``nodelete``, ``sectorsize``, ``aio``)."""
        spec = config.get("sectorsize")
        aio = config.get("aio") or "threads"
        if aio not in ENGINES:
            raise ConfigError(f"invalid aio '{aio}': {' or '.join(ENGINES)}")
        return cls(
            readonly=config.get_bool("ro"),
            nocache=config.get_bool("nocache"),
            direct=config.get_bool("direct") or config.get_bool("sync"),
            nodelete=config.get_bool("nodelete"),
            sectorsize=parse_sectorsize(spec) if spec is not None else None,
            aio=aio,
        )


def legacy_config(conf: list[str], emulation: str) -> dict[str, str]:
    """``PATH[,KEY[=VALUE]...]`` (already split at commas) as configuration values:
    ``path``, then each ``KEY=VALUE``, a bare ``KEY`` as ``true``."""
    if not conf or not conf[0]:
        raise ConfigError(f"{emulation}: no disk image given (PATH[,OPTION...])")
    values = {"path": conf[0]}
    for option in conf[1:]:
        key, sep, value = option.partition("=")
        if not key or "." in key or (sep and not value):
            raise ConfigError(f"{emulation}: invalid option '{option}'")
        values[key] = value if sep else "true"
    return values


def default_serial(path: str) -> str:
    """A stable 20-character serial number for the image at ``path`` (as bhyve derives
    one from the path's MD5): ``HVF-`` and 16 hex digits, the same for every front end."""
    return "HVF-" + hashlib.blake2b(path.encode(), digest_size=8).hexdigest().upper()
