# SPDX-License-Identifier: BSD-2-Clause
"""virtio-blk on real KVM, driven by the C test guest tests/guests/virtio_blk.c
(README there): 1 MiB written through three-descriptor chains, flushed, read back and
compared in the guest, GET_ID, then the image file checked on the host; and a
read-only disk that refuses the write and stays untouched."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import signal

from conftest import BASE_ARGS, popen_hvf, run_guest, stop, wait_for_text

pytestmark = pytest.mark.kvm

MIB = 1 << 20
SECTOR = 512
IMAGE_SIZE = 64 * MIB
SECTORS = 2048  # the guest's default n=
SERIAL = "hvf-test-disk"


def pattern(sectors: int) -> bytes:
    """What ``virtio_blk`` writes: word w of sector s is s*0x9E3779B1 ^ w ^ 0xA5A5A5A5."""
    out = bytearray()
    for s in range(sectors):
        c = (s * 0x9E3779B1 ^ 0xA5A5A5A5) & 0xFFFFFFFF
        out += struct.pack("<128I", *(c ^ w for w in range(128)))
    return bytes(out)


def sparse_image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return img


def is_zero(img: Path, start: int) -> bool:
    with img.open("rb") as f:
        f.seek(start)
        while chunk := f.read(4 * MIB):
            if chunk.count(0) != len(chunk):
                return False
    return True


def test_blk_write_flush_read_and_id(guests: dict[str, Path], tmp_path: Path) -> None:
    img = sparse_image(tmp_path)
    r = run_guest(guests["virtio_blk"], "-s", f"3,virtio-blk,{img},ser={SERIAL}", timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)  # guest exit 0
    assert r.stdout.splitlines()[-6:] == [
        f"blk capacity {IMAGE_SIZE // SECTOR}",
        f"blk wrote {SECTORS}",
        f"blk flushed {SECTORS}",
        f"blk read {SECTORS} ok",
        f"blk id {SERIAL}",
        "blk done",
    ], r.stdout
    assert img.stat().st_size == IMAGE_SIZE
    with img.open("rb") as f:
        head = f.read(SECTORS * SECTOR)
    expected = pattern(SECTORS)
    if head != expected:
        first = next(i for i in range(len(head)) if head[i] != expected[i])
        pytest.fail(f"image differs from the pattern at sector {first // SECTOR} "
                    f"byte {first % SECTOR}")
    assert is_zero(img, SECTORS * SECTOR), "image not zero after the written sectors"


def test_blk_read_only_refuses_writes(guests: dict[str, Path], tmp_path: Path) -> None:
    img = sparse_image(tmp_path)
    r = run_guest(guests["virtio_blk"], "-s", f"3,virtio-blk,{img},ro,ser={SERIAL}",
                  append="ro=1", timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[-3:] == [
        f"blk capacity {IMAGE_SIZE // SECTOR}",
        "blk write refused",
        "blk done",
    ], r.stdout
    assert img.stat().st_size == IMAGE_SIZE
    assert is_zero(img, 0), "read-only image was written"


@pytest.mark.parametrize("queues", [1, 4])
def test_blk_discard_leaves_the_image_sparse(guests: dict[str, Path], tmp_path: Path,
                                             queues: int) -> None:
    """Writes, flush, read-back and discard of 1 MiB over one queue and over four
    (VIRTIO_BLK_F_MQ): the guest reads the discarded sectors back as zeros and the
    image file's blocks are given back (holes punched)."""
    img = sparse_image(tmp_path)
    r = run_guest(guests["virtio_blk"], "-s", f"3,virtio-blk,{img},num_queues={queues}",
                  append=f"queues={queues} discard=1", timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[-5:-2] == [
        f"blk read {SECTORS} ok", f"blk discarded {SECTORS}", f"blk zero {SECTORS} ok"], r.stdout
    assert img.stat().st_size == IMAGE_SIZE
    assert img.stat().st_blocks * 512 < 64 * 1024, "the discarded range still holds blocks"
    assert is_zero(img, 0)


def test_sigkill_after_a_flush_loses_no_write(guests: dict[str, Path], tmp_path: Path) -> None:
    """hvf killed with SIGKILL once the guest saw its flush complete: every sector the
    guest wrote before the flush is in the image."""
    img, log = sparse_image(tmp_path), tmp_path / "debug.log"
    proc = popen_hvf([*BASE_ARGS[:-2], "-l", f"debugcon,{log}", "-s", f"3,virtio-blk,{img}",
                      "--kernel", guests["virtio_blk"], "--append", "n=8192", "vm-sigkill"])
    try:
        wait_for_text(log, "blk flushed 8192", proc, timeout=300)
    finally:
        stop(proc, signal.SIGKILL)
    with img.open("rb") as f:
        assert f.read(8192 * SECTOR) == pattern(8192), "a flushed write is missing"
