# SPDX-License-Identifier: BSD-2-Clause
"""The snapshot state file: round trips, describe(), hostile input, atomic writes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hvf.errors import SnapshotError
from hvf.fields import decode_fields, encode_fields
from hvf.plugins.snapshot import statefile
from hvf.plugins.snapshot.statefile import (
    DIGEST_SIZE,
    HEADER_SIZE,
    MAGIC,
    StateFile,
    describe,
    parse_state,
    read_state,
    write_state,
)
from hvf.snapshot_api import Chunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MACHINE = {"memory_size": 256 << 20, "cpus": 2,
           "config": {"memory.size": "256M", "cpus": "2", "lpc.com1.path": "stdio"}}
RAM = {"file": "ram-20260101T000000Z-00000000", "size": 256 << 20, "data_bytes": 8192}

EVERY_TYPE: dict[str, Any] = {
    "none": None, "true": True, "false": False, "zero": 0, "one": 1, "neg": -7,
    "edge": 2**53 - 1, "edge_neg": -(2**53) + 1, "big": 2**53, "huge": 2**300 + 5,
    "huge_neg": -(2**200), "float": 1.5, "negzero": -0.0, "tiny": 5e-324, "inf": math.inf,
    "ninf": -math.inf, "str": "héllo ☃", "empty_str": "", "surrogate": "\ud800",
    "bytes": bytes(range(256)), "empty_bytes": b"", "str_like_bytes": b"abc",
    "list": [1, True, "1", b"1", None, [], {}], "nested": {"a": [{"b": [b"\x00", 2**64]}]},
    "$dollar": {"$bytes": "not a tag", "$$two": 1, "$int": "0x1"},
    "tag_lookalike": {"$bytes": "AAAA"}, "unicode_key_☃": 1,
}


def chunks() -> list[Chunk]:
    return [Chunk("lpc/com1", "uart", 3, dict(EVERY_TYPE)),
            Chunk("pci/0:0.0/hostbridge", "pci", 1, {}),
            Chunk("cpu/0", "vcpu", 12, {"regs": {"rip": 0xFFF0, "rflags": 2}, "msrs": [[0x10, 5]]})]


def write(path: Path, ch: list[Chunk] | None = None) -> None:
    write_state(path, machine=MACHINE, ram=RAM, chunks=chunks() if ch is None else ch)


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "state"
    write(path)
    return path.read_bytes()


def same(a: Any, b: Any) -> bool:
    """Exact equality: types too (True is not 1, b"a" is not "a"), NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


# --- round trips ----------------------------------------------------------------------


def test_round_trip_every_type(tmp_path: Path) -> None:
    path = tmp_path / "state"
    write(path)
    state = read_state(path)
    assert isinstance(state, StateFile)
    assert state.format_version == 1
    assert state.machine == MACHINE and state.ram == RAM
    assert [(c.name, c.owner, c.version) for c in state.chunks] == \
        [(c.name, c.owner, c.version) for c in chunks()]
    for got, want in zip(state.chunks, chunks()):
        assert same(got.fields, want.fields), got.name
    assert state.manifest["hvf_version"] == state.hvf_version
    assert state.created.endswith("+00:00")
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_nan_round_trips() -> None:
    out = decode_fields(encode_fields({"x": math.nan, "y": [math.nan]}))
    assert math.isnan(out["x"]) and math.isnan(out["y"][0])


def test_manifest_is_readable_json(valid: bytes) -> None:
    (length,) = struct.unpack_from("<Q", valid, 12)
    doc = json.loads(valid[HEADER_SIZE:HEADER_SIZE + length])
    assert doc["format_version"] == 1
    assert doc["machine"]["config"]["lpc.com1.path"] == "stdio"
    for entry in doc["chunks"]:
        payload = valid[entry["offset"]:entry["offset"] + entry["length"]]
        assert hashlib.sha256(payload).hexdigest() == entry["sha256"]
        json.loads(payload)  # every chunk is plain JSON that any tool can print


def test_intenum_and_strenum_saved_as_values() -> None:
    import enum

    class Mode(enum.IntEnum):
        A = 3

    class Name(str, enum.Enum):
        B = "b"

    out = decode_fields(encode_fields({"m": Mode.A, "n": Name.B}))
    assert same(out, {"m": 3, "n": "b"})


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**600, max_value=2**600)
    | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), plain, max_size=5))
def test_fields_round_trip_property(fields: dict[str, Any]) -> None:
    assert same(decode_fields(encode_fields(fields)), fields)


