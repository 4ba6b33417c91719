# SPDX-License-Identifier: BSD-2-Clause
"""Image locking: read-only users share, a read-write user excludes everyone else, in
one process (OFD locks conflict between open file descriptions) and across processes,
with the refusal naming the holder; locks go with the image."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hvf.errors import ImageError
from hvf.plugins.block import lock
from hvf.plugins.block.image import Image, open_image
from hvf.plugins.block.options import ImageOptions

RO = ImageOptions(readonly=True)
RW = ImageOptions()
SHARE_HINT = "; an image can be shared only when every user opens it read-only (ro)"


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return path


@pytest.fixture
def opened() -> Iterator[list[Image]]:
    images: list[Image] = []
    yield images
    for image in images:
        image.close()


def me() -> str:
    with open("/proc/self/comm") as f:
        return f"pid {os.getpid()} ({f.read().strip()})"


def refusal(path: Path, options: ImageOptions) -> str:
    with pytest.raises(ImageError) as info:
        open_image(path, options).close()
    return str(info.value)


def test_read_only_users_share_an_image(img: Path, opened: list[Image]) -> None:
    opened.extend(open_image(img, RO) for _ in range(3))


def test_a_second_writer_is_refused_naming_the_first(img: Path, opened: list[Image]) -> None:
    opened.append(open_image(img, RW))
    assert refusal(img, RW) == f"{img} is in use: open read-write by {me()}{SHARE_HINT}"


def test_a_reader_is_refused_while_a_writer_has_the_image(img: Path,
                                                          opened: list[Image]) -> None:
    opened.append(open_image(img, RW))
    assert refusal(img, RO) == f"{img} is in use: open read-write by {me()}{SHARE_HINT}"


def test_a_writer_is_refused_while_readers_have_the_image(img: Path,
                                                          opened: list[Image]) -> None:
    opened.extend(open_image(img, RO) for _ in range(2))
    assert refusal(img, RW) == f"{img} is in use: open read-only by {me()}{SHARE_HINT}"


def test_closing_an_image_drops_its_lock(img: Path) -> None:
    open_image(img, RW).close()
    open_image(img, RW).close()
    reader = open_image(img, RO)
    reader.close()
    open_image(img, RW).close()


def test_a_refused_open_takes_nothing(img: Path, opened: list[Image]) -> None:
    first = open_image(img, RO)
    refusal(img, RW)
    first.close()
    opened.append(open_image(img, RW))


def test_locks_follow_the_images_inode_not_its_name(img: Path, opened: list[Image]) -> None:
    (img.parent / "alias").symlink_to(img)
    os.link(img, img.parent / "hardlink")
    opened.append(open_image(img, RW))
    assert "open read-write by" in refusal(img.parent / "alias", RO)
    assert "open read-write by" in refusal(img.parent / "hardlink", RW)


HOLDER = """
import sys
from hvf.plugins.block.image import open_image
from hvf.plugins.block.options import ImageOptions
image = open_image(sys.argv[1], ImageOptions(readonly=sys.argv[2] == "ro"))
print("ready", flush=True)
sys.stdin.read()
"""


#: ``child(mode)``: a process holding the image open ``ro`` or ``rw``.
Child = Callable[[str], "subprocess.Popen[str]"]


@pytest.fixture
def child(img: Path) -> Iterator[Child]:
    """``child(mode)``: a process holding ``img`` open ``ro`` or ``rw`` until the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(img), mode],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        return proc

    yield start
    for proc in procs:
        proc.communicate("", timeout=30)


def test_another_process_holding_the_image_is_named(img: Path, child: Child) -> None:
    proc = child("rw")
    comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
    assert refusal(img, RW) == (f"{img} is in use: open read-write by pid {proc.pid} "
                                f"({comm}){SHARE_HINT}")
    assert "open read-write by" in refusal(img, RO)
    proc.communicate("", timeout=30)
    open_image(img, RW).close()


def test_another_process_may_share_read_only(img: Path, child: Child, opened: list[Image]) -> None:
    proc = child("ro")
    opened.append(open_image(img, RO))
    assert f"pid {proc.pid} (" in refusal(img, RW)


def test_a_holder_that_cannot_be_seen_is_another_process(img: Path, opened: list[Image],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    opened.append(open_image(img, RW))
    monkeypatch.setattr(lock, "holders", lambda *args, **kwargs: [])
    assert refusal(img, RW) == (f"{img} is in use: open read-write by another "
                                f"process{SHARE_HINT}")


def test_an_exclusive_posix_lock_keeps_every_user_out(img: Path) -> None:
    with open(img, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, lock.PERM_BASE, os.SEEK_SET)
        message = refusal(img, RO)
    assert message == f"{img} is in use: locked exclusively by {me()}{SHARE_HINT}"
    open_image(img, RO).close()


def test_qemu_style_users_are_respected(img: Path, opened: list[Image]) -> None:
    """A writer that only holds QEMU's "write" byte, and a user that only refuses
    resizing (as ``qemu-img`` does), are both seen."""
    fd = os.open(img, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhxxxxqqixxxx", fcntl.F_RDLCK, 0,
                                                       lock.PERM_BASE + lock.PERM_WRITE, 1, 0))
        assert "open read-write by" in refusal(img, RO)
    finally:
        os.close(fd)
    fd = os.open(img, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhxxxxqqixxxx", fcntl.F_RDLCK, 0,
                                                       lock.PERM_BASE + lock.PERM_RESIZE, 1, 0))
        assert "open for resizing by" in refusal(img, RO)
    finally:
        os.close(fd)


def test_a_file_system_without_locks_leaves_the_image_unlocked(
        img: Path, opened: list[Image], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real_fcntl = fcntl.fcntl

    def no_locks(fd: int, cmd: int, arg: bytes | int = 0) -> bytes | int:
        if cmd == fcntl.F_OFD_SETLK:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_locks)
    with caplog.at_level(logging.WARNING, logger="hvf.block"):
        opened.extend(open_image(img, RW) for _ in range(2))
    assert f"{img}: cannot lock the image (No locks available)" in caplog.text


def test_fdinfo_lock_lines_are_read_for_their_ranges() -> None:
    info = ("pos:\t0\nflags:\t02100002\nlock:\t1: OFDLCK ADVISORY  READ -1 fe:00:7 100 101\n"
            "lock:\t2: POSIX  ADVISORY  WRITE 42 fe:00:7 300 EOF\n"
            "lock:\t3: -> OFDLCK ADVISORY  READ -1 fe:00:7 200 200\n")
    assert [byte for byte in (99, 100, 101, 102, 200, 300, 10**9)
            if lock._covers(info, byte)] == [100, 101, 300, 10**9]
    assert lock.names([lock.Holder(p, fd, "hvf") for p in range(1, 6) for fd in (3, 4)]) == (
        "pid 1 (hvf), pid 2 (hvf), pid 3 (hvf) and 2 more")
    assert str(lock.Holder(7, 3, "")) == "pid 7"
