# SPDX-License-Identifier: BSD-2-Clause
"""Building an AHCI controller from its configuration: the ports' images opened (and
locked) on their block back ends, the drives made, the boot entries listed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf.bootorder import BootEntry, pci_path
from hvf.plugins.ahci.ata import Disk
from hvf.plugins.ahci.atapi import Cdrom
from hvf.errors import ImageError
from hvf.plugins.ahci.config import CD, HD, PortConfig, ports_config
from hvf.plugins.ahci.hba import Ahci
from hvf.plugins.ahci.spec import CD_SECTOR
from hvf.plugins.block.engine import new_backend
from hvf.plugins.block.image import open_image

if TYPE_CHECKING:
    from hvf.plugins.ahci.request import Drive
    from hvf.vm import Machine

#: Back-end worker threads per disk and per CD (a CD is read one request at a time).
DISK_THREADS = 4
CD_THREADS = 1
INQUIRY_VENDOR = "HVF"
INQUIRY_PRODUCT = "HVF DVD-ROM"


def _drive(port: PortConfig, name: str) -> Drive:
    image = open_image(port.path, port.options)
    try:
        if port.kind == CD and image.size < CD_SECTOR:
            raise ImageError(f"{port.path} is {image.size} bytes, less than one "
                             f"{CD_SECTOR}-byte CD block")
        backend = new_backend(image, threads=DISK_THREADS if port.kind == HD else CD_THREADS,
                              name=f"{name} port {port.index}")
    except BaseException:
        image.close()
        raise
    if port.kind == HD:
        return Disk(backend, serial=port.serial, model=port.model, revision=port.revision,
                    rotation=port.rotation)
    return Cdrom(backend, serial=port.serial, model=port.model, revision=port.revision,
                 vendor=INQUIRY_VENDOR, product=INQUIRY_PRODUCT)


def build(emulation: str, slot: tuple[int, int, int], config: dict[str, Any]) -> Ahci:
    """The controller for ``emulation`` (``ahci``, ``ahci-hd``, ``ahci-cd``) at ``slot``."""
    name = "{}@pci.{}.{}.{}".format(emulation, *slot)
    ports = ports_config(config, name, emulation)
    drives: dict[int, Drive] = {}
    try:
        for port in ports:
            drives[port.index] = _drive(port, name)
    except BaseException:
        for drive in drives.values():
            drive.close()
        raise
    boot = [BootEntry(p.bootindex, pci_path(slot, "sata", f"drive@{p.index:x}", "disk@0"),
                      f"{name} port {p.index}") for p in ports if p.bootindex is not None]
    return Ahci(name, drives, boot)


def create_ahci(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> Ahci:
    return build("ahci", slot, config)


def create_hd(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> Ahci:
    return build("ahci-hd", slot, config)


def create_cd(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> Ahci:
    return build("ahci-cd", slot, config)
