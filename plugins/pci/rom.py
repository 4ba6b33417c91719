# SPDX-License-Identifier: BSD-2-Clause
"""Expansion ROMs: the image a PCI function's ROM BAR (config offset 0x30) serves.

Any PCI device takes QEMU's ``romfile=PATH`` (``-s 3,virtio-net,tap0,romfile=FILE``,
``pci.B.S.F.romfile``): the PCI plugin takes the option out of the device's
configuration before the device's factory sees it, reads the file here and gives it to
the device with :meth:`~hvf.plugins.pci.PciDevice.set_rom`. As in bhyve the ROM BAR
gets no address from hvf; the firmware sizes it (writing all ones reads back the size
mask with the enable bit), programs it, sets its enable bit and, with memory decoding
on, copies the image out (SeaBIOS runs the option ROM from its copy). The ROM is served
read-only through MMIO handlers: the firmware reads it once.
"""

from __future__ import annotations

import logging
import os
import stat

from hvf.errors import ConfigError
from hvf.memory import KiB, MiB

log = logging.getLogger("hvf.pci")

#: The Expansion ROM Base Address register of a type 0 header.
ROM_ADDRESS = 0x30
ROM_ENABLE = 1 << 0
#: Address bits of the register (bits 1-10 are reserved, read as zero).
ROM_ADDRESS_MASK = 0xFFFF_F800
MIN_ROM_SIZE = 2 * KiB
#: The largest file ``romfile=`` reads (the BAR is rounded up to a power of two).
MAX_ROM_SIZE = 16 * MiB
ROM_SIGNATURE = b"\x55\xaa"


def rom_image(data: bytes) -> bytes:
    """``data`` padded with zeros to a power of two of at least 2 KiB (the BAR's size)."""
    size = max(MIN_ROM_SIZE, 1 << (max(len(data), 1) - 1).bit_length())
    return bytes(data).ljust(size, b"\0")


def rom_register(value: int, size: int) -> int:
    """What a guest's write of ``value`` leaves in the register of a ``size``-byte ROM:
    the address bits the BAR can hold and the enable bit."""
    return value & ~(size - 1) & ROM_ADDRESS_MASK | value & ROM_ENABLE


def load_rom(path: str, where: str) -> bytes:
    """The ROM image in the file ``path`` (see :func:`rom_image`), for the device
    ``where``; :class:`ConfigError` names a file that cannot be one."""
    what = f"{where}: option ROM '{path}'"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"{what}: cannot open it: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} is not a regular file")
        if info.st_size > MAX_ROM_SIZE:
            raise ConfigError(f"{what} is {info.st_size} bytes; an option ROM is at most "
                              f"{MAX_ROM_SIZE // MiB} MiB")
        chunks, left = [], MAX_ROM_SIZE + 1  # the file may grow while it is read
        while left and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise ConfigError(f"{what}: cannot read it: {e.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        raise ConfigError(f"{what} is empty")
    if len(data) > MAX_ROM_SIZE:
        raise ConfigError(f"{what} is larger than {MAX_ROM_SIZE // MiB} MiB")
    if data[:2] != ROM_SIGNATURE:
        log.warning("%s does not start with the 0x55AA signature: the firmware will not "
                    "run it", what)
    return rom_image(data)
