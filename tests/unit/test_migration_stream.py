# SPDX-License-Identifier: BSD-2-Clause
"""The migration stream: frames, addresses, page runs, the state message and the HELLO,
checked as an untrusted peer would probe them."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import threading
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvf.errors import MigrationError, UsageError
from hvf.migration import handshake
from hvf.migration.chunks import decode_state, encode_state
from hvf.migration.pages import (
    ENTRY,
    MAX_PAGES,
    MAX_RUNS,
    batches,
    bitmap_runs,
    decode_count,
    decode_table,
    encode_table,
    mark_runs,
    union,
)
from hvf._pages import ffi as pages_ffi
from hvf._pages import lib as pages_lib
from hvf.migration.stream import HEADER, MAGIC, Channel, Kind, checksum, crc32c, parse_uri
from hvf.snapshot_api import Chunk

PAGE = 4096


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    a, b = socket.socketpair()
    left, right = Channel(a, timeout=5, peer="the left"), Channel(b, timeout=5, peer="the right")
    yield left, right
    left.close()
    right.close()


def frame(kind: int, payload: bytes, *, magic: bytes = MAGIC, flags: int = 0,
          crc: int | None = None) -> bytes:
    head = HEADER.pack(magic, kind, flags, len(payload), 0)[:12]
    fold = checksum(Kind(kind)) if kind in {k.value for k in Kind} else crc32c
    value = fold(payload, fold(head, 0)) if crc is None else crc
    return head + struct.pack("<I", value) + payload


# ---- checksums ----


def crc32c_reference(data: bytes, value: int = 0) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78)."""
    c = value ^ 0xFFFF_FFFF
    for byte in data:
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ 0x82F6_3B78 if c & 1 else c >> 1
    return c ^ 0xFFFF_FFFF


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE306_9283  # the catalogue's check value
    assert crc32c(b"") == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200), st.integers(0, 7))
def test_crc32c_continues_and_matches_the_table_and_the_reference(
        a: bytes, b: bytes, skew: int) -> None:
    data = bytes(skew) + a + b
    view = memoryview(data)[skew:]  # every alignment of the word loop
    whole = crc32c(view)
    assert whole == crc32c(b, crc32c(a)) == crc32c_reference(a + b)
    assert pages_lib.hvf_crc32c_table(0, pages_ffi.from_buffer(view), len(view)) == whole


def test_frames_after_the_handshake_use_crc32c() -> None:
    """HELLO, READY and REFUSE keep protocol 1's CRC-32, so another version is told it
    speaks another protocol; the rest use CRC-32C."""
    assert {k for k in Kind if checksum(k) is zlib.crc32} == {Kind.HELLO, Kind.READY,
                                                             Kind.REFUSE}
    assert all(checksum(k) is crc32c for k in Kind if k not in (Kind.HELLO, Kind.READY,
                                                                Kind.REFUSE))


# ---- addresses ----


@pytest.mark.parametrize(("text", "host", "port", "path"), [
    ("tcp:10.0.0.2:4444", "10.0.0.2", 4444, ""),
    ("tcp::4444", "", 4444, ""),
    ("tcp:[::1]:1", "::1", 1, ""),
    ("tcp:host.example:65535", "host.example", 65535, ""),
    ("unix:/run/x.sock", "", 0, "/run/x.sock"),
])
def test_addresses(text: str, host: str, port: int, path: str) -> None:
    uri = parse_uri(text)
    assert (uri.host, uri.port, uri.path, str(uri)) == (host, port, path, text)


@pytest.mark.parametrize("text", ["tcp:host", "tcp:host:0", "tcp:host:65536", "tcp:a:b:1",
                                  "udp:x:1", "unix:", "unix:" + "x" * 108, "10.0.0.1:1"])
def test_bad_addresses_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_uri(text)


# ---- frames ----


