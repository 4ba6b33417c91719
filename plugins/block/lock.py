# SPDX-License-Identifier: BSD-2-Clause
"""Image locking with open file description (OFD) locks, in QEMU's byte layout.

Every user of an image takes shared (read) locks on single bytes of it: byte
``100 + p`` says "I use permission *p*", byte ``200 + p`` says "I let nobody else use
*p*" (*p*: 0 consistent read, 1 write, 3 resize; the layout of QEMU's ``file-posix``
driver, so hvf and QEMU keep each other off an image). Taking the locks never waits;
the user then asks (``F_OFD_GETLK`` for an exclusive lock) whether any other open file
description holds a byte that contradicts its own, and refuses if one does.

The semantics hvf chooses, QEMU's default (``share-rw=off``):

* every user holds *read* and refuses other writers and resizers
  (100, 201, 203);
* a read-write user also holds *write* (101).

So any number of read-only users may share an image; a read-write user excludes every
other user, reader or writer, because a reader of an image that changes underneath it
sees a file system that is never consistent. The checks run after the locks are taken,
so of two users that race, at least one sees the other (both may refuse; neither runs
unprotected).

OFD locks belong to the open file description, not the process: two opens in one
process conflict, locks are not inherited across ``fork`` into a new description, and
they go when the last descriptor of the description closes. The kernel does not report
an OFD lock's owner, so a refusal names the holder by finding, in ``/proc/*/fdinfo``,
the descriptors of the image whose lock ranges cover the contested byte (other users'
processes are visible to root only; otherwise the message says "another process").

A file system without OFD lock support (some FUSE or NFS mounts) leaves the image
unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

import attrs

from hvf.errors import ImageError

log = logging.getLogger("hvf.block")

PERM_BASE = 100
UNSHARE_BASE = 200
PERM_READ = 0
PERM_WRITE = 1
PERM_RESIZE = 3

#: The bytes another user may hold that contradict ours, checked in this order, with
#: what the image is to a holder of each. A writer also checks ``UNSHARE_BASE + PERM_WRITE``
#: (another user refuses writers), a reader does not.
_CONTRADICTIONS = (
    (PERM_BASE + PERM_WRITE, "open read-write"),
    (UNSHARE_BASE + PERM_WRITE, "open read-only"),
    (PERM_BASE + PERM_RESIZE, "open for resizing"),
    (UNSHARE_BASE + PERM_READ, "locked against other readers"),
)

#: struct flock on Linux x86-64: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhxxxxqqixxxx")
#: errnos that mean the file system cannot take OFD locks.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@attrs.frozen
class Holder:
    """A process whose descriptor ``fd`` holds a lock on the image."""

    pid: int
    fd: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})" if self.command else f"pid {self.pid}"


def _set(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))


def _contested(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte``."""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
    return int(_FLOCK.unpack(answer)[0]) != fcntl.F_UNLCK


def _covers(fdinfo: str, byte: int) -> bool:
    """Whether a record lock (OFD or POSIX) listed in a ``/proc/PID/fdinfo/FD`` text
    covers ``byte``."""
    for line in fdinfo.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0] == "lock:" and fields[2] in ("OFDLCK", "POSIX"):
            end = fields[-1]
            if int(fields[-2]) <= byte and (end == "EOF" or byte <= int(end)):
                return True
    return False


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def holders(st: os.stat_result, byte: int, *, exclude_fd: int | None = None) -> list[Holder]:
    """The processes visible to us with a descriptor of the file ``st`` describes
    holding a record lock on ``byte`` (our own ``exclude_fd`` left out)."""
    found = []
    me = str(os.getpid())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for name in fds:
            if entry.name == me and name == str(exclude_fd):
                continue
            try:
                target = os.stat(f"/proc/{entry.name}/fd/{name}")
                if (target.st_dev, target.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"/proc/{entry.name}/fdinfo/{name}") as f:
                    info = f.read()
            except OSError:
                continue
            if _covers(info, byte):
                found.append(Holder(int(entry.name), int(name), _command(entry.name)))
    return found


def names(found: list[Holder]) -> str:
    """"pid N (command)" for each process of ``found`` (three at most), or "another
    process" when none could be seen."""
    unique = list({holder.pid: str(holder) for holder in found}.values())
    if not unique:
        return "another process"
    text = ", ".join(unique[:3])
    return text + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")


def in_use(path: str, how: str, who: str) -> str:
    """The refusal of an image that is ``how`` ("open read-write") by ``who``."""
    return (f"{path} is in use: {how} by {who}; an image can be shared only when every "
            f"user opens it read-only (ro)")


def lock_image(fd: int, path: str, *, writable: bool) -> None:
    """Lock the image open on ``fd`` for a read-only or a read-write user, or raise
    :class:`~hvf.errors.ImageError` naming the user in the way. On a refusal the caller
    closes ``fd``, which drops whatever was taken."""
    held = (PERM_READ, PERM_WRITE) if writable else (PERM_READ,)
    byte = PERM_BASE
    try:
        for byte in (*(PERM_BASE + p for p in held),
                     UNSHARE_BASE + PERM_WRITE, UNSHARE_BASE + PERM_RESIZE):
            _set(fd, byte)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            log.warning("%s: cannot lock the image (%s); other programs are not kept from "
                        "using it at the same time", path, e.strerror)
            return
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise ImageError(f"{path}: cannot lock the image: {e.strerror}") from None
        # An exclusive lock on one of our bytes: a program that wants the image alone.
        who = names(holders(os.fstat(fd), byte, exclude_fd=fd))
        raise ImageError(in_use(path, "locked exclusively", who)) from None
    for byte, how in _CONTRADICTIONS:
        if byte == UNSHARE_BASE + PERM_WRITE and not writable:
            continue
        if _contested(fd, byte):
            who = names(holders(os.fstat(fd), byte, exclude_fd=fd))
            raise ImageError(in_use(path, how, who))
