# SPDX-License-Identifier: BSD-2-Clause
"""Incremental RAM layers: the pages a guest dirtied since its last checkpoint.

An incremental checkpoint (``hvf ctl checkpoint --incremental``) writes no full RAM
file. It keeps the RAM file and the layers of the checkpoint it builds on and adds one
layer: a file holding the dirtied pages back to back, in address order, and in the
state file's ``ram`` section an entry naming it::

    "layers": [{"file": "ram-...", "pages": <bytes>, "data_bytes": N,
                "checksum": {"algorithm": "crc32", "value": V}}, ...]

``pages`` is the layer's table: ``(first page, page count)`` pairs, u64 little-endian
each, sorted and disjoint, inside guest RAM; the layer file is exactly their pages, so
page ``first + i`` of a run lies at the run's place in the file. A dirtied page that is
now zero is in the layer (as zeros): it must hide the base's data. The checksum is a
CRC-32 of the file's bytes (the table is covered by the state file's own checksum).

Restoring maps the base RAM file as for a full snapshot, then reads each layer, oldest
first, over it: a layer's pages become the guest's private pages, so a restore costs
the layers' size and nothing for the rest. A state file with layers is format
version 2 (:mod:`.statefile`), which an hvf that knows no layers refuses rather than
restoring the base alone.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hvf.errors import SnapshotError
from hvf.extents import PAGE
from hvf.plugins.snapshot.ramfile import (
    WRITE_CHUNK,
    Checksummer,
    FileWriter,
    RamSource,
    check_file,
    published,
)
from hvf.plugins.snapshot.statefile import temp_name

#: A run of pages: (first page, page count), in the RAM file's layout.
Run = tuple[int, int]

LAYER_CHECKSUM = "crc32"
#: Most layers one snapshot may stack (a hostile state file is bounded by it); a full
#: checkpoint starts a new chain.
MAX_LAYERS = 256
_ENTRY = struct.Struct("<QQ")
#: Bytes read at a time when checking a layer's checksum.
_READ_CHUNK = 8 * 1024 * 1024


def encode_runs(runs: Iterable[Run]) -> bytes:
    """A layer's page table."""
    return b"".join(_ENTRY.pack(first, count) for first, count in runs)


def decode_runs(table: Any, pages: int, where: str) -> list[Run]:
    """A layer's page table, checked: sorted, disjoint, non-empty runs inside the
    ``pages`` pages of guest RAM."""
    if not isinstance(table, bytes) or len(table) % _ENTRY.size:
        raise SnapshotError(f"{where}: malformed page table (not a whole number of "
                            f"{_ENTRY.size}-byte entries)")
    runs: list[Run] = []
    end = 0
    for first, count in _ENTRY.iter_unpack(table):
        if count == 0 or first < end or first + count > pages:
            raise SnapshotError(f"{where}: bad page run {first}+{count} (runs must be "
                                f"sorted, disjoint and inside the guest's {pages} pages)")
        runs.append((first, count))
        end = first + count
    return runs


def write_layer(memory: RamSource, path: Path, runs: Sequence[Run]) -> dict[str, Any]:
    """Write the pages of ``runs`` of guest RAM to a new layer file at ``path``,
    atomically; the layer's entry for the state file."""
    path = Path(path)
    total = sum(count for _, count in runs) * PAGE
    tmp = temp_name(path)
    try:
        out = FileWriter(tmp, total)
    except OSError as e:
        raise SnapshotError(f"cannot create RAM layer in {path.parent}: {e.strerror}") from None
    summer = Checksummer()
    with published(tmp, path, f"RAM layer {path}"):
        try:
            offset = 0
            for first, count in runs:
                for lo in range(first * PAGE, (first + count) * PAGE, WRITE_CHUNK):
                    piece = memory.view[lo:min(lo + WRITE_CHUNK, (first + count) * PAGE)]
                    summer.add(piece)
                    out.write(piece, offset)
                    offset += len(piece)
            out.finish()
        finally:
            out.close()
            crc = summer.result()
    return {"file": path.name, "pages": encode_runs(runs), "data_bytes": total,
            "checksum": {"algorithm": LAYER_CHECKSUM, "value": crc}}


def layer_entries(ram: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The ``layers`` of a state file's ``ram`` section (none for a full snapshot)."""
    layers = ram.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(e, dict) for e in layers):
        raise SnapshotError(f"{where}: malformed RAM layers (not a list of objects)")
    if len(layers) > MAX_LAYERS:
        raise SnapshotError(f"{where}: {len(layers)} RAM layers, more than the "
                            f"{MAX_LAYERS} hvf stacks")
    return layers


def check_layer(path: Path, entry: dict[str, Any], pages: int, where: str) -> list[Run]:
    """A layer's runs, its file checked to be a regular file of exactly their size."""
    runs = decode_runs(entry.get("pages"), pages, where)
    check_file(path, sum(count for _, count in runs) * PAGE, "RAM layer",
               missing=f"{where}: the RAM layer '{path.name}' is missing",
               recorded="its page table covers")
    return runs


def apply_layer(path: Path, runs: Sequence[Run], view: memoryview) -> None:
    """Read a layer's pages over guest RAM (``view``, the RAM file's layout)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot open RAM layer {path}: {e.strerror}") from None
    try:
        offset = 0
        for first, count in runs:
            start, end = first * PAGE, (first + count) * PAGE
            while start < end:
                done = os.preadv(fd, [view[start:end]], offset)
                if done <= 0:
                    raise SnapshotError(f"RAM layer {path} ends at {offset}, before its "
                                        f"page table does")
                start += done
                offset += done
    except OSError as e:
        raise SnapshotError(f"cannot read RAM layer {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def verify_layer(path: Path, entry: dict[str, Any]) -> None:
    """Check a layer file against the checksum its entry records."""
    check = entry.get("checksum")
    if not isinstance(check, dict) or check.get("algorithm") != LAYER_CHECKSUM:
        raise SnapshotError(f"RAM layer {path}: no {LAYER_CHECKSUM} checksum recorded")
    crc = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(_READ_CHUNK):
                crc = zlib.crc32(chunk, crc)
    except OSError as e:
        raise SnapshotError(f"cannot read RAM layer {path}: {e.strerror or e}") from None
    if crc != check.get("value"):
        raise SnapshotError(f"RAM layer {path}: checksum mismatch (recorded "
                            f"{check.get('value')!r}, computed {crc}); the file is corrupt")