def test_frames_round_trip_with_a_descriptor(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    r, w = os.pipe()
    try:
        left.send(Kind.HELLO, b'{"a":', b"1}", fds=[r])
        left.send(Kind.GO)
        got = right.receive({Kind.HELLO: 100})
        assert (got.kind, got.payload, len(got.fds)) == (Kind.HELLO, b'{"a":1}', 1)
        os.write(w, b"z")
        assert os.read(got.fds[0], 1) == b"z"  # the same pipe
        os.close(got.fds[0])
        assert right.receive({Kind.GO: 0}).payload == b""
        assert left.sent == 16 + 7 + 16
    finally:
        os.close(r)
        os.close(w)


def test_a_large_payload_arrives_whole(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    data = random.Random(1).randbytes(3 << 20)
    sender = threading.Thread(target=left.send, args=(Kind.STATE, data[:5], data[5:]))
    sender.start()
    assert right.receive({Kind.STATE: len(data)}).payload == data
    sender.join()


@pytest.mark.parametrize(("raw", "message"), [
    (frame(Kind.GO, b"", magic=b"QEVM"), "not an hvf migration stream"),
    (frame(99, b""), "unknown type 99"),
    (frame(Kind.GO, b"", flags=1), "flags 0x1"),
    (frame(Kind.READY, b"{}"), "READY where GO was expected"),
    (frame(Kind.GO, b"x" * 100), "GO message of 100 bytes (at most 10)"),
    (frame(Kind.GO, b"abc", crc=0), "corrupt GO message"),
    (frame(Kind.GO, b"abcdef")[:19], "closed the connection before the migration completed"),
    (frame(Kind.GO, b"")[:7], "closed the connection"),
])
def test_bad_frames_are_refused(pair: tuple[Channel, Channel], raw: bytes,
                                message: str) -> None:
    left, right = pair
    left.sock.sendall(raw)
    left.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(MigrationError, match=re.escape(message)):
        right.receive({Kind.GO: 10})


def test_a_descriptor_on_another_message_is_refused_and_closed(
        pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    r, w = os.pipe()
    try:
        left.send(Kind.GO, fds=[r])
        with pytest.raises(MigrationError, match="descriptors with GO"):
            right.receive({Kind.GO: 0})
    finally:
        os.close(r)
        os.close(w)


def test_silence_is_bounded() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(MigrationError, match="sent nothing for 0.1 s"):
            Channel(b, timeout=0.1, peer="the source").receive({Kind.GO: 0})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_frame_or_a_migration_error(data: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        channel = Channel(b, timeout=1, peer="the peer")
        try:
            channel.receive({k: 64 for k in Kind})
        except MigrationError:
            pass


# ---- page runs ----


def naive_bits(words: list[int]) -> list[int]:
    return [64 * w + i for w, word in enumerate(words) for i in range(64) if word >> i & 1]


def expand(runs: list[tuple[int, int]]) -> list[int]:
    return [p for start, count in runs for p in range(start, start + count)]


@given(st.lists(st.one_of(st.just(0), st.just((1 << 64) - 1), st.integers(0, (1 << 64) - 1)),
                max_size=20), st.integers(0, 1 << 20))
def test_bitmap_runs_are_the_set_bits(words: list[int], first: int) -> None:
    view = memoryview(struct.pack(f"<{len(words)}Q", *words)).cast("Q")
    runs = bitmap_runs(view, first)
    assert expand(runs) == [first + p for p in naive_bits(words)]
    assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:]))  # maximal


@given(st.binary(max_size=300))
def test_mark_runs_are_the_nonzero_bytes(marks: bytes) -> None:
    assert expand(mark_runs(marks)) == [i for i, b in enumerate(marks) if b]


@given(st.lists(st.lists(st.tuples(st.integers(0, 500), st.integers(1, 40)), max_size=8),
                max_size=4))
def test_union_is_every_page_once(lists: list[list[tuple[int, int]]]) -> None:
    merged = union(*lists)
    assert expand(merged) == sorted({p for runs in lists for p in expand(runs)})
    assert all(a + n < b for (a, n), (b, _) in zip(merged, merged[1:]))


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 3000)), max_size=30),
       st.integers(1, 2 * MAX_PAGES))
