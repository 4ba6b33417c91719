# SPDX-License-Identifier: BSD-2-Clause
"""Direct kernel boot: pick the loader that understands the image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hvf.errors import LoaderError
from hvf.loader import bzimage, multiboot

if TYPE_CHECKING:
    from hvf.vm import Machine


def read_image(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise LoaderError(f"cannot read {what} '{path}': {e.strerror}") from None


def load_kernel(vm: Machine, path: str, *, initrd: str | None, cmdline: str) -> None:
    """Load the kernel at ``path`` into ``vm`` and set the boot vCPU's entry state."""
    image = read_image(path, "kernel")
    if bzimage.is_bzimage(image):
        from hvf.acpi import build_for

        initrd_data = read_image(initrd, "initramfs") if initrd else None
        rsdp = build_for(vm).install(vm)
        bzimage.load(vm, image, path=path, initrd=initrd_data, initrd_path=initrd,
                     cmdline=cmdline, rsdp=rsdp)
        return
    header = multiboot.find_header(image)
    if header is None:
        raise LoaderError(f"'{path}' is not a kernel hvf can boot: neither a Linux bzImage "
                          "nor a multiboot kernel")
    multiboot.load(vm, image, header, path=path, modules=initrd, cmdline=cmdline)
