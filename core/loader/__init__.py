# SPDX-License-Identifier: BSD-2-Clause
"""Direct kernel boot: pick the loader that understands the image.

Kernel, initramfs and module files are read with bounds: only regular files (a device,
FIFO or directory is refused before any read), the kernel's format is recognised from
its first 8 KiB before the rest is read, and nothing larger than guest RAM is read.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, BinaryIO

from hvf.errors import LoaderError
from hvf.loader import bzimage, multiboot
from hvf.memory import describe_size

if TYPE_CHECKING:
    from hvf.vm import Machine

_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


def _open(path: str, what: str) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file (O_NONBLOCK:
    opening a FIFO must not wait for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise LoaderError(f"cannot read {what} '{path}': {e.strerror}") from None
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        raise LoaderError(f"{what} '{path}' is {_KINDS.get(kind, 'not a regular file')}, "
                          "not a file")
    return os.fdopen(fd, "rb")


def _read_all(f: BinaryIO, path: str, what: str, limit: int | None) -> bytes:
    size = os.fstat(f.fileno()).st_size
    if limit is not None and size > limit:
        raise LoaderError(f"{what} '{path}' is {describe_size(size)}, larger than the "
                          f"guest's {describe_size(limit)} of RAM (-m)")
    try:
        return f.read(size)
    except OSError as e:
        raise LoaderError(f"cannot read {what} '{path}': {e.strerror}") from None


def read_image(path: str, what: str, *, limit: int | None = None) -> bytes:
    """The regular file at ``path`` (``what`` names it in errors), refused when it is
    larger than ``limit`` bytes before anything is read."""
    with _open(path, what) as f:
        return _read_all(f, path, what, limit)


def load_kernel(vm: Machine, path: str, *, initrd: str | None, cmdline: str) -> None:
    """Load the kernel at ``path`` into ``vm`` and set the boot vCPU's entry state."""
    with _open(path, "kernel") as f:
        try:
            head = f.read(multiboot.HEADER_SEARCH)
        except OSError as e:
            raise LoaderError(f"cannot read kernel '{path}': {e.strerror}") from None
        if bzimage.is_bzimage(head):
            header = None
        elif (header := multiboot.find_header(head)) is None:
            raise LoaderError(f"'{path}' is not a kernel hvf can boot: neither a Linux "
                              "bzImage nor a multiboot kernel")
        f.seek(0)
        image = _read_all(f, path, "kernel", vm.memory.size)
    if header is None:
        from hvf.acpi import build_for

        bzimage.check(image, path)
        initrd_data = read_image(initrd, "initramfs", limit=vm.memory.size) if initrd else None
        rsdp = build_for(vm).install(vm)
        bzimage.load(vm, image, path=path, initrd=initrd_data, initrd_path=initrd,
                     cmdline=cmdline, rsdp=rsdp)
        return
    multiboot.load(vm, image, header, path=path, modules=initrd, cmdline=cmdline)
