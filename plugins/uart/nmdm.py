# SPDX-License-Identifier: BSD-2-Clause
"""bhyve's null-modem consoles on Linux, where nmdm(4) does not exist.

``-l com2,/dev/nmdm0A`` makes a pty whose master is hvf's end and the symlink
``/dev/nmdm0B`` to its other side, so ``cu -l /dev/nmdm0B`` or ``screen /dev/nmdm0B``
connects as on FreeBSD (``/dev/nmdm0B`` given to hvf links ``/dev/nmdm0A``). The link
goes when the console closes, and at exit.

One hvf holds pair N at a time: it keeps an exclusive ``flock`` on ``/dev/nmdmN.lock``
(holding its pid) while the console is open. A second claim is refused, naming the
holder. The kernel drops the lock when its holder dies, so links that a killed hvf left
behind belong to nobody and are replaced.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import re
import stat

from hvf.console import Receiver
from hvf.errors import ConfigError
from hvf.eventloop import EventLoop
from hvf.plugins.uart.backends import PtyConsole

log = logging.getLogger("hvf.console")

#: ``/dev/nmdmNA`` or ``/dev/nmdmNB``.
NMDM_PATH = re.compile(r"/dev/nmdm(\d+)([AB])")
#: Links made by open consoles, removed at exit if a close did not get to them.
_links: set[str] = set()


def _remove_links() -> None:
    for link in list(_links):
        _unlink(link)


atexit.register(_remove_links)


def _unlink(path: str) -> None:
    _links.discard(path)
    try:
        os.unlink(path)
    except OSError:
        pass


def is_nmdm(spec: str) -> bool:
    """Whether ``spec`` names a null-modem side that hvf makes: absent, or a link (a
    device node of that name, a real nmdm, is opened as any tty)."""
    if not NMDM_PATH.fullmatch(spec):
        return False
    try:
        return not stat.S_ISCHR(os.lstat(spec).st_mode)
    except FileNotFoundError:
        return True


class NmdmConsole(PtyConsole):
    """A pty with the other side of the pair named by ``spec`` linked to its slave."""

    def open(self, loop: EventLoop, receiver: Receiver) -> None:
        match = NMDM_PATH.fullmatch(self.spec)
        assert match is not None
        number, side = match.groups()
        directory = os.path.dirname(self.spec)
        self.pair = f"nmdm{number}"
        self.link = os.path.join(directory, f"{self.pair}{'B' if side == 'A' else 'A'}")
        self.lock_path = os.path.join(directory, f"{self.pair}.lock")
        self.lock_fd = self._claim()
        try:
            for name in (self.spec, self.link):
                self._remove_stale(name)
            super().open(loop, receiver)
        except BaseException:
            self._release()
            raise

    def publish(self) -> None:
        try:
            os.symlink(self.path, self.link)
        except OSError as e:
            raise ConfigError(f"{self.owner}: cannot create {self.link}: {e.strerror}") from None
        _links.add(self.link)
        log.warning("%s: console on %s (%s); connect with cu -l %s",
                    self.owner, self.link, self.path, self.link)

    def _claim(self) -> int:
        """Take pair N's lock; refuse when another open console holds it."""
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ConfigError(f"{self.owner}: cannot create {self.lock_path} for "
                                  f"{self.spec}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                mine = " (this one)" if holder == str(os.getpid()) else ""
                raise ConfigError(
                    f"{self.owner}: {self.spec}: the null-modem pair {self.pair} is in use "
                    f"by hvf process {holder}{mine}") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:  # else its last holder removed it as we opened it: try again
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)

    def _remove_stale(self, path: str) -> None:
        """Remove a link left by an hvf that died; refuse to touch anything else."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISLNK(mode):
            raise ConfigError(f"{self.owner}: {path} exists and is not a link that hvf "
                              f"made; remove it or use another pair than {self.pair}")
        log.info("%s: replacing %s, left by an hvf that is gone", self.owner, path)
        os.unlink(path)

    def _release(self) -> None:
        os.unlink(self.lock_path)  # while holding the lock: see _claim
        os.close(self.lock_fd)

    def close(self) -> None:
        super().close()
        _unlink(self.link)
        self._release()