@pytest.mark.parametrize(("fields", "match"), [
    ({"t": (1, 2)}, r"chunk 'c'\.t: tuple is not a plain value \(use a list\)"),
    ({"b": bytearray(b"x")}, r"bytearray is not a plain value \(use bytes\)"),
    ({"s": {1}}, "set is not a plain value"),
    ({"d": {1: 2}}, "dict key 1 is not a str"),
    ({"o": object()}, "object is not a plain value"),
])
def test_write_rejects_values_that_are_not_plain(tmp_path: Path, fields: dict[str, Any],
                                                 match: str) -> None:
    with pytest.raises(SnapshotError, match=match):
        write(tmp_path / "state", [Chunk("c", "o", 1, fields)])
    assert not list(tmp_path.iterdir())


def test_write_rejects_deep_nesting_and_duplicate_names(tmp_path: Path) -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    with pytest.raises(SnapshotError, match="nested more than"):
        write(tmp_path / "state", [Chunk("c", "o", 1, {"d": deep})])
    with pytest.raises(SnapshotError, match="two chunks named 'c'"):
        write(tmp_path / "state", [Chunk("c", "o", 1), Chunk("c", "p", 1)])


def test_no_chunks(tmp_path: Path) -> None:
    write(tmp_path / "state", [])
    assert read_state(tmp_path / "state").chunks == []


# --- describe -------------------------------------------------------------------------


def test_describe(valid: bytes) -> None:
    text = describe(parse_state(valid))
    assert text.startswith("hvf state file, format version 1\n")
    for needle in ["created:", "hvf version: 0.1.0", "memory:      256 MiB (268435456 bytes)",
                   "CPUs:        2",
                   "RAM file:    ram-20260101T000000Z-00000000, 256 MiB, 8 KiB of data", "config (3 keys):", "  lpc.com1.path=stdio",
                   "  memory.size=256M", "chunks (3):"]:
        assert needle in text, needle
    lines = text.splitlines()
    head = lines.index("chunks (3):") + 1
    assert lines[head].split() == ["NAME", "OWNER", "VERSION", "SIZE"]
    row = lines[head + 1].split()
    assert row[:3] == ["lpc/com1", "uart", "3"] and int(row[3]) > 100
    assert lines[head + 2].split() == ["pci/0:0.0/hostbridge", "pci", "1", "2"]


# --- hostile and damaged files --------------------------------------------------------


def craft(doc_edit: Any = None, payloads: list[bytes] | None = None, *, version: int = 1,
          extra: bytes = b"", entry_edit: Any = None) -> bytes:
    """A state file with a valid manifest checksum around a chosen manifest."""
    payloads = [b"{}"] if payloads is None else payloads
    pad = 4096  # trailing spaces are JSON whitespace, so the manifest length is fixed
    base = HEADER_SIZE + pad + DIGEST_SIZE
    entries, off = [], base
    for i, p in enumerate(payloads):
        entries.append({"name": f"c{i}", "owner": "o", "version": 1, "offset": off,
                        "length": len(p), "sha256": hashlib.sha256(p).hexdigest()})
        off += len(p)
    if entry_edit:
        entry_edit(entries)
    doc: Any = {"format_version": version, "created": "x", "hvf_version": "0", "machine": {},
                "ram": {}, "chunks": entries}
    if doc_edit:
        doc = doc_edit(doc)
    body = (doc if isinstance(doc, bytes) else json.dumps(doc).encode()).ljust(pad)
    head = struct.pack("<8sIQ", MAGIC, version, len(body)) + body
    return head + hashlib.sha256(head).digest() + b"".join(payloads) + extra


def test_craft_helper_makes_valid_files() -> None:
    state = parse_state(craft(payloads=[b'{"a":1}', b"{}"]))
    assert [c.fields for c in state.chunks] == [{"a": 1}, {}]


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"\x7fELF" + bytes(100))
    with pytest.raises(SnapshotError, match=rf"{path}: not an hvf state file \(bad magic"):
        read_state(path)
    path.write_bytes(b"")
    with pytest.raises(SnapshotError, match="empty file"):
        read_state(path)


def test_unknown_format_version(valid: bytes) -> None:
    data = valid[:8] + struct.pack("<I", 3) + valid[12:]
    with pytest.raises(SnapshotError, match=r"unsupported state file format version 3 "
                       r"\(written by a newer hvf\?\); this hvf \(0\.1\.0\) reads versions 1, 2"):
        parse_state(data, "f")
    with pytest.raises(SnapshotError, match="format version 0;"):
        parse_state(valid[:8] + bytes(4) + valid[12:])


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no such state file"):
        read_state(tmp_path / "nope")
    with pytest.raises(SnapshotError, match="is a directory"):
        read_state(tmp_path)


def test_truncation_at_every_length(valid: bytes) -> None:
    for n in range(len(valid)):
        with pytest.raises(SnapshotError):
            parse_state(valid[:n])


