# SPDX-License-Identifier: BSD-2-Clause
"""NVMe on real KVM, driven by the polling test guest tests/guests/nvme_disk.c: 1 MiB
written through PRP lists, flushed, read back and compared in the guest, half of it
deallocated (the image file gets a hole: st_blocks shrinks), Write Zeroes, a read past
the end refused, a normal shutdown; then the image checked on the host. With doorbell
buffers (the I/O doorbells are ioeventfds) and without; a read-only namespace; and the
configurations hvf refuses with exit status 4."""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

import pytest

from conftest import popen_hvf, run_guest, run_hvf, stop
from hvf.testing import bootdisk

pytestmark = pytest.mark.kvm

MIB = 1 << 20
BLOCK = 512
IMAGE_SIZE = 64 * MIB
BLOCKS = 2048  # the guest's default n=
SERIAL = "hvf-nvme-test"


def pattern(first: int, count: int) -> bytes:
    """What ``nvme_disk`` writes: word w of block b is b*0x9E3779B1 ^ 0xA5A5A5A5 ^ w."""
    out = bytearray()
    for b in range(first, first + count):
        c = (b * 0x9E3779B1 ^ 0xA5A5A5A5) & 0xFFFFFFFF
        out += struct.pack("<128I", *(c ^ w for w in range(128)))
    return bytes(out)


def sparse_image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return img


@pytest.mark.parametrize("doorbell_buffers", [1, 0])
def test_nvme_read_write_flush_discard(guests: dict[str, Path], tmp_path: Path,
                                       doorbell_buffers: int) -> None:
    img = sparse_image(tmp_path)
    buf = 65536 if doorbell_buffers else 8192  # PRP lists; PRP1 and PRP2 only
    r = run_guest(guests["nvme_disk"], "-s", f"3,nvme,{img},ser={SERIAL}",
                  append=f"dbbuf={doorbell_buffers} buf={buf}", timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)  # guest exit 0
    assert r.stdout.splitlines()[-13:] == [
        "nvme version 1.4.0",
        f"nvme model hvf-NVMe serial {SERIAL}",
        f"nvme capacity {IMAGE_SIZE // BLOCK} blocks of 512",
        f"nvme queue depth 8 dbbuf {doorbell_buffers}",
        f"nvme wrote {BLOCKS}",
        "nvme flushed",
        f"nvme read {BLOCKS} ok",
        f"nvme discarded {BLOCKS // 2}",
        "nvme discard reads zero",
        "nvme write-zeroes ok",
        "nvme out-of-range refused",
        "nvme shutdown ok",
        "nvme done",
    ], r.stdout
    half = BLOCKS // 2 * BLOCK
    st = img.stat()
    assert st.st_size == IMAGE_SIZE
    # Sparse: the deallocated half is a hole, only the rest of what was written is data.
    assert st.st_blocks * 512 <= BLOCKS * BLOCK - half, st.st_blocks
    with img.open("rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) >= half
        f.seek(0)
        head = f.read(BLOCKS * BLOCK)
    assert head[:half + 8 * BLOCK] == bytes(half + 8 * BLOCK)  # discarded, then zeroed
    expected = pattern(BLOCKS // 2 + 8, BLOCKS // 2 - 8)
    if head[half + 8 * BLOCK:] != expected:
        first = next(i for i, (a, b) in enumerate(zip(head[half + 8 * BLOCK:], expected))
                     if a != b)
        pytest.fail(f"image differs from the pattern {first} bytes after block "
                    f"{BLOCKS // 2 + 8}")


def test_nvme_read_only_namespace(guests: dict[str, Path], tmp_path: Path) -> None:
    img = sparse_image(tmp_path)
    r = run_guest(guests["nvme_disk"], "-s", f"3,nvme,{img},ro", append="ro=1", timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[-4:] == [
        "nvme write refused", "nvme out-of-range refused", "nvme shutdown ok", "nvme done",
    ], r.stdout
    assert img.stat().st_blocks == 0, "read-only image was written"


def test_nvme_configuration_errors(guests: dict[str, Path], tmp_path: Path) -> None:
    img = sparse_image(tmp_path)
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(4096 + 512))
    base = ["-s", "0,hostbridge", "-s", "31,lpc", "--kernel", str(guests["halt"])]
    for slot, message in (
            (f"5,nvme,{tmp_path / 'none.img'}", "none.img: no such file"),
            (f"5,nvme,{tmp_path}", "is a directory"),
            (f"5,nvme,{odd},sectsz=4096", "is not a multiple of the 4096-byte sector size"),
            (f"5,nvme,{img},maxq=99", "nvme@pci.0.5.0: invalid maxq='99'"),
            (f"5,nvme,{img},qsz=1", "invalid qsz='1'"),
            (f"5,nvme,{img},sectsz=1000", "invalid sectsz='1000'"),
            (f"5,nvme,{img},dsm=sometimes", "invalid dsm='sometimes'"),
            (f"5,nvme,{img},speed=9", "nvme@pci.0.5.0: unknown option 'speed'"),
            (f"5,nvme,{img},bootindex=x", "bootindex 'x' is not a number"),
            (f"5,nvme,{img},ro,dsm=enable", "dsm=enable needs a writable image")):
        r = run_hvf([*base, "-s", slot, "vm-nvme-bad"])
        assert r.returncode == 4, (slot, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    # An image in use read-write by another VM is refused, naming it. (The first VM
    # runs SeaBIOS, which waits a while at "No bootable device".)
    if not bootdisk.SEABIOS.exists():
        pytest.skip(f"{bootdisk.SEABIOS} is missing: install Debian's seabios package")
    base = ["-s", "0,hostbridge", "-s", "31,lpc", "-l", f"bootrom,{bootdisk.SEABIOS}"]
    first = popen_hvf([*base, "-s", f"5,nvme,{img}", "vm-nvme-first"])
    try:
        deadline = time.monotonic() + 60
        while not holds(first.pid, img):
            assert first.poll() is None and time.monotonic() < deadline, "first VM never opened it"
            time.sleep(0.1)
        r = run_hvf([*base, "-s", f"5,nvme,{img}", "vm-nvme-second"])
        assert r.returncode == 4 and str(img) in r.stderr and "in use" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        stop(first, signal.SIGKILL)


def holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())
    except OSError:
        return False
