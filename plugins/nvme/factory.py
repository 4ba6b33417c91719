# SPDX-License-Identifier: BSD-2-Clause
"""Building an ``nvme`` device from its ``pci.B.S.F`` configuration node."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf.errors import ConfigError
from hvf.plugins.block.image import open_image
from hvf.plugins.nvme.controller import NvmeController
from hvf.plugins.nvme.identify import Identity
from hvf.plugins.nvme.options import read_options

if TYPE_CHECKING:
    from hvf.vm import Machine


def create(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> NvmeController:
    where = "nvme@pci.{}.{}.{}".format(*slot)
    options = read_options(config, where, slot, vm.config.get("name") or "")
    image = open_image(options.path, options.image)
    try:
        sector = image.sector
        dsm = {"auto": image.discard and not image.readonly, "enable": True,
               "disable": False}[options.dsm]
        if dsm and image.readonly:
            raise ConfigError(f"{where}: dsm=enable needs a writable image (drop ro)")
        identity = Identity(
            serial=options.serial, eui64=options.eui64,
            blocks=image.size // sector.logical, block_shift=sector.logical.bit_length() - 1,
            blocks_per_physical=sector.physical // sector.logical, dsm=dsm,
            write_cache=not image.direct, readonly=image.readonly,
            maxq=options.maxq, qsz=options.qsz)
        return NvmeController(where, image, identity, ioslots=options.ioslots,
                              bootindex=options.bootindex)
    except BaseException:
        image.close()
        raise