def test_truncation_messages_name_the_place(valid: bytes) -> None:
    (mlen,) = struct.unpack_from("<Q", valid, 12)
    with pytest.raises(SnapshotError, match=r"truncated in the header \(5 of 20 bytes\)"):
        parse_state(valid[:5])
    with pytest.raises(SnapshotError, match="truncated in the manifest"):
        parse_state(valid[:HEADER_SIZE + 10])
    with pytest.raises(SnapshotError, match="truncated in the manifest"):
        parse_state(valid[:HEADER_SIZE + mlen + DIGEST_SIZE - 1])
    with pytest.raises(SnapshotError, match=r"truncated in chunk 'cpu/0' \(it needs bytes"):
        parse_state(valid[:-1])
    with pytest.raises(SnapshotError, match="truncated in chunk 'lpc/com1'"):
        parse_state(valid[:HEADER_SIZE + mlen + DIGEST_SIZE + 3])


def test_checksum_mismatch_names_the_chunk(valid: bytes) -> None:
    state = parse_state(valid)
    entry = next(e for e in state.manifest["chunks"] if e["name"] == "lpc/com1")
    data = bytearray(valid)
    data[entry["offset"] + 5] ^= 0x01
    with pytest.raises(SnapshotError, match=r"f: checksum mismatch in chunk 'lpc/com1' "
                       r"\(owner uart\)"):
        parse_state(bytes(data), "f")
    data = bytearray(valid)
    data[HEADER_SIZE + 30] ^= 0x20
    with pytest.raises(SnapshotError, match="manifest checksum mismatch"):
        parse_state(bytes(data))


def test_trailing_bytes_rejected(valid: bytes) -> None:
    with pytest.raises(SnapshotError, match="3 unexpected bytes after the last chunk"):
        parse_state(valid + b"abc")


def test_absurd_sizes_do_not_allocate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    header = struct.pack("<8sIQ", MAGIC, 1, 1 << 60)
    with pytest.raises(SnapshotError, match="truncated in the manifest"):
        parse_state(header + b"{}")

    def huge(entries: list[dict[str, Any]]) -> None:
        entries[0]["length"] = 1 << 60
    with pytest.raises(SnapshotError, match="truncated in chunk 'c0'"):
        parse_state(craft(entry_edit=huge))
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(1 << 40)  # a sparse terabyte: refused before anything is read
    with pytest.raises(SnapshotError, match="more than a state file may hold"):
        read_state(path)
    monkeypatch.setattr(statefile, "MAX_FILE_SIZE", 100)
    with pytest.raises(SnapshotError, match="larger than the 100-byte limit"):
        parse_state(bytes(101))


def _set(key: str, value: Any) -> Any:
    def edit(doc: dict[str, Any]) -> dict[str, Any]:
        doc[key] = value
        return doc
    return edit


def _entry(key: str, value: Any) -> Any:
    def edit(entries: list[dict[str, Any]]) -> None:
        if value is KeyError:
            del entries[0][key]
        else:
            entries[0][key] = value
    return edit


