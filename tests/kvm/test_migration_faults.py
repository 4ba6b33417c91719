# SPDX-License-Identifier: BSD-2-Clause
"""A stream that is truncated, corrupted, of another version or not hvf's at all: the
destination refuses it saying what is wrong and exits with 4, and the source, told or
cut off, runs on. A proxy between a real source and a real destination does the
damage, frame by frame."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hvf.migration.stream import HEADER, MAGIC, Kind, checksum

from conftest import run_hvf
from test_migration import Proc, ctl, finished, listening, start_migration
from test_snapshot import check_counter, counter_args, lines_in, read, wait_until

pytestmark = pytest.mark.kvm

#: What the proxy does to a frame from the source: return the bytes to forward, or
#: None to cut both connections after forwarding ``cut`` (the partial frame).
Tamper = Callable[[int, bytes], bytes | None]


def encode(kind: int, payload: bytes) -> bytes:
    head = HEADER.pack(MAGIC, kind, 0, len(payload), 0)[:12]
    fold = checksum(Kind(kind))
    return head + struct.pack("<I", fold(payload, fold(head, 0))) + payload


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise EOFError
        data += piece
    return data


class Proxy:
    """Listens on ``front``; the one source that connects is joined to ``back``, its
    frames passed through ``tamper``."""

    def __init__(self, front: Path, back: Path, tamper: Tamper) -> None:
        self.back, self.tamper = back, tamper
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(front))
        self.listener.listen(1)
        self.sockets: list[socket.socket] = [self.listener]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        source, _ = self.listener.accept()
        dest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dest.connect(str(self.back))
        self.sockets += [source, dest]
        back = threading.Thread(target=self._back_to_source, args=(dest, source), daemon=True)
        back.start()
        with contextlib.suppress(OSError, EOFError):
            while True:
                head = recv_exactly(source, HEADER.size)
                _magic, kind, _flags, length, _crc = HEADER.unpack(head)
                frame = head + recv_exactly(source, length)
                out = self.tamper(kind, frame)
                if out is None:
                    dest.sendall(frame[:HEADER.size + length // 2])
                    break
                dest.sendall(out)
        # The destination's answer (a REFUSE) must reach the source before it all closes.
        with contextlib.suppress(OSError):
            dest.shutdown(socket.SHUT_WR)
        back.join(30)
        self.close()

    @staticmethod
    def _back_to_source(dest: socket.socket, source: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := dest.recv(65536):
                source.sendall(data)
        with contextlib.suppress(OSError):
            source.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextlib.contextmanager
def damaged_migration(guests: dict[str, Path], tmp_path: Path, name: str,
                      tamper: Tamper) -> Iterator[tuple[str, Proc]]:
    """A counter migrated through a proxy that applies ``tamper``; yields the error the
    migration ended with and the destination; then checks that the source runs on."""
    out_a, out_b = tmp_path / "com1-a", tmp_path / "com1-b"
    front, back = tmp_path / "front.sock", tmp_path / "back.sock"
    with Proc(counter_args(guests["counter"], out_a, name), tmp_path, "a") as src, \
            Proc(["--incoming", f"unix:{back}", "-l", f"com1,file={out_b}"], tmp_path, "b",
                 runtime=tmp_path / "run-b") as dst:
        wait_until(lambda: lines_in(out_a) >= 3, 60, "3 lines from the counter", src)
        wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
        ctl(name, "checkpoint", tmp_path / "ck", proc=src)  # its dirty log runs from here
        proxy = Proxy(front, back, tamper)
        try:
            status, reply = finished(start_migration(name, src, f"unix:{front}"), 120)
        finally:
            proxy.close()
        assert status == 1 and "the VM runs on here" in reply["error"], reply
        print(f"source: {reply['error']}")
        yield reply["error"], dst
        print(f"destination: {dst.stderr.splitlines()[-1]}")
        assert ctl(name, "status", proc=src)["state"] == "running"
        # the migration took the dirty log over: the next checkpoint must be a full one
        refused = run_hvf(["ctl", "--vm", name, "checkpoint", "--incremental", tmp_path / "ck"],
                          timeout=60, env=src.env)
        assert refused.returncode != 0 and "take a full checkpoint" in refused.stderr
        lines = lines_in(out_a)
        wait_until(lambda: lines_in(out_a) >= lines + 2, 30, "the source counting on", src)
        ctl(name, "poweroff", proc=src)
        assert src.wait(30) == 1
    check_counter(read(out_a))
    assert not read(out_b)


def rewrite_hello(change: Callable[[dict[str, object]], None]) -> Tamper:
    def tamper(kind: int, frame: bytes) -> bytes:
        if kind != Kind.HELLO:
            return frame
        doc = json.loads(frame[HEADER.size:])
        change(doc)
        return encode(kind, json.dumps(doc).encode())
    return tamper


def test_a_newer_protocol_is_refused(guests: dict[str, Path], tmp_path: Path) -> None:
    with damaged_migration(guests, tmp_path, "mig-version",
                           rewrite_hello(lambda doc: doc.update(protocol=99))) as (error, dst):
        assert "speaks migration protocol 99; this hvf" in error
        assert dst.wait(30) == 4 and "protocol 99" in dst.stderr


def test_another_state_format_is_refused(guests: dict[str, Path], tmp_path: Path) -> None:
    with damaged_migration(guests, tmp_path, "mig-format",
                           rewrite_hello(lambda doc: doc.update(state_format=7))) as (error, dst):
        assert "encodes device state in format 7" in error
        assert dst.wait(30) == 4


def test_a_corrupted_page_message_is_refused(guests: dict[str, Path], tmp_path: Path) -> None:
    def flip(kind: int, frame: bytes) -> bytes:
        if kind != Kind.PAGES:
            return frame
        damaged = bytearray(frame)
        damaged[-1] ^= 0x40  # the CRC no longer matches
        return bytes(damaged)

    with damaged_migration(guests, tmp_path, "mig-corrupt", flip) as (error, dst):
        assert "corrupt PAGES message" in error
        assert dst.wait(30) == 4 and "corrupt PAGES message" in dst.stderr


def test_a_truncated_stream_is_refused(guests: dict[str, Path], tmp_path: Path) -> None:
    def cut(kind: int, frame: bytes) -> bytes | None:
        return None if kind == Kind.PAGES else frame

    with damaged_migration(guests, tmp_path, "mig-truncated", cut) as (error, dst):
        assert "destination" in error
        assert dst.wait(30) == 4
        assert "closed the connection before the migration completed" in dst.stderr


def test_state_refused_after_the_pause_resumes_the_source(guests: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """The state exists only once the guest has stopped: a STATE message that is whole
    but malformed is refused, and the source's guest runs again."""
    def garble(kind: int, frame: bytes) -> bytes:
        if kind != Kind.STATE:
            return frame
        payload = bytearray(frame[HEADER.size:])
        payload[4] = ord("[")  # the index is no longer a JSON object
        return encode(kind, bytes(payload))

    with damaged_migration(guests, tmp_path, "mig-state", garble) as (error, dst):
        assert "refused the VM (its memory or state)" in error, error
        assert "index is not JSON" in error
        assert dst.wait(30) == 4


def test_a_destination_that_is_not_hvf_is_refused(guests: dict[str, Path],
                                                  tmp_path: Path) -> None:
    name, out, sock = "mig-not-hvf", tmp_path / "com1", tmp_path / "other.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)

    def answer() -> None:
        peer, _ = listener.accept()
        with peer:
            peer.recv(65536)
            peer.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(64))

    threading.Thread(target=answer, daemon=True).start()
    with Proc(counter_args(guests["counter"], out, name), tmp_path, "a") as src:
        wait_until(lambda: lines_in(out) >= 3, 60, "3 lines from the counter", src)
        reply = ctl(name, "migrate", f"unix:{sock}", proc=src, expect_ok=False)
        assert "not an hvf migration stream" in reply["error"], reply
        assert "the VM runs on here" in reply["error"]
        lines = lines_in(out)
        wait_until(lambda: lines_in(out) >= lines + 2, 30, "the source counting on", src)
        ctl(name, "poweroff", proc=src)
        assert src.wait(30) == 1
    listener.close()
    check_counter(read(out))
