# SPDX-License-Identifier: BSD-2-Clause
"""A snapshot on disk: a directory holding ``state`` and the RAM file it names.

::

    PATH/                       mode 0700
        state                   the state file (:mod:`.statefile`)
        ram-20260101T120000Z-1a2b3c4d   guest RAM (:mod:`.ramfile`), named by ``state``

Every save writes a RAM file under a new name and then replaces ``state``; the
rename of ``state`` is the commit point. Until then the previous ``state`` and the
RAM file it names are untouched, so a crash or SIGKILL at any moment leaves the
previous snapshot whole. After the commit, RAM files the new ``state`` does not name
(and temporary files of interrupted saves) are removed. A RAM file is never modified
in place, so a VM still running from a ``MAP_PRIVATE`` mapping of an older one is
safe: unlinking a mapped file keeps its pages.

A save creates the directory (never its parents) or reuses one that holds only hvf's
files: a ``state`` that begins with hvf's magic, RAM files and leftovers of saves, all
regular files; anything else there is refused by name and left alone. Saves into one
directory are serialised with ``flock`` on the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hvf.errors import SnapshotError
from hvf.plugins.snapshot.ramfile import Progress, RamSource, open_ram, save_ram, verify_ram
from hvf.plugins.snapshot.statefile import (
    MAGIC,
    describe,
    StateFile,
    encode_fields,
    fsync_dir,
    read_state,
    write_state,
)
from hvf.snapshot_api import Chunk

STATE = "state"
#: Names this store creates: RAM files and the temporary files of saves in progress.
_RAM_NAME = re.compile(r"ram-\d{8}T\d{6}Z-[0-9a-f]{8}")
_TEMP_NAME = re.compile(r"\.(state|ram-\d{8}T\d{6}Z-[0-9a-f]{8})\.tmp-[0-9a-f]{12}")


def _new_ram_name() -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"ram-{stamp}-{secrets.token_hex(4)}"


def _ours(name: str) -> bool:
    return name == STATE or bool(_RAM_NAME.fullmatch(name) or _TEMP_NAME.fullmatch(name))


_cleanups: list[threading.Thread] = []


def wait_for_cleanups(timeout: float = 60.0) -> None:
    """Let pending removals of replaced RAM files finish (before the process exits)."""
    while _cleanups:
        _cleanups.pop().join(timeout)


class SnapshotStore:
    """The snapshot directory at ``path``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.path)!r})"

    # --- saving ---------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        """Create the directory (not its parents), or check that what a save would
        replace in it is hvf's own."""
        try:
            self.path.mkdir(mode=0o700)
            return
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise SnapshotError(f"cannot create snapshot directory {self.path}: its parent "
                                f"{self.path.parent} does not exist") from None
        except OSError as e:
            raise SnapshotError(f"cannot create snapshot directory {self.path}: "
                                f"{e.strerror}") from None
        if not self.path.is_dir():
            raise SnapshotError(f"cannot save a snapshot to {self.path}: it exists and is "
                                f"not a directory")
        try:
            names = sorted(os.listdir(self.path))
        except OSError as e:
            raise SnapshotError(f"cannot read snapshot directory {self.path}: "
                                f"{e.strerror}") from None
        foreign = [n for n in names if not _ours(n)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise SnapshotError(f"refusing to save a snapshot into {self.path}: it holds "
                                f"files that are not hvf's ({shown})")
        for name in names:
            problem = self._not_replaceable(name)
            if problem:
                raise SnapshotError(f"refusing to save a snapshot into {self.path}: "
                                    f"{self.path / name} {problem}")

    def _not_replaceable(self, name: str) -> str | None:
        """Why a save must not replace or remove the entry ``name`` (None: it may)."""
        path = self.path / name
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                return "is not a regular file"
            if name != STATE:
                return None
            with open(path, "rb") as f:
                head = f.read(len(MAGIC))
        except FileNotFoundError:
            return None  # removed meanwhile: nothing to replace
        except OSError as e:
            return f"cannot be checked: {e.strerror}"
        return None if head == MAGIC else "is not an hvf state file"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise SnapshotError(f"{self.path}: another save to this snapshot is in "
                                        f"progress") from None
                raise
            yield
        finally:
            os.close(fd)

    def save(self, *, memory: RamSource, machine: Mapping[str, Any], chunks: Iterable[Chunk],
             progress: Progress | None = None, background_cleanup: bool = False) -> None:
        """Save guest RAM and device state; the previous snapshot survives any crash.

        With ``background_cleanup`` the replaced RAM files are deleted on a thread after
        the commit (a big, fragmented file can take a while); :func:`wait_for_cleanups`
        waits for that.
        """
        chunks = list(chunks)
        seen: set[str] = set()
        for chunk in chunks:  # refuse bad device state before the long RAM write
            if chunk.name in seen:
                raise SnapshotError(f"cannot save: two chunks named '{chunk.name}'")
            seen.add(chunk.name)
            encode_fields(chunk.fields, where=f"chunk '{chunk.name}'")
        self._prepare_dir()
        with self._locked():
            ram_name = _new_ram_name()
            ram_path = self.path / ram_name
            info = save_ram(memory, ram_path, progress=progress)
            try:
                write_state(self.path / STATE, machine=machine,
                            ram={"file": ram_name, **info}, chunks=chunks)
            except BaseException:
                if not self._committed(ram_name):
                    with contextlib.suppress(OSError):
                        ram_path.unlink()
                raise
            stale = self._stale(keep=ram_name)
            if not background_cleanup:
                self._remove(stale)
        if background_cleanup:
            cleaner = threading.Thread(target=self._remove, args=(stale,),
                                       name="hvf snapshot cleanup", daemon=True)
            _cleanups.append(cleaner)
            cleaner.start()

    def _committed(self, ram_name: str) -> bool:
        """Whether ``state`` names ``ram_name`` (a failure after the rename, say)."""
        try:
            return read_state(self.path / STATE).ram.get("file") == ram_name
        except SnapshotError:
            return False

    def _stale(self, *, keep: str) -> list[str]:
        """RAM files other than ``keep`` and leftovers of interrupted saves."""
        return [name for name in os.listdir(self.path)
                if name != keep and (_RAM_NAME.fullmatch(name) or _TEMP_NAME.fullmatch(name))]

    def _remove(self, names: list[str]) -> None:
        removed = False
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / name)
                removed = True
        if removed:
            fsync_dir(self.path)

    # --- loading --------------------------------------------------------------------

    def load(self) -> tuple[StateFile, Path]:
        """The snapshot's state and the path of its RAM file, both checked."""
        if not self.path.exists():
            raise SnapshotError(f"{self.path}: no such snapshot (the directory does not "
                                f"exist)")
        if not self.path.is_dir():
            raise SnapshotError(f"{self.path}: not a snapshot directory (a snapshot is a "
                                f"directory holding 'state' and a RAM file)")
        state_path = self.path / STATE
        if not state_path.exists() and not state_path.is_symlink():
            raise SnapshotError(f"{self.path}: not an hvf snapshot (it has no '{STATE}' file)")
        state = read_state(state_path)
        return state, self._ram_path(state, state_path)

    def open_ram(self, ram: Path, size: int) -> int:
        """The RAM file ``load`` named, opened for a restored VM to map."""
        return open_ram(ram, size)

    def verify(self) -> StateFile:
        """Load the snapshot and check every checksum, the RAM file's data included."""
        state, ram = self.load()
        verify_ram(ram, state.ram)
        return state

    @staticmethod
    def describe(state: StateFile) -> str:
        """A snapshot's manifest as text (``hvf snapshot info``)."""
        return describe(state)

    def _ram_path(self, state: StateFile, state_path: Path) -> Path:
        ram = state.ram
        name = ram.get("file")
        size = ram.get("size")
        if not isinstance(name, str) or not name:
            raise SnapshotError(f"{state_path}: names no RAM file")
        if (name in (".", "..") or "/" in name or "\0" in name
                or not _RAM_NAME.fullmatch(name)):
            raise SnapshotError(f"{state_path}: refusing RAM file name {name!r}: it must be "
                                f"a plain 'ram-...' name inside {self.path}")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise SnapshotError(f"{state_path}: records no valid RAM size ({size!r})")
        path = self.path / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise SnapshotError(f"{self.path}: the RAM file '{name}' that '{STATE}' names is "
                                f"missing") from None
        except OSError as e:
            raise SnapshotError(f"{path}: cannot stat RAM file: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{path}: the RAM file is not a regular file")
        if st.st_size != size:
            raise SnapshotError(f"{path}: the RAM file is {st.st_size} bytes but the snapshot "
                                f"records {size} (truncated or replaced)")
        return path
