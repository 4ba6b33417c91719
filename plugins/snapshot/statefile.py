# SPDX-License-Identifier: BSD-2-Clause
"""The snapshot state file: a self-describing, versioned, checksummed container.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"HVFSTATE"
    8       4     u32 format version (1; 2 when guest RAM is layered)
    12      8     u64 manifest length M
    20      M     manifest: UTF-8 JSON (indented, human-readable)
    20+M    32    SHA-256 of bytes 0 .. 20+M (header and manifest)
    52+M    ...   chunk payloads, back to back, at the offsets the manifest gives;
                  the file ends where the last payload ends

The manifest holds ``format_version``, ``created`` (ISO 8601, UTC), ``hvf_version``,
``machine`` and ``ram`` (dicts the caller supplies) and ``chunks``: one entry per
chunk with its ``name``, ``owner``, ``version``, absolute ``offset`` and ``length`` in
the file and the ``sha256`` of its payload.

A chunk payload is its fields in the tagged JSON of :mod:`hvf.fields`, so any tool can
print any chunk without knowing the device.

The file is treated as hostile: every length is checked against the file before use,
the whole file is capped at :data:`MAX_FILE_SIZE`, and every problem is reported as a
:class:`~hvf.errors.SnapshotError` naming the file and what is wrong.

Writes are atomic: a temporary file in the same directory is written, fsync'd and
renamed over the target, then the directory is fsync'd. A crash leaves the old file or
the new one; a leftover temporary file never has the target's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from hvf import __version__ as HVF_VERSION
from hvf.errors import SnapshotError
from hvf.fields import Malformed, decode_fields, encode_fields, from_json, loads, to_json
from hvf.snapshot_api import Chunk

MAGIC = b"HVFSTATE"
#: The format version this hvf writes for a full snapshot; a snapshot whose RAM has
#: incremental layers (:mod:`.layers`) is :data:`LAYERED_VERSION`, so that an hvf that
#: knows no layers refuses it instead of restoring its base RAM alone.
FORMAT_VERSION = 1
LAYERED_VERSION = 2
#: The format versions this hvf reads.
SUPPORTED_VERSIONS = (1, 2)

_HEADER = struct.Struct("<8sIQ")
HEADER_SIZE = _HEADER.size  # 20
DIGEST_SIZE = 32

#: A state file larger than this is refused before anything is read (device state is
#: kilobytes; guest RAM lives in its own file).
MAX_FILE_SIZE = 256 * 1024 * 1024

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@attrs.frozen
class StateFile:
    """A state file as read back: its manifest and its chunks, checksums verified."""

    format_version: int
    manifest: dict[str, Any]
    machine: dict[str, Any]
    ram: dict[str, Any]
    chunks: list[Chunk]

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))

    @property
    def hvf_version(self) -> str:
        return str(self.manifest.get("hvf_version", ""))


# --- atomic files -------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and unlinks in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh hidden temporary name beside ``path`` (``.NAME.tmp-RANDOM``)."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[int]:
    """Yield a descriptor of a temporary file that replaces ``path`` on success.

    On a clean exit the file is fsync'd, renamed over ``path`` and the directory
    fsync'd; on an exception the temporary file is removed and ``path`` is untouched.
    """
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- writing ------------------------------------------------------------------------


def _manifest_value(value: Any, where: str) -> Any:
    try:
        return to_json(value, where)
    except Malformed as e:
        raise SnapshotError(f"cannot save {e}") from None


def _build(machine: Mapping[str, Any], ram: Mapping[str, Any], chunks: Iterable[Chunk],
           created: str) -> bytes:
    version = LAYERED_VERSION if "layers" in ram else FORMAT_VERSION
    payloads: list[tuple[Chunk, bytes]] = []
    seen: set[str] = set()
    for chunk in chunks:
        if chunk.name in seen:
            raise SnapshotError(f"cannot save: two chunks named '{chunk.name}'")
        seen.add(chunk.name)
        payloads.append((chunk, encode_fields(chunk.fields, where=f"chunk '{chunk.name}'")))
    machine_json = _manifest_value(dict(machine), "machine")
    ram_json = _manifest_value(dict(ram), "ram")

    def manifest(base: int) -> bytes:
        index, offset = [], base
        for chunk, data in payloads:
            index.append({"name": chunk.name, "owner": chunk.owner, "version": chunk.version,
                          "offset": offset, "length": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
            offset += len(data)
        doc = {"format_version": version, "created": created,
               "hvf_version": HVF_VERSION, "machine": machine_json, "ram": ram_json,
               "chunks": index}
        return json.dumps(doc, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"

    # Offsets are absolute, and the manifest's length depends on them: iterate to the
    # fixed point (lengths only grow, so this settles in a step or two).
    base = HEADER_SIZE + DIGEST_SIZE
    body = manifest(base)
    while HEADER_SIZE + len(body) + DIGEST_SIZE != base:
        base = HEADER_SIZE + len(body) + DIGEST_SIZE
        body = manifest(base)
    head = _HEADER.pack(MAGIC, version, len(body)) + body
    return b"".join([head, hashlib.sha256(head).digest(), *(d for _, d in payloads)])


def write_state(path: Path, *, machine: Mapping[str, Any], ram: Mapping[str, Any],
                chunks: Iterable[Chunk]) -> None:
    """Write a state file atomically (see the module docstring for the layout)."""
    path = Path(path)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    data = _build(machine, ram, chunks, created)
    if len(data) > MAX_FILE_SIZE:
        raise SnapshotError(f"cannot save {path}: the device state is {len(data)} bytes, "
                            f"more than the {MAX_FILE_SIZE}-byte limit")
    try:
        with atomic_file(path) as fd:
            _write_all(fd, data)
    except OSError as e:
        raise SnapshotError(f"cannot write state file {path}: {e.strerror or e}") from None


# --- reading ------------------------------------------------------------------------


def read_state(path: Path) -> StateFile:
    """Read and verify a state file; every problem is a :class:`SnapshotError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"{path}: not a regular file, so not an hvf state file")
            if st.st_size > MAX_FILE_SIZE:
                raise SnapshotError(f"{path}: {st.st_size} bytes is more than a state file "
                                    f"may hold ({MAX_FILE_SIZE}); not an hvf state file?")
            data = f.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such state file") from None
    except IsADirectoryError:
        raise SnapshotError(f"{path}: is a directory, not an hvf state file") from None
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_state(data, str(path))


def parse_state(data: bytes, source: str = "<state>") -> StateFile:
    """Parse and verify the bytes of a state file; ``source`` names it in errors."""
    if len(data) > MAX_FILE_SIZE:
        raise SnapshotError(f"{source}: larger than the {MAX_FILE_SIZE}-byte limit")
    if not data:
        raise SnapshotError(f"{source}: empty file, not an hvf state file")
    if data[:len(MAGIC)] != MAGIC[:len(data)]:
        raise SnapshotError(f"{source}: not an hvf state file (bad magic "
                            f"{bytes(data[:8])!r}, expected {MAGIC!r})")
    if len(data) < HEADER_SIZE:
        raise SnapshotError(f"{source}: truncated in the header ({len(data)} of "
                            f"{HEADER_SIZE} bytes)")
    _, version, mlen = _HEADER.unpack_from(data)
    if version not in SUPPORTED_VERSIONS:
        newer = " (written by a newer hvf?)" if version > max(SUPPORTED_VERSIONS) else ""
        reads = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise SnapshotError(f"{source}: unsupported state file format version {version}"
                            f"{newer}; this hvf ({HVF_VERSION}) reads versions {reads}")
    mend = HEADER_SIZE + mlen
    if mend + DIGEST_SIZE > len(data):
        raise SnapshotError(f"{source}: truncated in the manifest (its {mlen} bytes and "
                            f"checksum need {mend + DIGEST_SIZE} bytes; the file has "
                            f"{len(data)})")
    if hashlib.sha256(data[:mend]).digest() != data[mend:mend + DIGEST_SIZE]:
        raise SnapshotError(f"{source}: manifest checksum mismatch (the file is corrupt)")
    try:
        manifest = loads(data[HEADER_SIZE:mend])
        return _parse_manifest(manifest, data, mend + DIGEST_SIZE, version, source)
    except Malformed as e:
        raise SnapshotError(f"{source}: malformed manifest: {e}") from None


def _need(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise Malformed(f"{where}: missing '{key}'")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Malformed(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _parse_manifest(doc: Any, data: bytes, data_start: int, version: int,
                    source: str) -> StateFile:
    if not isinstance(doc, dict):
        raise Malformed("not a JSON object")
    fv = _need(doc, "format_version", int, "manifest")
    if fv != version:
        raise Malformed(f"format_version {fv} disagrees with the header's {version}")
    _need(doc, "created", str, "manifest")
    _need(doc, "hvf_version", str, "manifest")
    machine = from_json(_need(doc, "machine", dict, "manifest"), "machine")
    ram = from_json(_need(doc, "ram", dict, "manifest"), "ram")
    if "layers" in ram and version < LAYERED_VERSION:
        raise Malformed(f"format version {version} has no RAM layers, but 'ram' lists some")
    entries = _need(doc, "chunks", list, "manifest")
    chunks: list[Chunk] = []
    names: set[str] = set()
    end = data_start
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise Malformed(f"chunk index entry {i} is not an object")
        name = _need(entry, "name", str, f"chunk index entry {i}")
        where = f"chunk '{name}'"
        owner = _need(entry, "owner", str, where)
        cver = _need(entry, "version", int, where)
        offset = _need(entry, "offset", int, where)
        length = _need(entry, "length", int, where)
        digest = _need(entry, "sha256", str, where)
        if name in names:
            raise Malformed(f"two chunks named '{name}'")
        names.add(name)
        if cver < 1:
            raise Malformed(f"{where}: version {cver} is not >= 1")
        if not _SHA256_HEX.fullmatch(digest):
            raise Malformed(f"{where}: sha256 is not 64 hex digits")
        if offset < data_start or length < 0:
            raise Malformed(f"{where}: bad offset {offset} or length {length}")
        if offset + length > len(data):
            raise SnapshotError(f"{source}: truncated in chunk '{name}' (it needs bytes "
                                f"{offset}..{offset + length}; the file has {len(data)})")
        payload = data[offset:offset + length]
        if hashlib.sha256(payload).hexdigest() != digest:
            raise SnapshotError(f"{source}: checksum mismatch in chunk '{name}' "
                                f"(owner {owner}): the file is corrupt")
        try:
            fields = decode_fields(payload, where=where)
        except SnapshotError as e:
            raise SnapshotError(f"{source}: {e}") from None
        chunks.append(Chunk(name, owner, cver, fields))
        end = max(end, offset + length)
    if end != len(data):
        raise SnapshotError(f"{source}: {len(data) - end} unexpected bytes after the last "
                            f"chunk (at offset {end})")
    return StateFile(format_version=version, manifest=doc, machine=machine, ram=ram,
                     chunks=chunks)


# --- describing ---------------------------------------------------------------------


def human_size(n: Any) -> str:
    """``536870912`` → ``512 MiB``; anything not an int is shown as it is."""
    if not isinstance(n, int) or isinstance(n, bool):
        return repr(n)
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"


def describe(state: StateFile) -> str:
    """A multi-line, human-readable summary (what ``hvf snapshot info`` prints).

    Of ``machine`` it knows ``memory_size`` (bytes), ``cpus`` and ``config`` (dotted
    keys to strings); other keys are listed as they are.
    """
    m = dict(state.machine)
    lines = [f"hvf state file, format version {state.format_version}",
             f"created:     {state.created}",
             f"hvf version: {state.hvf_version}"]
    if "memory_size" in m:
        mem = m.pop("memory_size")
        lines.append(f"memory:      {human_size(mem)} ({mem!r} bytes)")
    if "cpus" in m:
        lines.append(f"CPUs:        {m.pop('cpus')!r}")
    config = m.pop("config", None)
    for key in sorted(m):
        lines.append(f"{key + ':':<12} {m[key]!r}")
    ram = state.ram
    ram_line = f"RAM file:    {ram.get('file', '?')}, {human_size(ram.get('size'))}"
    if "data_bytes" in ram:
        ram_line += f", {human_size(ram['data_bytes'])} of data"
    if isinstance(ram.get("checksum"), dict):
        ck = ram["checksum"]
        ram_line += f", {ck.get('algorithm', '?')} {ck.get('value', '?')!r}"
    lines.append(ram_line)
    layers = ram.get("layers")
    if isinstance(layers, list):
        lines.append(f"RAM layers ({len(layers)}, oldest first, each over the ones before):")
        lines.extend(f"  {e.get('file', '?')}: {human_size(e.get('data_bytes'))} of pages"
                     if isinstance(e, dict) else f"  {e!r}" for e in layers)
    if isinstance(config, dict):
        lines.append(f"config ({len(config)} keys):")
        lines.extend(f"  {k}={v}" for k, v in sorted(config.items()))
    elif config is not None:
        lines.append(f"config:      {config!r}")
    index = {e.get("name"): e for e in state.manifest.get("chunks", [])
             if isinstance(e, dict)}
    rows = [(c.name, c.owner, str(c.version), str(index.get(c.name, {}).get("length", "?")))
            for c in state.chunks]
    lines.append(f"chunks ({len(rows)}):")
    if rows:
        head = ("NAME", "OWNER", "VERSION", "SIZE")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        for r in [head, *rows]:
            lines.append("  " + "  ".join(
                r[i].rjust(widths[i]) if i >= 2 else r[i].ljust(widths[i]) for i in range(4)
            ).rstrip())
    disks = [(chunk.name, record) for chunk in state.chunks
             for record in _image_records(chunk.fields)]
    if disks:
        lines.append(f"disk images ({len(disks)}):")
        lines.extend(f"  {name}: {r['path']}, {r['size']!r} bytes, inode {r['inode']!r} on "
                     f"device {r['device']!r}, modified {r['mtime_ns']!r} ns"
                     for name, r in disks)
    return "\n".join(lines) + "\n"


#: The fields of a disk front end's image record (hvf.plugins.block.record).
_IMAGE_RECORD = frozenset({"path", "device", "inode", "rdev", "size", "mtime_ns"})


def _image_records(value: object, depth: int = 0) -> list[dict[str, object]]:
    """The image records anywhere in a chunk's fields (a few levels deep)."""
    if depth > 8:
        return []
    if isinstance(value, dict):
        if set(value) == _IMAGE_RECORD:
            return [value]
        return [r for v in value.values() for r in _image_records(v, depth + 1)]
    if isinstance(value, list):
        return [r for v in value for r in _image_records(v, depth + 1)]
    return []