def test_batches_keep_within_limits_and_cover_every_page(
        runs: list[tuple[int, int]], max_pages: int) -> None:
    runs = union(runs)
    out = list(batches(runs, max_pages))
    assert expand([r for b in out for r in b]) == expand(runs)
    for batch in out:
        assert sum(n for _, n in batch) <= min(max_pages, MAX_PAGES) and len(batch) <= MAX_RUNS


def test_a_table_round_trips() -> None:
    runs = [(0, 1), (5, 3), (1000, MAX_PAGES - 4)]
    table = encode_table(runs)
    length = len(table) + PAGE * MAX_PAGES
    count = decode_count(table[:4], length)
    assert decode_table(table[4:], count, length, 16 << 20) == runs


@pytest.mark.parametrize(("entries", "extra_pages", "message"), [
    ([(1, 1)], 1, "not whole pages"),                         # unaligned
    ([(0, 0)], 0, "not whole pages"),                         # empty run
    ([((64 << 20) - PAGE, 2)], 2, "inside guest RAM"),        # runs past the end
    ([(1 << 63, 1)], 1, "inside guest RAM"),                  # far outside
    ([(0, 1)], 2, "must fill it"),                            # payload longer than runs
    ([(0, 2)], 1, "must fill it"),                            # shorter
    ([(0, MAX_PAGES), (MAX_PAGES * PAGE, 1)], MAX_PAGES + 1, "at most"),
])
def test_bad_tables_are_refused(entries: list[tuple[int, int]], extra_pages: int,
                                message: str) -> None:
    table = b"".join(ENTRY.pack(offset, pages) for offset, pages in entries)
    length = 4 + len(table) + extra_pages * PAGE
    with pytest.raises(MigrationError, match=message):
        decode_table(table, len(entries), length, 64 << 20)


@pytest.mark.parametrize("count", [0, MAX_RUNS + 1, 1000])
def test_bad_run_counts_are_refused(count: int) -> None:
    with pytest.raises(MigrationError, match="claims"):
        decode_count(struct.pack("<I", count), 100)


@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 2000)), min_size=1,
                max_size=8), st.integers(0, 3000))
def test_any_table_is_inside_ram_or_refused(entries: list[tuple[int, int]], data: int) -> None:
    table = b"".join(ENTRY.pack(offset, pages) for offset, pages in entries)
    ram = 64 << 20
    try:
        runs = decode_table(table, len(entries), 4 + len(table) + data, ram)
    except MigrationError:
        return
    assert all(0 <= start and (start + n) * PAGE <= ram for start, n in runs)
    assert sum(n for _, n in runs) * PAGE == data


# ---- the STATE message ----


CHUNKS = [Chunk("vm", "hvf", 1, {"clock": b"\x01\x02", "n": 1 << 60}),
          Chunk("device.com1", "hvf.plugins.uart", 3, {"lsr": 0x60, "fifo": [1, 2]})]


def test_state_round_trips() -> None:
    assert decode_state(b"".join(encode_state(CHUNKS))) == CHUNKS


