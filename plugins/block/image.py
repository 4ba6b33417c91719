# SPDX-License-Identifier: BSD-2-Clause
"""Opening a disk image: a raw regular file or a block device.

:func:`open_image` checks the path before it opens anything (a FIFO or a character
device is refused before an ``open`` could block or have side effects), opens it
``O_RDONLY`` or ``O_RDWR`` with ``O_DIRECT`` for ``nocache`` and ``O_SYNC`` for
``direct`` (bhyve's meanings), a read-write block device also ``O_EXCL`` so that a
mounted file system or a RAID/LVM member is never handed to a guest (a device another
read-write user holds is refused by that, naming the user from its lock), then takes
the image lock (:mod:`hvf.plugins.block.lock`). Every refusal is an
:class:`~hvf.errors.ImageError` naming the path and the problem.

Sizes: a file's from ``fstat``, a device's from ``BLKGETSIZE64``, with its logical and
physical sector sizes from ``BLKSSZGET``/``BLKPBSZGET``. A file's sectors are 512 bytes
with the file system's block size as the physical size, as in bhyve; ``sectorsize=``
overrides both. The size must be a non-zero multiple of the logical sector size.

Direct I/O (``nocache``): Linux needs the file offset, the length and every buffer's
length aligned to the *offset alignment* and every buffer's address to the *memory
alignment*, both from ``statx(STATX_DIOALIGN)`` (Linux 6.1+; older kernels: the page
size and the device's sector or the file system's block size, which always suffice).
The logical sector size must be a multiple of the offset alignment (by default it is
raised to it), so that requests in whole sectors are always aligned; the back end
bounces unaligned guest buffers (:mod:`hvf.plugins.block.backend`). A file system that
cannot do direct I/O at all (ramfs, some FUSE) is refused, not silently cached: the
user asked for ``nocache``.

The image's :class:`ImageIdentity` (device, inode, special-file device, size,
modification time) is what a snapshot records and a restore compares.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

import attrs

from hvf.errors import ImageError
from hvf.plugins.block._libc import dio_alignment
from hvf.plugins.block.lock import PERM_BASE, PERM_WRITE, holders, in_use, lock_image, names
from hvf.plugins.block.options import MIN_SECTOR, ImageOptions, SectorSize

BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKGETSIZE64 = 0x80081272
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_NO_DIRECT_IO = "{}: the file system cannot do direct I/O, which nocache needs; drop nocache"

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFSOCK: "a socket",
}


@attrs.frozen
class ImageIdentity:
    """What identifies an image's contents for a snapshot: the file (``device``,
    ``inode``, and ``rdev`` for a block device), its ``size`` and ``mtime_ns``. For a
    block device the file is its node in ``/dev``, whose modification time changes with
    every write through it; a node made anew (at boot) reads as another file."""

    device: int
    inode: int
    rdev: int
    size: int
    mtime_ns: int

    def differences(self, recorded: ImageIdentity) -> list[str]:
        """How this image differs from ``recorded`` (empty when it is the same)."""
        found = []
        if (self.device, self.inode, self.rdev) != (recorded.device, recorded.inode,
                                                    recorded.rdev):
            found.append("it is another file")
        if self.size != recorded.size:
            found.append(f"its size is {self.size} bytes, not {recorded.size}")
        if self.mtime_ns != recorded.mtime_ns:
            found.append("it was modified")
        return found


@attrs.frozen
class DioAlignment:
    """What ``O_DIRECT`` needs: buffer addresses aligned to ``memory``; offsets, lengths
    and buffer lengths to ``offset``."""

    memory: int
    offset: int


def _describe(e: OSError, path: str, writable: bool) -> str:
    mode = "read-write" if writable else "read-only"
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"{path}: no such file"
    if e.errno in (errno.EACCES, errno.EPERM):
        hint = "; add ro if it only needs to be read" if writable else ""
        return f"{path}: permission denied (opening it {mode}){hint}"
    if e.errno == errno.EROFS:
        return f"{path} is on a read-only file system; add ro to open it read-only"
    if e.errno == errno.EBUSY:
        return (f"{path} is busy: it is mounted, part of a RAID or LVM volume, swap, or "
                f"open read-write by another program")
    if e.errno == errno.ENOMEDIUM:
        return f"{path}: no medium in the drive"
    return f"{path}: cannot open it {mode}: {os.strerror(e.errno or errno.EIO)}"


def _kind_error(path: str, mode: int) -> ImageError | None:
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return ImageError(f"{path} is {kind}; a disk image is a regular file or a block device")


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    size = struct.calcsize(fmt)
    return int(struct.unpack(fmt, fcntl.ioctl(fd, request, bytes(size)))[0])


class Image:
    """An open disk image. ``fd`` stays open (and the image locked) until
    :meth:`close`."""

    def __init__(self, path: str, fd: int, st: os.stat_result, options: ImageOptions) -> None:
        self.path = path
        self.fd = fd
        self.readonly = options.readonly
        self.nocache = options.nocache
        self.direct = options.direct
        #: Whether discard requests are honoured (bhyve's ``nodelete`` turns them off).
        self.discard = not options.nodelete
        #: The engine its back end asks for (``aio=``): ``threads`` or ``io_uring``.
        self.aio = options.aio
        self.block_device = stat.S_ISBLK(st.st_mode)
        if self.block_device:
            self.size = _ioctl_int(fd, BLKGETSIZE64, "Q")
            native = SectorSize(_ioctl_int(fd, BLKSSZGET, "i"), _ioctl_int(fd, BLKPBSZGET, "I"))
        else:
            self.size = st.st_size
            blksize = st.st_blksize
            power = blksize >= MIN_SECTOR and not blksize & (blksize - 1)
            native = SectorSize(MIN_SECTOR, blksize if power else MIN_SECTOR)
        #: Direct-I/O alignment, with ``nocache`` only.
        self.dio: DioAlignment | None = self._dio_alignment(native) if self.nocache else None
        self.sector = self._sector_size(options.sectorsize, native)
        if self.size == 0:
            raise ImageError(f"{path} is empty (0 bytes)")
        if self.size % self.sector.logical:
            raise ImageError(f"{path}: its size, {self.size} bytes, is not a multiple of the "
                             f"{self.sector.logical}-byte sector size")

    def _dio_alignment(self, native: SectorSize) -> DioAlignment:
        reported = dio_alignment(self.fd)
        if reported is None:
            fallback = native.logical if self.block_device else os.fstat(self.fd).st_blksize
            return DioAlignment(PAGE_SIZE, max(fallback, MIN_SECTOR))
        memory, offset = reported
        if not offset:
            raise ImageError(_NO_DIRECT_IO.format(self.path))
        return DioAlignment(max(memory, 1), offset)

    def _sector_size(self, configured: SectorSize | None, native: SectorSize) -> SectorSize:
        align = self.dio.offset if self.dio else 1
        if configured is None:
            logical = max(native.logical, align)
            return SectorSize(logical, max(native.physical, logical))
        if configured.logical % align:
            raise ImageError(f"{self.path}: sector size {configured.logical} is not a multiple "
                             f"of {align} bytes, the alignment nocache (O_DIRECT) needs "
                             f"here; use sectorsize={align} or drop nocache")
        return configured

    def identity(self) -> ImageIdentity:
        """The image's identity now."""
        st = os.fstat(self.fd)
        return ImageIdentity(st.st_dev, st.st_ino, st.st_rdev, self.size, st.st_mtime_ns)

    def close(self) -> None:
        """Close the image (dropping its lock); a second call does nothing."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<Image {self.path} {self.size} bytes {self.sector} {mode}>"


def open_image(path: str | os.PathLike[str], options: ImageOptions | None = None) -> Image:
    """Open and lock the disk image at ``path``, or raise
    :class:`~hvf.errors.ImageError` saying why it cannot be used."""
    options = options or ImageOptions()
    path = os.fspath(path)
    writable = not options.readonly
    if not path:
        raise ImageError("no disk image path given")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(_describe(e, path, writable)) from None
    if (error := _kind_error(path, st.st_mode)) is not None:
        raise error
    flags = os.O_RDWR if writable else os.O_RDONLY
    flags |= os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if options.nocache:
        flags |= os.O_DIRECT
    if options.direct:
        flags |= os.O_SYNC
    if writable and stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EINVAL and options.nocache:
            raise ImageError(_NO_DIRECT_IO.format(path)) from None
        if e.errno == errno.EBUSY and (other := holders(st, PERM_BASE + PERM_WRITE)):
            raise ImageError(in_use(path, "open read-write", names(other))) from None
        raise ImageError(_describe(e, path, writable)) from None
    try:
        st = os.fstat(fd)
        if (error := _kind_error(path, st.st_mode)) is not None:
            raise error
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        image = Image(path, fd, st, options)
        lock_image(fd, path, writable=writable)
    except OSError as e:
        os.close(fd)
        raise ImageError(f"{path}: {os.strerror(e.errno or errno.EIO)}") from None
    except BaseException:
        os.close(fd)
        raise
    return image