@pytest.mark.parametrize(("kw", "match"), [
    ({"doc_edit": lambda d: b"{not json"}, "malformed manifest: not valid JSON"),
    ({"doc_edit": lambda d: b"\xff\xfe"}, "malformed manifest: not valid JSON"),
    ({"doc_edit": lambda d: b"[" * 100000}, "malformed manifest"),
    ({"doc_edit": lambda d: [1, 2]}, "malformed manifest: not a JSON object"),
    ({"doc_edit": lambda d: b'{"a": 1, "a": 2}'}, "duplicate key 'a'"),
    ({"doc_edit": lambda d: b'{"x": NaN}'}, "non-standard JSON constant NaN"),
    ({"doc_edit": _set("format_version", 7)}, "format_version 7 disagrees"),
    ({"doc_edit": _set("format_version", True)}, "'format_version' has the wrong type"),
    ({"doc_edit": _set("machine", [])}, "'machine' has the wrong type"),
    ({"doc_edit": _set("ram", {"$bytes": "!!"})}, "bad base64"),
    ({"doc_edit": _set("chunks", {})}, "'chunks' has the wrong type"),
    ({"doc_edit": _set("chunks", [5])}, "chunk index entry 0 is not an object"),
    ({"entry_edit": _entry("name", KeyError)}, "chunk index entry 0: missing 'name'"),
    ({"entry_edit": _entry("version", 0)}, "chunk 'c0': version 0 is not >= 1"),
    ({"entry_edit": _entry("version", "1")}, "'version' has the wrong type"),
    ({"entry_edit": _entry("offset", 3)}, "bad offset 3"),
    ({"entry_edit": _entry("length", -1)}, "bad offset .* or length -1"),
    ({"entry_edit": _entry("sha256", "xyz")}, "sha256 is not 64 hex digits"),
    ({"entry_edit": lambda e: e.append(dict(e[0]))}, "two chunks named 'c0'"),
    ({"payloads": [b"[]"]}, "malformed chunk 'c0': expected a JSON object, not list"),
    ({"payloads": [b'{"a": {"$int": "12"}}']}, "bad \\$int"),
    ({"payloads": [b'{"a": {"$float": "1.0"}}']}, "bad \\$float"),
    ({"payloads": [b'{"a": {"$bytes": 5}}']}, "\\$bytes needs a string"),
    ({"payloads": [b'{"a": {"$oops": 1}}']}, "malformed chunk 'c0'.a: unknown tag or unescaped key '\\$oops'"),
    ({"payloads": [b'{"a": 1e999999}']}, None),  # an infinite float is still a float
    ({"payloads": [b'{"a": ' + b"1" * 5000 + b"}"]}, "not valid JSON"),
    ({"payloads": [b'{"a": "\\ud800"}']}, None),
    ({"payloads": [b"\xff"]}, "not valid JSON"),
])
def test_malformed_manifest_and_payloads(kw: dict[str, Any], match: str | None) -> None:
    data = craft(**kw)
    if match is None:
        parse_state(data)
        return
    with pytest.raises(SnapshotError, match=match):
        parse_state(data, "f")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_damaged_files_only_raise_snapshot_error(valid: bytes, data: st.DataObject) -> None:
    blob = bytearray(valid)
    for _ in range(data.draw(st.integers(0, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and blob:
            blob[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif blob:
            del blob[pos:pos + data.draw(st.integers(1, 8))]
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    try:
        parse_state(bytes(blob))
    except SnapshotError:
        pass


def _resign(blob: bytearray) -> bytes:
    """Recompute the manifest checksum (an attacker or a buggy tool could)."""
    (mlen,) = struct.unpack_from("<Q", blob, 12)
    end = HEADER_SIZE + mlen
    if end + DIGEST_SIZE <= len(blob):
        blob[end:end + DIGEST_SIZE] = hashlib.sha256(bytes(blob[:end])).digest()
    return bytes(blob)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_resigned_manifest_and_chunks(valid: bytes, data: st.DataObject) -> None:
    """Damage that keeps checksums valid reaches the JSON and field parsers."""
    blob = bytearray(valid)
    state = parse_state(valid)
    (mlen,) = struct.unpack_from("<Q", blob, 12)
    if data.draw(st.booleans()):  # damage the manifest text
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(HEADER_SIZE, HEADER_SIZE + mlen - 1))
            blob[pos] = data.draw(st.sampled_from(b'{}[]",:0123456789-$ aeE\\\x00\xff'))
    else:  # damage a payload and fix its sha256 (fixed width, so offsets hold)
        entry = data.draw(st.sampled_from(state.manifest["chunks"]))
        start, length = entry["offset"], entry["length"]
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(start, start + length - 1))
            blob[pos] = data.draw(st.sampled_from(b'{}[]",:0123456789-$ aeE\\\x00\xff'))
        new = hashlib.sha256(bytes(blob[start:start + length])).hexdigest().encode()
        at = blob.find(entry["sha256"].encode(), HEADER_SIZE, HEADER_SIZE + mlen)
        blob[at:at + 64] = new
    try:
        parse_state(_resign(blob))
    except SnapshotError:
        pass


# --- atomic writes --------------------------------------------------------------------


def test_failed_rename_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state"
    write(path)
    old = path.read_bytes()

    def boom(*a: Any) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(SnapshotError, match=rf"cannot write state file {path}: No space left"):
        write(path, [Chunk("new", "o", 1)])
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_failed_fsync_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state"
    write(path)
    old = path.read_bytes()

    def boom(fd: int) -> None:
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(SnapshotError, match="Input/output error"):
        write(path, [Chunk("new", "o", 1)])
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


_SLOW_WRITER = """
import os, sys, time
from pathlib import Path
from hvf.plugins.snapshot import statefile
from hvf.snapshot_api import Chunk

def slow(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:65536]):]
        time.sleep(0.002)

statefile._write_all = slow
statefile.write_state(Path(sys.argv[1]), machine={"n": "new"}, ram={},
                      chunks=[Chunk("big", "o", 1, {"b": os.urandom(4 << 20)})])
"""


def test_sigkill_mid_write_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state"
    write_state(path, machine={"n": "old"}, ram={}, chunks=chunks())
    old = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            temps = [p for p in tmp_path.iterdir() if p.name.startswith(".state.tmp-")]
            if temps and temps[0].stat().st_size > 1 << 20:
                break
            assert child.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.005)
        else:
            pytest.fail("the writer never started writing")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == old
    assert read_state(path).machine == {"n": "old"}
    # the torn temporary file is there, but under a name nothing reads
    (temp,) = (p for p in tmp_path.iterdir() if p.name != "state")
    with pytest.raises(SnapshotError):
        read_state(temp)
