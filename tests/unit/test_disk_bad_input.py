# SPDX-License-Identifier: BSD-2-Clause
"""Disk images hvf cannot use, on each disk front end (virtio-blk, NVMe, AHCI): a
missing image, a directory, a file hvf may not read, a size that is not a multiple of
the sector size, an image another hvf has open read-write. Each is refused by
``python -m hvf`` with a message naming the image and the problem, exit status 4 and
no traceback; two read-only users of one image both run.

hvf opens /dev/kvm before it builds the devices that open the images, so these runs
need /dev/kvm although no guest boots in most of them; the sharing tests boot test
guests."""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import BASE_ARGS, popen_hvf, run_hvf, stop, wait_for_text
from hvf.pluginmanager import Plugins

pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK),
    reason="python -m hvf opens /dev/kvm before its devices open their disk images")

MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc")
DISKS = [name for name in ("virtio-blk", "nvme", "ahci-hd")
         if name in {entry.name for entry in Plugins().pci_devices}]
IMAGE_SIZE = 1 << 20

# prctl(PR_CAPBSET_DROP): root loses these at its next execve.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def refused(result: subprocess.CompletedProcess[str], *texts: str) -> None:
    """hvf exited 4 with one ``hvf: ...`` line containing ``texts``, no traceback."""
    assert result.returncode == 4, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hvf: ")]
    assert any(all(t in line for t in texts) for line in lines), result.stderr


def hvf(disk: str, path: Path | str, *options: str, **kw: object) -> subprocess.CompletedProcess[str]:
    spec = ",".join([f"3,{disk}", str(path), *options])
    return run_hvf([*MACHINE, "-s", spec, "vm0"], timeout=60, **kw)  # type: ignore[arg-type]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (IMAGE_SIZE // 256))
    return path


@pytest.mark.parametrize("disk", DISKS)
def test_missing_image(disk: str, tmp_path: Path) -> None:
    path = tmp_path / "absent.img"
    refused(hvf(disk, path), str(path), "no such file")


@pytest.mark.parametrize("disk", DISKS)
def test_directory(disk: str, tmp_path: Path) -> None:
    refused(hvf(disk, tmp_path), str(tmp_path), "is a directory",
            "a disk image is a regular file or a block device")


@pytest.mark.parametrize("disk", DISKS)
@pytest.mark.parametrize("size", [1000, 512 * 3 + 1])
def test_size_not_whole_sectors(disk: str, tmp_path: Path, size: int) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(size))
    refused(hvf(disk, path), str(path), f"its size, {size} bytes, is not a multiple of the "
            "512-byte sector size")


def test_size_not_whole_configured_sectors(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(6144))
    refused(hvf("virtio-blk", path, "sectorsize=4096"), str(path),
            "its size, 6144 bytes, is not a multiple of the 4096-byte sector size")


@pytest.mark.parametrize("disk", DISKS)
def test_empty_image(disk: str, tmp_path: Path) -> None:
    path = tmp_path / "empty.img"
    path.touch()
    refused(hvf(disk, path), str(path), "is empty")


