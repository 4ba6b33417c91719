# SPDX-License-Identifier: BSD-2-Clause
"""cffi build script for ``hvf.plugins.block._libc_abi``: the libc calls of
:mod:`hvf.plugins.block._libc`, in cffi's out-of-line ABI mode.

No compiler: cffi parses the declarations here once and writes their binary form to
``_libc_abi.py``, which is committed, so importing the block layer parses no C
(parsing them at import cost ~25 ms of every disk VM's start-up). Run this script after
changing :data:`CDEF`; tests/unit/test_block_libc.py checks the file matches it.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from cffi import FFI

CDEF = """
int fallocate(int fd, int mode, int64_t offset, int64_t len);
int statx(int dirfd, const char *pathname, int flags, unsigned int mask, void *statxbuf);
"""
MODULE = "hvf.plugins.block._libc_abi"
TARGET = Path(__file__).with_name("_libc_abi.py")
HEADER = "# SPDX-License-Identifier: BSD-2-Clause\n# Written by _libc_build.py: do not edit.\n"


def source() -> str:
    """The text of ``_libc_abi.py`` for :data:`CDEF`."""
    ffibuilder = FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(MODULE, None)
    out = io.StringIO()
    ffibuilder.emit_python_code(out)
    return HEADER + out.getvalue().removeprefix("# auto-generated file\n")


if __name__ == "__main__":
    TARGET.write_text(source())
    sys.stdout.write(f"wrote {TARGET}\n")
