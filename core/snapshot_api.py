# SPDX-License-Identifier: BSD-2-Clause
"""What plugins see of a snapshot: named, owned, versioned chunks of plain fields.

Saving, the core adds one :class:`Chunk` per attached device (and its own KVM state)
to a :class:`StateWriter`, and a plugin adds chunks only for state it keeps outside
any device; restoring, each takes its chunks back from a :class:`StateReader`, which
knows which chunks nobody took (a snapshot holding state for a device no installed
plugin has must not restore silently without it). A chunk carries the version its
fields were written with; :func:`upgrade` brings them to the reader's. How chunks
reach the disk is the snapshot backends' business.

The ``field_*`` readers and :func:`check_fields` are for a device's state record: a
snapshot is untrusted, so every field is checked before a device uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import attrs

from hvf.errors import SnapshotError

#: A chunk's fields: names to plain values (int, bool, str, bytes, None, lists, dicts).
Fields = dict[str, Any]
#: Upgrades a chunk's fields from version v to v + 1.
Upgrade = Callable[[Fields], Fields]


@attrs.frozen
class Chunk:
    """One piece of saved state: ``name`` (unique), the ``owner`` plugin, a version."""

    name: str
    owner: str
    version: int = attrs.field(validator=attrs.validators.ge(1))
    fields: Fields = attrs.field(factory=dict)


class StateWriter:
    """Collects chunks while the VM is paused."""

    def __init__(self) -> None:
        self.chunks: dict[str, Chunk] = {}

    def add(self, *, name: str, owner: str, version: int, fields: Mapping[str, Any]) -> None:
        if name in self.chunks:
            raise SnapshotError(f"two chunks named '{name}' (owners {self.chunks[name].owner} "
                                f"and {owner})")
        self.chunks[name] = Chunk(name, owner, version, dict(fields))


class StateReader:
    """Hands chunks out once each and reports the ones nobody took."""

    def __init__(self, chunks: Iterable[Chunk]) -> None:
        self._chunks = {c.name: c for c in chunks}
        self._taken: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self._chunks)

    def has(self, name: str) -> bool:
        return name in self._chunks

    def take(self, name: str) -> Chunk:
        """The chunk ``name``; it is an error if the snapshot lacks it."""
        chunk = self._chunks.get(name)
        if chunk is None:
            raise SnapshotError(f"the snapshot has no state for '{name}'")
        self._taken.add(name)
        return chunk

    def untaken(self) -> list[Chunk]:
        return [c for n, c in sorted(self._chunks.items()) if n not in self._taken]


def upgrade(chunk: Chunk, current: int, upgrades: Mapping[int, Upgrade]) -> Fields:
    """Bring ``chunk``'s fields to version ``current`` with ``upgrades[v]`` (v → v+1).

    A chunk newer than ``current`` is refused, naming it and both versions. The steps
    get untrusted fields: they raise ``ValueError`` naming a field they cannot read.
    """
    if chunk.version > current:
        raise SnapshotError(
            f"'{chunk.name}' was saved by a newer hvf (state version {chunk.version}; this "
            f"hvf reads up to {current})"
        )
    fields = dict(chunk.fields)
    for v in range(chunk.version, current):
        step = upgrades.get(v)
        if step is None:
            raise SnapshotError(f"'{chunk.name}': no upgrade from state version {v} to {v + 1}")
        fields = step(fields)
    return fields


# ---- reading fields back: a snapshot is untrusted ----
# Each raises ValueError naming the field; the core reports it as malformed state of
# the chunk being restored.


def _field(fields: Fields, name: str) -> Any:
    if name not in fields:
        raise ValueError(f"saved field '{name}' is missing")
    return fields[name]


def check_fields(fields: Fields, names: Collection[str]) -> None:
    """Refuse ``fields`` unless its names are exactly ``names``."""
    unknown = sorted(str(n) for n in fields if n not in names)
    if unknown:
        raise ValueError(f"saved field '{unknown[0]}' is unknown")
    for name in names:
        _field(fields, name)


def field_int(fields: Fields, name: str, bits: int) -> int:
    """Field ``name``: an unsigned integer of at most ``bits`` bits."""
    value = _field(fields, name)
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise ValueError(f"saved field '{name}' is not an unsigned integer of {bits} bits")
    return value


def field_flags(fields: Fields, name: str, bits: int, allowed: int) -> int:
    """Field ``name``: an unsigned integer of ``bits`` bits with none outside ``allowed``."""
    value = field_int(fields, name, bits)
    if value & ~allowed:
        raise ValueError(f"saved field '{name}' has bits outside {allowed:#x} set ({value:#x})")
    return value


def field_bytes(fields: Fields, name: str, *, size: int | None = None,
                max_size: int | None = None) -> bytes:
    """Field ``name``: bytes, exactly ``size`` or at most ``max_size`` of them."""
    value = _field(fields, name)
    if not isinstance(value, bytes) or (size is not None and len(value) != size) or (
            max_size is not None and len(value) > max_size):
        limit = f" of {size} bytes" if size is not None else (
            f" of at most {max_size} bytes" if max_size is not None else "")
        raise ValueError(f"saved field '{name}' is not a byte string{limit}")
    return value
