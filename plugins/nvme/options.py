# SPDX-License-Identifier: BSD-2-Clause
"""The ``nvme`` device's options, as bhyve's ``pci_nvme.c`` reads them.

``-s S,nvme,PATH[,maxq=N][,qsz=N][,ioslots=N][,sectsz=N][,ser=ID][,eui64=N]
[,dsm=auto|enable|disable]`` plus the block options every disk takes (``ro``,
``nocache``, ``direct``/``sync``, ``nodelete``, ``sectorsize``, ``aio``) and ``bootindex``;
configuration ``pci.B.S.F.path``, ``.maxq``, ... (bhyve_config(5)):

``maxq``
    I/O queue pairs the controller offers (1-16, default 16)
``qsz``
    the largest I/O queue, in entries (2-4096, default 2048)
``ioslots``
    I/O commands the controller runs at once (1-1024, default 8); more wait in
    their submission queues
``sectsz``
    the namespace's block size: 512, 4096 or 8192 (default: the image's)
``ser``
    the serial number, at most 20 printable ASCII characters (default
    ``NVME-<slot>-<function>``)
``eui64``
    the namespace's IEEE EUI-64 (default: the FreeBSD NVMe OUI and a CRC of the VM
    name and the slot)
``dsm``
    Dataset Management (deallocate): ``auto`` offers it when the image can discard
    (not ``ro``, not ``nodelete``), ``enable`` always, ``disable`` never
``bootindex``
    the controller's place in the firmware's boot order (:mod:`hvf.bootorder`)

A value that is not one of these is a :class:`~hvf.errors.ConfigError` naming the
option; so is an option the device does not know.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any

import attrs

from hvf.bootorder import parse_bootindex
from hvf.config import Config
from hvf.errors import ConfigError
from hvf.plugins.block.options import IMAGE_KEYS, ImageOptions, SectorSize, legacy_config

MAX_QUEUES = 16
MAX_QUEUE_ENTRIES = 4096
MAX_IOSLOTS = 1024
BLOCK_SIZES = (512, 4096, 8192)
SERIAL_BYTES = 20
#: The FreeBSD NVMe OUI bhyve puts in its EUI-64s.
OUI_FREEBSD_NVME = 0x589CFC
DSM_MODES = ("auto", "enable", "disable")

_KEYS = frozenset(("device", "path", "maxq", "qsz", "ioslots", "sectsz", "ser", "eui64",
                   "dsm", "bootindex", *IMAGE_KEYS))


@attrs.frozen
class NvmeOptions:
    """One controller's settings, checked."""

    path: str
    image: ImageOptions
    maxq: int = MAX_QUEUES
    qsz: int = 2048
    ioslots: int = 8
    serial: bytes = b""
    eui64: int = 0
    dsm: str = "auto"
    bootindex: int | None = None


def _number(values: Config, where: str, key: str, default: int, low: int, high: int) -> int:
    text = values.get(key)
    if text is None:
        return default
    try:
        value = int(text, 0)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError(f"{where}: invalid {key}='{text}': it must be a number from "
                          f"{low} to {high}")
    return value


def default_eui64(vm_name: str, slot: tuple[int, int, int]) -> int:
    """bhyve's scheme: the OUI, then a CRC-16 of the VM name and the slot, then NSID 1."""
    crc = binascii.crc_hqx(f"{vm_name}{slot[0]}{slot[1]}{slot[2]}".encode(), 0)
    return OUI_FREEBSD_NVME << 40 | crc << 16 | 1


def read_options(config: Mapping[str, Any], where: str, slot: tuple[int, int, int],
                 vm_name: str) -> NvmeOptions:
    """The options in a ``pci.B.S.F`` node; :class:`ConfigError` names a bad one."""
    unknown = sorted(k for k in config if k not in _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown option '{unknown[0]}'")
    values = Config({k: v for k, v in config.items() if isinstance(v, str)})
    path = values.get("path")
    if not path:
        raise ConfigError(f"{where}: no disk image given ('path')")
    image = ImageOptions.from_config(values)
    if (sectsz := values.get("sectsz")) is not None:
        if sectsz not in {str(size) for size in BLOCK_SIZES}:
            raise ConfigError(f"{where}: invalid sectsz='{sectsz}': it must be 512, 4096 "
                              f"or 8192")
        size = int(sectsz)
        physical = max(size, image.sectorsize.physical if image.sectorsize else size)
        image = attrs.evolve(image, sectorsize=SectorSize(size, physical))
    ser = values.get("ser")
    if ser is not None and (len(ser) > SERIAL_BYTES or not ser.isascii()
                            or not ser.isprintable()):
        raise ConfigError(f"{where}: ser= takes at most {SERIAL_BYTES} printable ASCII "
                          f"characters")
    serial = ser if ser is not None else f"NVME-{slot[1]}-{slot[2]}"
    dsm = values.get("dsm", "auto")
    if dsm not in DSM_MODES:
        raise ConfigError(f"{where}: invalid dsm='{dsm}': it must be auto, enable or disable")
    eui64 = _number(values, where, "eui64", default_eui64(vm_name, slot), 0, (1 << 64) - 1)
    return NvmeOptions(
        path=path, image=image, dsm=dsm, eui64=eui64,
        bootindex=parse_bootindex(values.get("bootindex"), where),
        serial=serial.encode().ljust(SERIAL_BYTES),
        maxq=_number(values, where, "maxq", MAX_QUEUES, 1, MAX_QUEUES),
        qsz=_number(values, where, "qsz", 2048, 2, MAX_QUEUE_ENTRIES),
        ioslots=_number(values, where, "ioslots", 8, 1, MAX_IOSLOTS),
    )


def parse(conf: list[str]) -> dict[str, str]:
    """``PATH[,OPTION...]`` as configuration values (``path``, ``maxq``, ``ro``, ...)."""
    return legacy_config(conf, "nvme")
