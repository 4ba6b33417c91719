# SPDX-License-Identifier: BSD-2-Clause
"""The block layer's libc calls: their parsed declarations match the build script, and
importing them parses no C (pycparser stays out of a disk VM's start-up)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvf.plugins.block import _libc, _libc_build


def test_the_committed_declarations_are_those_the_build_script_writes() -> None:
    assert _libc_build.TARGET.read_text() == _libc_build.source()


def test_importing_the_calls_loads_no_c_parser() -> None:
    probe = ("import json, sys; import hvf.plugins.block._libc; "
             "print(json.dumps(sorted(sys.modules)))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                           text=True, check=True).stdout))
    assert not {"cffi", "cffi.api", "cffi.cparser", "pycparser"} & loaded


def test_fallocate_punches_a_hole_and_names_a_bad_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(b"\xAA" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        _libc.fallocate(fd, _libc.FALLOC_FL_PUNCH_HOLE | _libc.FALLOC_FL_KEEP_SIZE, 0, 4096)
    except OSError as e:  # a file system without hole punching (tmpfs has it)
        pytest.skip(f"no FALLOC_FL_PUNCH_HOLE here: {e}")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 4096 + b"\xAA" * 4096
    with pytest.raises(OSError) as raised:
        _libc.fallocate(fd, 0, 0, 4096)  # closed above
    assert raised.value.errno == errno.EBADF


def test_dio_alignment_and_address(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        alignment = _libc.dio_alignment(fd)
    finally:
        os.close(fd)
    assert alignment is None or all(n >= 0 for n in alignment)
    buffer = bytearray(64)
    view = memoryview(buffer)
    assert _libc.address(view[16:]) == _libc.address(view) + 16
    assert _libc.address(memoryview(bytes(8))) > 0  # a read-only buffer too
