# SPDX-License-Identifier: BSD-2-Clause
"""Disk images: options, opening files and block devices (loop devices, as root), sizes
and sector sizes, direct I/O alignment, identities, and every refusal's message."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hvf.config import Config
from hvf.errors import ConfigError, ImageError
from hvf.plugins.block.backend import BlockBackend, Status
from hvf.plugins.block.image import ImageIdentity, open_image
from hvf.plugins.block.options import ImageOptions, SectorSize, legacy_config, parse_sectorsize

MiB = 1 << 20
ROOT = os.geteuid() == 0


def make_image(path: Path, size: int = MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def img(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


def refusal(path: Path | str, options: ImageOptions | None = None) -> str:
    with pytest.raises(ImageError) as info:
        open_image(path, options)
    return str(info.value)


# ---- options ----


@pytest.mark.parametrize(("spec", "expected"), [
    ("512", SectorSize(512, 512)),
    ("4096", SectorSize(4096, 4096)),
    ("512/4096", SectorSize(512, 4096)),
    ("65536/65536", SectorSize(65536, 65536)),
])
def test_sectorsize_parses_logical_and_physical(spec: str, expected: SectorSize) -> None:
    assert parse_sectorsize(spec) == expected
    assert str(expected) == f"{expected.logical}/{expected.physical}"


@pytest.mark.parametrize(("spec", "problem"), [
    ("", "power of two"), ("abc", "power of two"), ("256", "power of two"),
    ("1000", "power of two"), ("131072", "power of two"), ("512/", "power of two"),
    ("512/768", "power of two"), ("-512", "power of two"),
    ("4096/512", "physical sector size is smaller"),
])
def test_bad_sectorsize_is_refused_with_its_text(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        parse_sectorsize(spec)
    assert f"'{spec}'" in str(info.value)


def test_options_come_from_a_configuration_node() -> None:
    config = Config({"path": "/x", "ro": "true", "nocache": "on", "sync": "yes",
                     "nodelete": "1", "sectorsize": "512/4096"})
    assert ImageOptions.from_config(config) == ImageOptions(
        readonly=True, nocache=True, direct=True, nodelete=True,
        sectorsize=SectorSize(512, 4096))
    assert ImageOptions.from_config(Config({"path": "/x"})) == ImageOptions()
    assert ImageOptions.from_config(Config({"direct": "true"})).direct
    with pytest.raises(ConfigError, match="ro"):
        ImageOptions.from_config(Config({"ro": "maybe"}))


def test_legacy_options_become_configuration_values() -> None:
    assert legacy_config(["/vm/disk.img", "ro", "sectorsize=512/4096", "ser=ABC"],
                         "virtio-blk") == {"path": "/vm/disk.img", "ro": "true",
                                           "sectorsize": "512/4096", "ser": "ABC"}


@pytest.mark.parametrize(("conf", "problem"), [
    ([], "no disk image"), ([""], "no disk image"), (["d", "=x"], "invalid option '=x'"),
    (["d", "a="], "invalid option 'a='"), (["d", "a.b=1"], "invalid option 'a.b=1'"),
])
def test_bad_legacy_options_are_refused(conf: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        legacy_config(conf, "virtio-blk")
    assert str(info.value).startswith("virtio-blk: ")


# ---- regular files ----


def test_a_file_opens_with_its_size_and_512_byte_sectors(img: Path) -> None:
    image = open_image(img)
    try:
        assert image.size == MiB
        assert image.sector == SectorSize(512, os.stat(img).st_blksize)
        assert not (image.readonly or image.nocache or image.direct or image.block_device)
        assert image.discard and image.dio is None
        assert not os.get_inheritable(image.fd) and os.get_blocking(image.fd)
        assert os.read(image.fd, 1) == b"\0"
        assert repr(image) == f"<Image {img} {MiB} bytes {image.sector} rw>"
    finally:
        image.close()
        image.close()


def test_options_set_the_open_flags(img: Path) -> None:
    image = open_image(img, ImageOptions(readonly=True, direct=True, nodelete=True,
                                         sectorsize=SectorSize(4096, 4096)))
    try:
        flags = fcntl.fcntl(image.fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY and flags & os.O_SYNC == os.O_SYNC
        assert image.readonly and image.direct and not image.discard
        assert image.sector == SectorSize(4096, 4096)
        with pytest.raises(OSError):
            os.write(image.fd, b"x")
    finally:
        image.close()


def test_identity_changes_with_the_contents(img: Path) -> None:
    image = open_image(img)
    try:
        first = image.identity()
        st = os.stat(img)
        assert first == ImageIdentity(st.st_dev, st.st_ino, 0, MiB, st.st_mtime_ns)
        assert first.differences(first) == []
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert image.identity().differences(first) == ["it was modified"]
    finally:
        image.close()
    other = open_image(make_image(img.with_name("other.img"), 2 * MiB))
    try:
        assert other.identity().differences(first)[:2] == [
            "it is another file", f"its size is {2 * MiB} bytes, not {MiB}"]
    finally:
        other.close()


def test_a_missing_image_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path / "nope.img") == f"{tmp_path / 'nope.img'}: no such file"
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert refusal(tmp_path / "link") == f"{tmp_path / 'link'}: no such file"
    assert refusal(tmp_path / "link" / "x") == f"{tmp_path / 'link' / 'x'}: no such file"
    assert refusal("") == "no disk image path given"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path) == (f"{tmp_path} is a directory; a disk image is a regular "
                                 f"file or a block device")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert "is a FIFO (named pipe); a disk image is" in refusal(tmp_path / "fifo")


def test_a_character_device_and_a_socket_are_refused(tmp_path: Path) -> None:
    assert refusal("/dev/null", ImageOptions(readonly=True)) == (
        "/dev/null is a character device; a disk image is a regular file or a block device")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        assert f"{tmp_path / 'sock'} is a socket" in refusal(tmp_path / "sock")


def test_an_empty_image_is_refused(tmp_path: Path) -> None:
    path = make_image(tmp_path / "empty.img", 0)
    assert refusal(path) == f"{path} is empty (0 bytes)"


@pytest.mark.parametrize(("size", "sectorsize"), [(1000, None), (6144, "4096"),
                                                   (MiB + 512, "4096/4096")])
def test_a_size_that_is_not_whole_sectors_is_refused(tmp_path: Path, size: int,
                                                     sectorsize: str | None) -> None:
    path = make_image(tmp_path / "odd.img", size)
    options = ImageOptions(sectorsize=parse_sectorsize(sectorsize) if sectorsize else None)
    logical = options.sectorsize.logical if options.sectorsize else 512
    assert refusal(path, options) == (f"{path}: its size, {size} bytes, is not a multiple of "
                                      f"the {logical}-byte sector size")


OPEN_AND_PRINT = """
import sys
from hvf.errors import ImageError
from hvf.plugins.block.image import open_image
from hvf.plugins.block.options import ImageOptions
try:
    open_image(sys.argv[1], ImageOptions(readonly=True)).close()
