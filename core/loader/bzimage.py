# SPDX-License-Identifier: BSD-2-Clause
"""Linux bzImage loading through the x86 boot protocol's 64-bit entry point.

The protected-mode kernel goes to its preferred address, the initramfs as high in low
RAM as the kernel allows, the command line and the zero page (``struct boot_params``,
with the e820 map and the ACPI RSDP address) below 1 MiB; the boot vCPU starts in long
mode with identity-mapped page tables, as Documentation/arch/x86/boot.rst describes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hvf.errors import LoaderError
from hvf.loader.x86 import enter_long_mode
from hvf.memory import MiB

if TYPE_CHECKING:
    from hvf.vm import Machine

HDRS_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x206  # 2.06: cmdline_size, relocatable kernels
LONG_ENTRY_PROTOCOL = 0x20C  # 2.12: xloadflags with XLF_KERNEL_64
RSDP_PROTOCOL = 0x20E  # 2.14: acpi_rsdp_addr
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
LOADER_TYPE_UNKNOWN = 0xFF

ZERO_PAGE = 0x7000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
E820_MAX_ENTRIES = 128

# struct boot_params / setup_header offsets
BP_ACPI_RSDP = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
HDR_START = 0x1F1
HDR_SETUP_SECTS = 0x1F1
HDR_JUMP = 0x200
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE = 0x234
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260


def is_bzimage(image: bytes) -> bool:
    return len(image) > HDR_MAGIC + 4 and image[HDR_MAGIC : HDR_MAGIC + 4] == HDRS_MAGIC


def _u(image: bytes | bytearray, offset: int, fmt: str) -> int:
    return int(struct.unpack_from("<" + fmt, image, offset)[0])


def check(image: bytes, path: str) -> None:
    """Refuse a bzImage (an ``image`` with the HdrS magic) hvf cannot boot: truncated
    (the setup header, or the setup code its ``setup_sects`` claims, runs past the end
    of the file), too old a boot protocol, not relocatable, no 64-bit entry point."""
    needed = max(HDR_INIT_SIZE + 4, ((image[HDR_SETUP_SECTS] or 4) + 1) * 512)
    if len(image) < needed:
        raise LoaderError(f"'{path}' is a truncated bzImage: {len(image)} bytes, but its "
                          f"setup header and code take {needed}")
    version = _u(image, HDR_VERSION, "H")
    if version < MIN_PROTOCOL:
        raise LoaderError(f"'{path}' uses boot protocol {version >> 8}.{version & 0xFF:02d}; "
                          f"hvf needs {MIN_PROTOCOL >> 8}.{MIN_PROTOCOL & 0xFF:02d} or later")
    if not image[HDR_RELOCATABLE]:
        raise LoaderError(f"'{path}' is not a relocatable kernel")
    if version < LONG_ENTRY_PROTOCOL or not _u(image, HDR_XLOADFLAGS, "H") & XLF_KERNEL_64:
        raise LoaderError(f"'{path}' has no 64-bit entry point (boot protocol 2.12, "
                          "XLF_KERNEL_64)")
    if not image[HDR_LOADFLAGS] & LOADED_HIGH:
        raise LoaderError(f"'{path}' is a zImage (loaded low), not a bzImage")


def load(
    vm: Machine, image: bytes, *, path: str, initrd: bytes | None, initrd_path: str | None,
    cmdline: str, rsdp: int | None,
) -> None:
    """Load the bzImage ``image`` (passed by :func:`check`) and prepare the boot vCPU's
    long-mode entry."""
    version = _u(image, HDR_VERSION, "H")
    setup_sects = image[HDR_SETUP_SECTS] or 4
    kernel = image[(setup_sects + 1) * 512 :]
    align = max(_u(image, HDR_KERNEL_ALIGNMENT, "I"), 2 * MiB)
    init_size = max(_u(image, HDR_INIT_SIZE, "I"), len(kernel))
    load_addr = _u(image, HDR_PREF_ADDRESS, "Q") or 16 * MiB
    load_addr = -(-load_addr // align) * align
    if not vm.memory.contains(load_addr, init_size):
        raise LoaderError(
            f"'{path}' needs {(load_addr + init_size) >> 20} MiB of RAM to decompress at "
            f"{load_addr:#x}; the guest has {vm.memory.lowmem_size >> 20} MiB below 4 GiB"
        )
    vm.memory.write(load_addr, kernel)
    kernel_end = load_addr + init_size

    params = bytearray(4096)
    header_end = HDR_JUMP + 2 + image[HDR_JUMP + 1]  # the jump's offset byte ends the header
    params[HDR_START:header_end] = image[HDR_START:header_end]
    params[HDR_TYPE_OF_LOADER] = LOADER_TYPE_UNKNOWN

    limit = _u(image, HDR_CMDLINE_SIZE, "I") or 255
    encoded = cmdline.encode()
    if len(encoded) > min(limit, CMDLINE_MAX - 1):
        raise LoaderError(f"the kernel command line is {len(encoded)} bytes; '{path}' accepts "
                          f"at most {limit}")
    vm.memory.write(CMDLINE_ADDR, encoded + b"\0")
    struct.pack_into("<I", params, HDR_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<I", params, BP_EXT_CMD_LINE_PTR, 0)

    if initrd is not None:
        addr = _place_initrd(vm, image, len(initrd), kernel_end, initrd_path or "initrd")
        vm.memory.write(addr, initrd)
        struct.pack_into("<I", params, HDR_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
        struct.pack_into("<I", params, HDR_RAMDISK_SIZE, len(initrd) & 0xFFFFFFFF)
        struct.pack_into("<I", params, BP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", params, BP_EXT_RAMDISK_SIZE, len(initrd) >> 32)

    e820 = vm.memory.e820()[:E820_MAX_ENTRIES]
    params[BP_E820_ENTRIES] = len(e820)
    for i, (base, length, kind) in enumerate(e820):
        struct.pack_into("<QQI", params, BP_E820_TABLE + 20 * i, base, length, kind)
    if rsdp is not None and version >= RSDP_PROTOCOL:
        struct.pack_into("<Q", params, BP_ACPI_RSDP, rsdp)
    vm.memory.write(ZERO_PAGE, bytes(params))

    enter_long_mode(vm.vcpus[0].fd, vm.memory, load_addr + 0x200, rsi=ZERO_PAGE)


def _place_initrd(vm: Machine, image: bytes, size: int, kernel_end: int, what: str) -> int:
    """As high as allowed in low RAM, page-aligned, above the decompressed kernel."""
    ceiling = min(vm.memory.lowmem_size, _u(image, HDR_INITRD_ADDR_MAX, "I") + 1)
    addr = (ceiling - size) & ~0xFFF
    if addr < kernel_end:
        raise LoaderError(
            f"initramfs '{what}' ({size >> 20} MiB) does not fit between the kernel "
            f"(ending at {kernel_end >> 20} MiB) and {ceiling >> 20} MiB: give the guest more "
            "memory (-m)"
        )
    return addr