def _state(index: object, *payloads: bytes) -> bytes:
    raw = json.dumps(index).encode()
    return struct.pack("<I", len(raw)) + raw + b"".join(payloads)


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x01", "too short"),
    (struct.pack("<I", 100) + b"{}", "runs past"),
    (struct.pack("<I", 3) + b"{x}", "not JSON"),
    (_state([]), "not a list"),
    (_state({"chunks": [{"name": "a", "owner": "o", "version": 0, "length": 2}]}, b"{}"),
     "version >= 1"),
    (_state({"chunks": [{"name": "a", "owner": "o", "version": 1, "length": 2}] * 2},
            b"{}{}"), "two chunks named 'a'"),
    (_state({"chunks": [{"name": "a", "owner": "o", "version": 1, "length": 9}]}, b"{}"),
     "runs past the end"),
    (_state({"chunks": [{"name": "a", "owner": "o", "version": 1, "length": 2}]}, b"{}x"),
     "1 bytes after"),
    (_state({"chunks": [{"name": "a", "owner": "o", "version": 1, "length": 2}]}, b"[]"),
     "STATE: malformed chunk 'a'"),
])
def test_bad_state_is_refused(payload: bytes, message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        decode_state(payload)


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_any_state_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        decode_state(data)
    except MigrationError:
        pass


# ---- the HELLO ----


def hello(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "hvf_version": "0.1.0", "protocol": 2, "state_format": 1, "page_size": PAGE,
        "ram": "copy",
        "machine": {"memory_size": 256 << 20, "cpus": 2, "config": {"name": "vm", "cpus": "2"}},
        "cpu": {"model": "host", "features": "", "cpuid": [[0, 0, 0, 0xD, 1, 2, 3]],
                "msrs": [0x10], "tsc_khz": 2_000_000},
        "source": {"vm": "vm", "pid": 1, "control": "/run/hvf/vm.sock"},
    }
    doc.update(changes)
    return doc


def test_a_good_hello_is_accepted() -> None:
    offer = handshake.parse_hello(json.dumps(hello()).encode())
    assert (offer.memory_size, offer.cpus, offer.config["name"], offer.ram) == (
        256 << 20, 2, "vm", "copy")
    assert offer.cpu.cpuid == ((0, 0, 0, 0xD, 1, 2, 3),) and offer.cpu.tsc_khz == 2_000_000


@pytest.mark.parametrize(("changes", "message"), [
    ({"protocol": 1}, "speaks migration protocol 1; this hvf .* speaks 2"),
    ({"state_format": 9}, "encodes device state in format 9"),
    ({"page_size": 65536}, "page size is 65536"),
    ({"ram": "stolen"}, "ram is 'stolen'"),
    ({"machine": {"memory_size": 4095, "cpus": 1, "config": {}}}, "not a positive number"),
    ({"machine": {"memory_size": 1 << 50, "cpus": 1, "config": {}}}, "not a positive number"),
    ({"machine": {"memory_size": PAGE, "cpus": 0, "config": {}}}, "CPU count 0"),
    ({"machine": {"memory_size": PAGE, "cpus": 1, "config": {"a": 1}}}, "not a string"),
    ({"cpu": {"model": "host", "features": "", "cpuid": [], "msrs": [], "tsc_khz": 0}},
     "HELLO's cpu: saved field 'cpuid' is not 1 to 512 entries"),
    ({"cpu": {"model": "host", "features": "", "cpuid": [[0] * 6 + [1 << 32]], "msrs": [],
              "tsc_khz": 0}}, "7 unsigned 32-bit integers"),
    ({"cpu": []}, "'cpu' is missing or not a dict"),
    ({"protocol": True}, "'protocol' is missing or not a int"),
])
def test_bad_hellos_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        handshake.parse_hello(json.dumps(hello(**changes)).encode())


# JSON documents. (st.recursive with this extend raised HypothesisDeprecationWarning,
# "doesn't use its argument", in some runs of the whole suite.)
_JSON: st.SearchStrategy[object] = st.deferred(
    lambda: st.none() | st.booleans() | st.integers() | st.text(max_size=5)
    | st.lists(_JSON, max_size=3) | st.dictionaries(st.text(max_size=8), _JSON, max_size=4))


@settings(max_examples=200)
@given(_JSON)
def test_any_json_is_an_offer_or_refused(doc: object) -> None:
    try:
        handshake.parse_hello(json.dumps(doc).encode())
    except MigrationError:
        pass


# ---- the command line ----


@pytest.mark.parametrize("args", [
    ["migrate", "unix:/x", "--downtime-ms", "0"],
    ["migrate", "unix:/x", "--downtime-ms", "nan"],
    ["migrate", "unix:/x", "--bandwidth", "-1"],
    ["migrate", "unix:/x", "--timeout", "soon"],
])
def test_bad_migrate_options_are_usage_errors(args: list[str]) -> None:
    from hvf.ctl import ctl_main

    with pytest.raises(SystemExit) as e:
        ctl_main(["--vm", "nosuch", *args])
    assert e.value.code == 64


def test_incoming_and_restore_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    from hvf.cli import main

    assert main(["--incoming", "unix:/x", "-r", "/snap"]) == 64
    assert "-r and --incoming exclude each other" in capsys.readouterr().err
