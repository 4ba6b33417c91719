# SPDX-License-Identifier: BSD-2-Clause
"""Device and vCPU state in a STATE message: the snapshot's chunks, in the state file's
self-describing encoding (:mod:`hvf.fields`).

A STATE payload is::

    u32 J                 length of the index
    J bytes               JSON {"chunks": [{"name", "owner", "version", "length"}, ...]}
    the chunks' payloads, back to back, in index order

Reading it back checks the index (names unique, versions >= 1, lengths adding up to
exactly the rest of the payload) and decodes every chunk as a state file's reader does.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable

from hvf.errors import MigrationError, SnapshotError
from hvf.fields import decode_fields, encode_fields
from hvf.snapshot_api import Chunk

INDEX_LENGTH = struct.Struct("<I")
MAX_CHUNKS = 65536
MAX_NAME = 256


def encode_state(chunks: Iterable[Chunk]) -> list[bytes]:
    """The parts of a STATE payload."""
    payloads = [(chunk, encode_fields(chunk.fields, where=f"chunk '{chunk.name}'"))
                for chunk in chunks]
    index = json.dumps({"chunks": [
        {"name": c.name, "owner": c.owner, "version": c.version, "length": len(data)}
        for c, data in payloads]}, separators=(",", ":")).encode()
    return [INDEX_LENGTH.pack(len(index)), index, *(data for _, data in payloads)]


def decode_state(payload: bytes) -> list[Chunk]:
    """The chunks of a STATE payload; every problem is a :class:`MigrationError`."""
    if len(payload) < INDEX_LENGTH.size:
        raise MigrationError("the STATE message is too short for its index")
    (index_length,) = INDEX_LENGTH.unpack_from(payload)
    start = INDEX_LENGTH.size + index_length
    if start > len(payload):
        raise MigrationError(f"the STATE message's index ({index_length} bytes) runs past "
                             f"its end")
    try:
        index = json.loads(payload[INDEX_LENGTH.size:start].decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise MigrationError(f"the STATE message's index is not JSON: {str(e)[:100]}") \
            from None
    entries = index.get("chunks") if isinstance(index, dict) else None
    if not isinstance(entries, list) or len(entries) > MAX_CHUNKS:
        raise MigrationError(f"the STATE message's index is not a list of at most "
                             f"{MAX_CHUNKS} chunks")
    chunks: list[Chunk] = []
    names: set[str] = set()
    offset = start
    for i, entry in enumerate(entries):
        name, owner, version, length = (entry.get(k) for k in
                                        ("name", "owner", "version", "length")) \
            if isinstance(entry, dict) else (None,) * 4
        if (not isinstance(name, str) or not isinstance(owner, str)
                or not 0 < len(name) <= MAX_NAME or len(owner) > MAX_NAME
                or type(version) is not int or version < 1
                or type(length) is not int or length < 0):
            raise MigrationError(f"STATE chunk {i} is not a name, an owner, a version >= 1 "
                                 f"and a length")
        if name in names:
            raise MigrationError(f"the STATE message has two chunks named '{name}'")
        names.add(name)
        if offset + length > len(payload):
            raise MigrationError(f"STATE chunk '{name}' runs past the end of the message")
        try:
            fields = decode_fields(payload[offset:offset + length],
                                         where=f"chunk '{name}'")
        except SnapshotError as e:
            raise MigrationError(f"STATE: {e}") from None
        chunks.append(Chunk(name, owner, version, fields))
        offset += length
    if offset != len(payload):
        raise MigrationError(f"the STATE message has {len(payload) - offset} bytes after "
                             f"its last chunk")
    return chunks