except ImageError as e:
    print(e)
"""


def test_a_file_without_read_permission_is_refused(img: Path) -> None:
    img.chmod(0)
    if not ROOT:
        message = refusal(img, ImageOptions(readonly=True))
    elif shutil.which("setpriv") is None:
        pytest.skip("root reads any file; setpriv (to drop CAP_DAC_OVERRIDE) is missing")
    else:
        message = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable,
             "-c", OPEN_AND_PRINT, str(img)], capture_output=True, text=True,
            check=True).stdout.strip()
    assert message == f"{img}: permission denied (opening it read-only)"


@pytest.mark.parametrize(("code", "readonly", "message"), [
    (errno.EACCES, True, "{}: permission denied (opening it read-only)"),
    (errno.EACCES, False, "{}: permission denied (opening it read-write); add ro if it only "
                          "needs to be read"),
    (errno.EROFS, False, "{} is on a read-only file system; add ro to open it read-only"),
    (errno.EINVAL, False, "{}: cannot open it read-write: Invalid argument"),
])
def test_open_failures_are_explained(img: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                                     readonly: bool, message: str) -> None:
    real_open = os.open

    def failing_open(path: str, flags: int, *args: int) -> int:
        if path == str(img):
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", failing_open)
    assert refusal(img, ImageOptions(readonly=readonly)) == message.format(img)


def test_refusals_end_hvf_with_status_4(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        open_image(tmp_path / "nope.img")
    assert info.value.exit_status == 4


# ---- direct I/O ----


def test_nocache_opens_o_direct_with_the_alignment_it_needs(direct_dir: Path) -> None:
    image = open_image(make_image(direct_dir / "d.img"), ImageOptions(nocache=True))
    try:
        assert fcntl.fcntl(image.fd, fcntl.F_GETFL) & os.O_DIRECT
        assert image.dio is not None and image.dio.offset >= 512
        assert image.sector.logical % image.dio.offset == 0
    finally:
        image.close()


def test_nocache_is_refused_where_the_file_system_cannot(img: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    assert refusal(img, ImageOptions(nocache=True)) == (
        f"{img}: the file system cannot do direct I/O, which nocache needs; drop nocache")


@pytest.mark.skipif(not ROOT, reason="mounting ramfs needs root")
def test_nocache_on_ramfs_is_refused(tmp_path: Path) -> None:
    where = tmp_path / "ramfs"
    where.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount ramfs here")
    try:
        path = make_image(where / "r.img")
        assert "cannot do direct I/O, which nocache needs" in refusal(
            path, ImageOptions(nocache=True))
        open_image(path).close()
    finally:
        subprocess.run(["umount", str(where)], check=True)


# ---- block devices (loop devices, as root) ----


#: ``loop(size, sector)``: a new loop device over a new sparse file, and the file.
Loop = Callable[..., tuple[str, Path]]


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    """A function making a loop device over a new sparse file: ``loop(size, sector)``."""
    if not ROOT or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    made: list[str] = []

    def make(size: int = 4 * MiB, sector: int = 512) -> tuple[str, Path]:
        backing = make_image(tmp_path / f"loop{len(made)}.img", size)
        run = subprocess.run(["losetup", "--find", "--show", "--sector-size", str(sector),
                              str(backing)], capture_output=True, text=True)
        if run.returncode:
            pytest.skip(f"cannot set up a loop device: {run.stderr.strip()}")
        made.append(run.stdout.strip())
        return made[-1], backing

    yield make
    for device in made:
        subprocess.run(["losetup", "-d", device], check=True)


def test_a_block_device_has_the_devices_size_and_sectors(loop: Loop) -> None:
    device, _ = loop(4 * MiB, 4096)
    image = open_image(device)
    try:
        assert stat.S_ISBLK(os.fstat(image.fd).st_mode) and image.block_device
        assert image.size == 4 * MiB
        assert image.sector.logical == 4096 and image.sector.physical >= 4096
        st = os.stat(device)
        assert image.identity() == ImageIdentity(st.st_dev, st.st_ino, st.st_rdev, 4 * MiB,
                                                 st.st_mtime_ns)
    finally:
        image.close()


def test_a_block_device_in_use_read_write_is_refused_naming_the_user(loop: Loop) -> None:
    device, _ = loop()
    image = open_image(device)
    try:
        expected = f"{device} is in use: open read-write by pid {os.getpid()} ("
        assert refusal(device).startswith(expected)
        assert refusal(device, ImageOptions(readonly=True)).startswith(expected)
    finally:
        image.close()
    open_image(device, ImageOptions(readonly=True)).close()


def test_nocache_on_a_4k_device_needs_4k_sectors(loop: Loop) -> None:
    device, _ = loop(MiB, 4096)
    assert refusal(device, ImageOptions(nocache=True, sectorsize=SectorSize(512, 4096))) == (
        f"{device}: sector size 512 is not a multiple of 4096 bytes, the alignment nocache "
        f"(O_DIRECT) needs here; use sectorsize=4096 or drop nocache")
    image = open_image(device, ImageOptions(nocache=True))
    try:
        assert image.dio is not None and image.dio.offset == 4096
        assert image.sector.logical == 4096
    finally:
        image.close()


def test_io_and_discard_on_a_loop_device_reach_the_backing_file(loop: Loop) -> None:
    device, backing = loop(4 * MiB)
    results: list[tuple[Status, int]] = []
    backend = BlockBackend(open_image(device, ImageOptions(nocache=True)), threads=2)
    try:
        data = os.urandom(2 * MiB)
        backend.write(MiB, [bytearray(data)], lambda s, n: results.append((s, n)))
        backend.drain()
        backend.flush(lambda s, n: results.append((s, n)))
        backend.drain()
        assert results == [(Status.OK, 2 * MiB), (Status.OK, 0)]
        with open(backing, "rb") as f:
            f.seek(MiB)
            assert f.read(2 * MiB) == data
        allocated = os.stat(backing).st_blocks
        backend.discard(MiB, MiB, lambda s, n: results.append((s, n)))
        backend.drain()
        assert results[-1] == (Status.OK, MiB)
        out = bytearray(MiB)
        backend.read(MiB, [out], lambda s, n: results.append((s, n)))
        backend.drain()
        assert results[-1] == (Status.OK, MiB) and out == bytes(MiB)
        assert os.stat(backing).st_blocks < allocated
    finally:
        backend.close()
