# SPDX-License-Identifier: BSD-2-Clause
"""The tagged encoding of a chunk's fields, shared by the snapshot state file and the
migration stream's STATE message.

Fields are JSON in a form that round-trips every plain value exactly:

* ``None``, ``bool``, ``str``, lists and finite floats are plain JSON;
* ints with ``|v| < 2**53`` are JSON numbers; larger ones are ``{"$int": "-0x1f..."}``;
* ``bytes`` are ``{"$bytes": "<base64>"}``; NaN and infinities ``{"$float": "nan"}``;
* a dict key beginning with ``$`` is written with one more ``$`` in front.

It imports only what encoding needs, so a migration's downtime does not pay for the
state file's hashing and dating.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from hvf.errors import SnapshotError

#: Deepest nesting of lists and dicts in a chunk's fields.
MAX_DEPTH = 64

_SAFE_INT = 1 << 53
_TAGS = ("$int", "$bytes", "$float")
_HEX_INT = re.compile(r"-?0x[0-9a-f]+")
_FLOAT_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class Malformed(Exception):
    """A value that is not plain, or a payload that is not well formed (callers turn it
    into the error of their own context)."""


def to_json(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` in the tagged form; :class:`Malformed` for a value not plain."""
    if depth > MAX_DEPTH:
        raise Malformed(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # a StrEnum is saved as its value
    if isinstance(value, int):
        value = int(value)  # an IntEnum is saved as its value
        return value if -_SAFE_INT < value < _SAFE_INT else {"$int": hex(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [to_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise Malformed(f"{where}: dict key {k!r} is not a str")
            out["$" + k if k.startswith("$") else str(k)] = to_json(v, f"{where}.{k}", depth + 1)
        return out
    hint = " (use a list)" if isinstance(value, tuple) else (
        " (use bytes)" if isinstance(value, (bytearray, memoryview)) else "")
    raise Malformed(f"{where}: {type(value).__name__} is not a plain value{hint}")


def from_json(value: Any, where: str, depth: int = 0) -> Any:
    """The inverse of :func:`to_json`; :class:`Malformed` if ``value`` is not its form."""
    if depth > MAX_DEPTH:
        raise Malformed(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [from_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if not isinstance(value, dict):  # pragma: no cover - json.loads yields nothing else
        raise Malformed(f"{where}: unexpected {type(value).__name__}")
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag in _TAGS:
            return _untag(tag, body, where)
    out = {}
    for k, v in value.items():
        if k.startswith("$$"):
            key = k[1:]
        elif k.startswith("$"):
            raise Malformed(f"{where}: unknown tag or unescaped key {k!r}")
        else:
            key = k
        out[key] = from_json(v, f"{where}.{key}", depth + 1)
    return out


def _untag(tag: str, body: Any, where: str) -> Any:
    if not isinstance(body, str):
        raise Malformed(f"{where}: {tag} needs a string, not {type(body).__name__}")
    if tag == "$bytes":
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise Malformed(f"{where}: bad base64 in $bytes") from None
    if tag == "$int":
        if not _HEX_INT.fullmatch(body):
            raise Malformed(f"{where}: bad $int {body[:40]!r}")
        return int(body, 16)
    if body not in _FLOAT_NAMES:
        raise Malformed(f"{where}: bad $float {body[:40]!r}")
    return _FLOAT_NAMES[body]


def _no_constants(name: str) -> Any:
    raise Malformed(f"non-standard JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise Malformed(f"duplicate key {k!r}")
        out[k] = v
    return out


def loads(data: bytes) -> Any:
    """Strict JSON: no NaN constants, no duplicate keys; :class:`Malformed` if not."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants,
                          object_pairs_hook=_unique_keys)
    except Malformed:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise Malformed(f"not valid JSON ({str(e)[:120]})") from None


def encode_fields(fields: Mapping[str, Any], *, where: str = "fields") -> bytes:
    """A chunk's fields as tagged JSON; :class:`SnapshotError` for a value not plain."""
    if not isinstance(fields, Mapping):
        raise SnapshotError(f"{where}: fields must be a dict, not {type(fields).__name__}")
    try:
        tree = to_json(dict(fields), where, 0)
        return json.dumps(tree, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")
    except Malformed as e:
        raise SnapshotError(f"cannot save {e}") from None
    except (ValueError, RecursionError) as e:  # pragma: no cover - guarded above
        raise SnapshotError(f"cannot save {where}: {e}") from None


def decode_fields(data: bytes, *, where: str = "fields") -> dict[str, Any]:
    """The inverse of :func:`encode_fields`; :class:`SnapshotError` if malformed."""
    try:
        tree = loads(data)
    except Malformed as e:
        raise SnapshotError(f"malformed {where}: {e}") from None
    try:
        if not isinstance(tree, dict):
            raise Malformed(f"{where}: expected a JSON object, not {type(tree).__name__}")
        fields: dict[str, Any] = from_json(tree, where, 0)
    except Malformed as e:
        raise SnapshotError(f"malformed {e}") from None
    return fields
