# SPDX-License-Identifier: BSD-2-Clause
"""The three libc calls the block layer needs that Python's ``os`` lacks, through cffi's
ABI mode (no compiler; cffi releases the GIL around each call): ``fallocate`` with mode
flags, ``statx`` for the direct-I/O alignment, and the address of a buffer. Their
declarations come parsed from ``_libc_abi.py`` (see ``_libc_build.py``): importing this
module loads neither cffi's C parser nor pycparser."""

from __future__ import annotations

import os
import struct
from typing import Any

from hvf.plugins.block._libc_abi import ffi as _ffi

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_AT_EMPTY_PATH = 0x1000
_STATX_DIOALIGN = 0x2000
#: ``struct statx`` is 256 bytes; stx_mask is at 0, stx_dio_mem_align and
#: stx_dio_offset_align at 0x98 and 0x9C (<linux/stat.h>).
_STATX_SIZE = 256
_STATX_DIO = struct.Struct("=II")

_libc: Any = _ffi.dlopen(None)


def _raise() -> None:
    errno = _ffi.errno
    raise OSError(errno, os.strerror(errno))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; raises :class:`OSError` on failure."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        _raise()


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """(memory, file offset) alignment that O_DIRECT needs on ``fd``, from ``statx``
    (Linux 6.1+); ``(0, 0)`` where the file does not support direct I/O, ``None``
    where the kernel or file system does not say."""
    buf = _ffi.new("unsigned char[]", _STATX_SIZE)
    if _libc.statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        _raise()
    raw = _ffi.buffer(buf)
    if not struct.unpack_from("=I", raw, 0)[0] & _STATX_DIOALIGN:
        return None
    mem, offset = _STATX_DIO.unpack_from(raw, 0x98)
    return mem, offset


def address(buffer: memoryview) -> int:
    """The address of the first byte of ``buffer``."""
    return int(_ffi.cast("uintptr_t", _ffi.from_buffer(buffer)))
