# SPDX-License-Identifier: BSD-2-Clause
"""A snapshot on disk: a directory holding ``state`` and the RAM file it names.

::

    PATH/                       mode 0700
        state                   the state file (:mod:`.statefile`)
        ram-20260101T120000Z-1a2b3c4d   guest RAM (:mod:`.ramfile`), named by ``state``
        ram-20260101T120500Z-5e6f7a8b   a RAM layer (:mod:`.layers`), if incremental

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

An incremental save keeps the RAM file and layers of the snapshot it builds on and
adds a layer. Built on a snapshot in another directory, it first hard-links that one's
files into its own (they are never modified, so two snapshots may share them, and
removing either leaves the other whole); across file systems it is refused.
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
from hvf.extents import PAGE
from hvf.plugins.snapshot.layers import (
    Run,
    apply_layer,
    check_layer,
    layer_entries,
    verify_layer,
    write_layer,
)
from hvf.plugins.snapshot.ramfile import (
    Progress,
    RamSource,
    check_file,
    open_ram,
    save_ram,
    verify_ram,
)
from hvf.plugins.snapshot.statefile import (
    MAGIC,
    StateFile,
    describe,
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
             progress: Progress | None = None, background_cleanup: bool = False
             ) -> dict[str, Any]:
        """Save guest RAM and device state; the previous snapshot survives any crash.
        Returns the state file's ``ram`` section (what :meth:`save_incremental` builds on).

        With ``background_cleanup`` the replaced RAM files are deleted on a thread after
        the commit (a big, fragmented file can take a while); :func:`wait_for_cleanups`
        waits for that.
        """
        chunks = _checked(chunks)
        self._prepare_dir()
        with self._locked():
            ram_name = _new_ram_name()
            info = save_ram(memory, self.path / ram_name, progress=progress)
            ram = {"file": ram_name, **info}
            self._commit(machine, ram, chunks, new=[ram_name],
                         background_cleanup=background_cleanup)
        return ram

    def save_incremental(self, *, memory: RamSource, machine: Mapping[str, Any],
                         chunks: Iterable[Chunk], base: Path, base_ram: Mapping[str, Any],
                         dirty: list[Run], progress: Progress | None = None,
                         background_cleanup: bool = False) -> dict[str, Any]:
        """Save device state and only the ``dirty`` pages of guest RAM, as a layer over
        the snapshot in ``base`` whose ``ram`` section was ``base_ram`` (which must still
        be what that snapshot holds); returns the new ``ram`` section."""
        chunks = _checked(chunks)
        base = Path(base)
        self._prepare_dir()
        with self._locked():
            names = _ram_names(base_ram)
            if _held_ram(base) != names:
                raise SnapshotError(
                    f"cannot write an incremental snapshot: {base}, the checkpoint it would "
                    f"build on, has changed since this VM wrote it (take a full checkpoint)")
            linked = [] if base.resolve() == self.path.resolve() else self._link(base, names)
            if progress:
                progress(0, memory.size)
            layers = layer_entries(dict(base_ram), str(base / STATE))
            new = linked
            if dirty:
                try:
                    layer = write_layer(memory, self.path / _new_ram_name(), dirty)
                except BaseException:
                    self._remove(linked)
                    raise
                layers = [*layers, layer]
                new = [*linked, layer["file"]]
            ram = {**base_ram, "layers": layers}
            self._commit(machine, ram, chunks, new=new, background_cleanup=background_cleanup)
            if progress:
                progress(memory.size, memory.size)
        return ram

    def _link(self, base: Path, names: list[str]) -> list[str]:
        """Hard-link the RAM files ``names`` of the snapshot in ``base`` into this one."""
        done: list[str] = []
        try:
            for name in names:
                target = self.path / name
                if target.exists() and os.path.samefile(base / name, target):
                    continue  # linked by an earlier save here
                os.link(base / name, target)
                done.append(name)
        except OSError as e:
            self._remove(done)
            if e.errno == errno.EXDEV:
                raise SnapshotError(f"cannot write an incremental snapshot into {self.path}: "
                                    f"it is on another file system than {base}, the "
                                    f"checkpoint it builds on (use that directory, one on "
                                    f"its file system, or a full checkpoint)") from None
            raise SnapshotError(f"cannot link {base / name} into {self.path}: "
                                f"{e.strerror}") from None
        return done

    def _commit(self, machine: Mapping[str, Any], ram: dict[str, Any], chunks: list[Chunk], *,
                new: list[str], background_cleanup: bool) -> None:
        """Replace ``state`` (the commit point), then remove the RAM files it no longer
        names; on failure remove the files this save made (``new``) unless committed."""
        try:
            write_state(self.path / STATE, machine=machine, ram=ram, chunks=chunks)
        except BaseException:
            if _held_ram(self.path) != _ram_names(ram):
                self._remove(new)
            raise
        stale = self._stale(keep=set(_ram_names(ram)))
        if not background_cleanup:
            self._remove(stale)
            return
        cleaner = threading.Thread(target=self._remove, args=(stale,),
                                   name="hvf snapshot cleanup", daemon=True)
        _cleanups.append(cleaner)
        cleaner.start()

    def _stale(self, *, keep: set[str]) -> list[str]:
        """RAM files other than those in ``keep`` and leftovers of interrupted saves."""
        return [name for name in os.listdir(self.path) if name not in keep
                and (_RAM_NAME.fullmatch(name) or _TEMP_NAME.fullmatch(name))]

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
        ram = self._ram_path(state, state_path)
        self._layers(state, state_path)
        return state, ram

    def open_ram(self, ram: Path, size: int) -> int:
        """The RAM file ``load`` named, opened for a restored VM to map."""
        return open_ram(ram, size)

    def load_layers(self, state: StateFile, view: memoryview) -> None:
        """Read the snapshot's RAM layers, oldest first, over guest RAM mapped from its
        RAM file (``view``); nothing for a full snapshot."""
        for path, runs, _entry in self._layers(state, self.path / STATE):
            apply_layer(path, runs, view)

    def verify(self) -> StateFile:
        """Load the snapshot and check every checksum, the RAM files' data included."""
        state, ram = self.load()
        verify_ram(ram, state.ram)
        for path, _runs, entry in self._layers(state, self.path / STATE):
            verify_layer(path, entry)
        return state

    def _layers(self, state: StateFile, state_path: Path
                ) -> list[tuple[Path, list[Run], dict[str, Any]]]:
        """Each RAM layer's file, its checked runs and its entry."""
        pages = int(state.ram["size"]) // PAGE
        found = []
        for i, entry in enumerate(layer_entries(state.ram, str(state_path))):
            name = entry.get("file")
            if not isinstance(name, str) or not _RAM_NAME.fullmatch(name):
                raise SnapshotError(f"{state_path}: refusing RAM layer name {name!r}: it must "
                                    f"be a plain 'ram-...' name inside {self.path}")
            path = self.path / name
            found.append((path, check_layer(path, entry, pages, f"{state_path}, layer {i + 1}"),
                          entry))
        return found

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
        check_file(path, size, "RAM file",
                   missing=f"{self.path}: the RAM file '{name}' that '{STATE}' names is missing",
                   recorded="the snapshot records")
        return path


def _checked(chunks: Iterable[Chunk]) -> list[Chunk]:
    """``chunks``, refused now if a save would fail on them (before the RAM write)."""
    chunks = list(chunks)
    seen: set[str] = set()
    for chunk in chunks:
        if chunk.name in seen:
            raise SnapshotError(f"cannot save: two chunks named '{chunk.name}'")
        seen.add(chunk.name)
        encode_fields(chunk.fields, where=f"chunk '{chunk.name}'")
    return chunks


def _ram_names(ram: Mapping[str, Any]) -> list[str]:
    """The RAM file and the layers a ``ram`` section names, base first."""
    layers = ram.get("layers", [])
    return [ram.get("file"), *(e.get("file") for e in layers if isinstance(e, dict))]


def _held_ram(path: Path) -> list[str] | None:
    """What the snapshot in ``path`` names now (None: no readable snapshot)."""
    try:
        return _ram_names(read_state(path / STATE).ram)
    except SnapshotError:
        return None
