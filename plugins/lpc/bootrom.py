# SPDX-License-Identifier: BSD-2-Clause
"""Boot firmware (``-l bootrom,ROM[,VARS][,key=value...]``), as bhyve maps it.

The ROM is mapped read-only so that it ends at 4 GiB, where the first vCPU's reset
vector (0xFFFFFFF0) lies; its last 128 KiB also appear at 0xE0000-0xFFFFF, in RAM that is
writable, as a chipset's PAM registers make the BIOS area for firmware that shadows
itself. The optional VARS file (UEFI variables) is mapped just below the ROM, writable,
and guest writes go back to the file. Guest writes to the ROM itself are dropped, as
flash ignores them.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any

from hvf._kvm import ffi, lib
from hvf.device import Device
from hvf.errors import CapabilityError, ConfigError
from hvf.iobus import read_zero

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.vm import Machine

FOUR_GIB = 1 << 32
#: The ROM's top, up to this much, is copied below 1 MiB (the legacy BIOS area, which
#: hvf's host bridge does not shadow itself): 128 KiB ROMs fill 0xE0000-0xFFFFF, and
#: SeaBIOS's 256 KiB build, whose code also runs from 0xC0000, needs all of it there.
MAX_SHADOW = 256 * 1024
LEGACY_TOP = 0x100000
MAX_ROM_SIZE = 16 << 20
PAGE = mmap.PAGESIZE


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_ROM_SIZE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} '{path}': {e.strerror}") from None


class BootRom(Device):
    def __init__(self, rom_path: str, vars_path: str | None) -> None:
        super().__init__("bootrom")
        self.rom_path = rom_path
        self.vars_path = vars_path
        rom = _read(rom_path, "boot ROM")
        if not rom or len(rom) > MAX_ROM_SIZE or len(rom) % PAGE:
            raise ConfigError(
                f"boot ROM '{rom_path}' is {len(rom)} bytes: it must be a non-empty multiple of "
                f"{PAGE} bytes, at most {MAX_ROM_SIZE >> 20} MiB"
            )
        self.rom: bytes | None = rom  # until attach copies it into the guest's ROM

    def attach(self, ctx: DeviceContext) -> None:
        if not ctx.has_capability(lib.KVM_CAP_READONLY_MEM):
            raise CapabilityError("the host's KVM cannot map read-only memory (boot ROM)")
        rom, self.rom = self.rom, None  # rom_map holds the image from here: no second copy
        assert rom is not None, "a boot ROM attaches once"
        size = len(rom)
        base = FOUR_GIB - size
        self.rom_map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.rom_map[:] = rom
        ctx.add_memory_slot(base, size, _address(self.rom_map), readonly=True)
        ctx.mmio.register(base, size, "boot ROM (writes ignored)", read_zero)
        top = base
        if self.vars_path:
            top = self._map_vars(ctx, base)
        self.lowest = top
        shadow = min(size, MAX_SHADOW)
        if ctx.memory.contains(LEGACY_TOP - shadow, shadow) and not ctx.restoring:
            # (a restored guest's RAM already holds the shadow as the firmware left it)
            ctx.memory.write(LEGACY_TOP - shadow, rom[-shadow:])

    def _map_vars(self, ctx: DeviceContext, rom_base: int) -> int:
        assert self.vars_path is not None
        try:
            fd = os.open(self.vars_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"cannot open boot variables '{self.vars_path}': {e.strerror}") from None
        size = os.fstat(fd).st_size
        if not size or size % PAGE or size > MAX_ROM_SIZE:
            os.close(fd)
            raise ConfigError(f"boot variables '{self.vars_path}' is {size} bytes: it must be a "
                              f"non-empty multiple of {PAGE} bytes")
        self.vars_map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        os.close(fd)
        ctx.add_memory_slot(rom_base - size, size, _address(self.vars_map), readonly=False)
        return rom_base - size

    def close(self) -> None:
        if self.vars_path:
            self.vars_map.flush()


def _address(m: mmap.mmap) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(m)))


def parse(conf: list[str]) -> dict[str, str]:
    """``bootrom,ROM[,VARS][,key=value...]``: bhyve's syntax; implies QEMU's fw_cfg."""
    if not conf or not conf[0] or "=" in conf[0]:
        raise ConfigError(f'invalid bootrom option "{",".join(["bootrom", *conf])}"')
    values = {"bootrom": conf[0], "fwcfg": "qemu"}
    rest = conf[1:]
    if rest and "=" not in rest[0]:
        values["bootvars"] = rest.pop(0)
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f'invalid bootrom option "{item}"')
        values[key] = value
    return values


def create(*, vm: Machine, config: Any) -> BootRom | None:
    rom = config.get("lpc.bootrom")
    return BootRom(rom, config.get("lpc.bootvars")) if rom else None