def _without_dac_override() -> None:
    """preexec_fn: as root, drop the capabilities that bypass file permissions, so
    that root reads only what the mode bits let it (its /dev/kvm stays its own)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(99)


@pytest.mark.parametrize("disk", DISKS)
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_no_read_permission(disk: str, image: Path, readonly: bool) -> None:
    image.chmod(0o200)  # write-only
    preexec = None
    if os.geteuid() == 0:
        # Root is "other" to a file that nobody owns, and without CAP_DAC_OVERRIDE
        # and CAP_DAC_READ_SEARCH the mode bits hold for it too.
        nobody = pwd.getpwnam("nobody")
        os.chown(image, nobody.pw_uid, nobody.pw_gid)
        image.chmod(0o000)
        preexec = _without_dac_override
    spec = ",".join([f"3,{disk}", str(image), *(["ro"] if readonly else [])])
    result = subprocess.run([sys.executable, "-m", "hvf", *MACHINE, "-s", spec, "vm0"],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, preexec_fn=preexec)
    mode = "read-only" if readonly else "read-write"
    refused(result, str(image), f"permission denied (opening it {mode})")


# ---- sharing an image with another hvf ----


@contextmanager
def running_user(guests: dict[str, Path], image: Path, readonly: bool,
                 tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """An hvf whose guest keeps reading ``image`` through virtio-blk (``bench=seqread``
    with n= far more than it can read in the test's time), opened read-only or
    read-write."""
    out = tmp_path / "first.out"
    spec = f"3,virtio-blk,{image}" + (",ro" if readonly else "")
    with out.open("wb") as f:
        proc = popen_hvf([*BASE_ARGS, "-s", spec, "--kernel", guests["virtio_blk"],
                          "--append", "bench=seqread buf=4096 depth=1 n=4000000000",
                          "first"], stdout=f)
    try:
        wait_for_text(out, "blk bench go", proc, 60)
        yield proc
    finally:
        stop(proc, signal.SIGKILL)


def test_image_in_use_read_write_is_refused(guests: dict[str, Path], image: Path,
                                            tmp_path: Path) -> None:
    with running_user(guests, image, False, tmp_path) as first:
        for disk in DISKS:
            for options in ((), ("ro",)):
                refused(hvf(disk, image, *options), f"{image} is in use",
                        f"open read-write by pid {first.pid}")


def test_read_write_user_refused_beside_a_read_only_one(guests: dict[str, Path], image: Path,
                                                        tmp_path: Path) -> None:
    with running_user(guests, image, True, tmp_path) as first:
        for disk in DISKS:
            refused(hvf(disk, image), f"{image} is in use",
                    f"open read-only by pid {first.pid}")


def test_two_read_only_users_run(guests: dict[str, Path], image: Path,
                                 tmp_path: Path) -> None:
    before = image.read_bytes()
    with running_user(guests, image, True, tmp_path) as first:
        second = run_hvf([*BASE_ARGS, "-s", f"3,virtio-blk,{image},ro", "--kernel",
                          guests["virtio_blk"], "--append", "ro=1", "second"], timeout=120)
        assert second.returncode == 1, (second.stdout, second.stderr)  # guest exit 0
        assert second.stdout.splitlines()[-2:] == ["blk write refused", "blk done"]
        for disk in DISKS[1:]:  # the other front ends share it read-only too
            third = run_hvf([*BASE_ARGS, "-s", f"3,{disk},{image},ro", "--kernel",
                             guests["hello"], "third"], timeout=120)
            assert third.returncode == 1, (disk, third.stdout, third.stderr)
            assert third.stdout.startswith("hello\n")
        assert first.poll() is None
    assert image.read_bytes() == before


@pytest.mark.parametrize("disk", DISKS)
def test_an_unknown_engine_is_refused(disk: str, image: Path) -> None:
    refused(hvf(disk, image, "aio=native"), "invalid aio 'native'", "threads or io_uring")


def test_every_disk_takes_aio_io_uring(guests: dict[str, Path], image: Path) -> None:
    """``aio=io_uring`` (QEMU's option) on each front end; the virtio-blk test guest
    reads, writes, flushes and discards through the ring."""
    run = run_hvf([*BASE_ARGS, "-s", f"3,virtio-blk,{image},aio=io_uring", "--kernel",
                   guests["virtio_blk"], "uring"], timeout=120)
    assert run.returncode == 1, (run.stdout, run.stderr)  # guest exit 0
    assert run.stdout.splitlines()[-1] == "blk done", run.stdout
    for disk in DISKS[1:]:
        run = run_hvf([*BASE_ARGS, "-s", f"3,{disk},{image},aio=io_uring", "--kernel",
                       guests["hello"], "uring"], timeout=120)
        assert run.returncode == 1, (disk, run.stdout, run.stderr)
        assert run.stdout.startswith("hello\n")
