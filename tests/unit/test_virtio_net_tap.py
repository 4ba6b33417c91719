# SPDX-License-Identifier: BSD-2-Clause
"""The tap back end on real taps, inside a network namespace of the test's own (root
only; skipped elsewhere, saying why): created and gone, persistent and kept, busy,
not a tap, frames both ways with their vnet headers, offloads and queues."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from hvf.errors import ConfigError
from hvf.plugins.net.spec import F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, HEADER, HEADER_SIZE
from hvf.plugins.net.tap import TapBackend, open_tap

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
WHERE = "virtio-net@pci.0.2.0"
_libc = ctypes.CDLL(None, use_errno=True)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "taps in a network namespace need root"
    if not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        return "needs iproute2's ip and /dev/net/tun"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True,
                              check=check)

    def has(self, link: str) -> bool:
        return self.ip("link", "show", link, check=False).returncode == 0

    @contextmanager
    def entered(self) -> Iterator[None]:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            assert _libc.setns(target, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
            try:
                yield
            finally:
                assert _libc.setns(home, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(home)
            os.close(target)

    def tap(self, name: str, pairs: int = 1) -> TapBackend:
        with self.entered():
            return open_tap(name, {}, pairs, WHERE)

    def packet_socket(self, link: str) -> socket.socket:
        with self.entered():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((link, 0))
        s.settimeout(5)
        return s


@pytest.fixture
def ns() -> Iterator[Namespace]:
    name = f"hvfu{os.getpid()}x{time.monotonic_ns() % 100000}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        yield Namespace(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


FRAME = bytes.fromhex("020000000002" "020000000001" "88b5") + bytes(range(50))


def test_a_tap_hvf_creates_is_up_and_goes_with_it(ns: Namespace) -> None:
    tap = ns.tap("tapu")
    try:
        assert tap.created and ns.has("tapu")
        assert "UP" in ns.ip("link", "show", "tapu").stdout
        assert tap.guest_offloads & F_GUEST_CSUM
        assert tap.guest_offloads & (F_GUEST_TSO4 | F_GUEST_TSO6) in (0, F_GUEST_TSO4 | F_GUEST_TSO6)
    finally:
        tap.close()
    assert not ns.has("tapu")


def test_a_persistent_tap_stays(ns: Namespace) -> None:
    ns.ip("tuntap", "add", "tapp", "mode", "tap")
    tap = ns.tap("tapp")
    assert not tap.created
    tap.close()
    assert ns.has("tapp")


def test_busy_and_not_a_tap(ns: Namespace) -> None:
    tap = ns.tap("tapb")
    try:
        with pytest.raises(ConfigError, match="tap 'tapb' is busy"):
            ns.tap("tapb")
    finally:
        tap.close()
    with pytest.raises(ConfigError, match="'lo' exists but is not a tap"):
        ns.tap("lo")
    with pytest.raises(ConfigError, match="unknown network back end 'no:colons'"):
        ns.tap("no:colons")


def test_frames_both_ways_with_vnet_headers(ns: Namespace) -> None:
    tap = ns.tap("tapf")
    try:
        with ns.packet_socket("tapf") as sock:
            tap.send(0, [memoryview(HEADER.pack(0, 0, 0, 0, 0, 0, 0)), memoryview(FRAME)])
            while True:  # past the kernel's own (IPv6 neighbour discovery)
                data, address = sock.recvfrom(2048)
                if data[12:14] == FRAME[12:14]:
                    break
            assert data == FRAME and address[2] != socket.PACKET_OUTGOING
            sock.send(FRAME[6:12] + FRAME[:6] + FRAME[12:])
            buffer = bytearray(4096)
            deadline = time.monotonic() + 5
            while True:
                try:
                    n = tap.receive(0, [memoryview(buffer)])
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the frame did not reach the tap"
                    time.sleep(0.01)
                    continue
                if buffer[HEADER_SIZE + 12 : HEADER_SIZE + 14] == FRAME[12:14]:
                    break  # not one of the kernel's own (IPv6 neighbour discovery)
            assert n == HEADER_SIZE + len(FRAME)
            assert bytes(buffer[HEADER_SIZE:n]) == FRAME[6:12] + FRAME[:6] + FRAME[12:]
            assert buffer[1] == 0  # no segmentation offload asked for
    finally:
        tap.close()


def test_offloads_and_queue_pairs(ns: Namespace) -> None:
    tap = ns.tap("tapm", pairs=3)
    try:
        assert len(tap.fds) == 3
        tap.set_offloads(tap.guest_offloads)
        tap.set_offloads(0)
        tap.set_active_pairs(1)
        assert "multi_queue numqueues 1 numdisabled 2" in ns.ip("-d", "link", "show", "tapm").stdout
        tap.set_active_pairs(2)
        assert "numqueues 2 numdisabled 1" in ns.ip("-d", "link", "show", "tapm").stdout
        tap.set_active_pairs(3)
        tap.send(2, [memoryview(bytes(HEADER_SIZE) + FRAME)])
        assert "numqueues 3 numdisabled 0" in ns.ip("-d", "link", "show", "tapm").stdout
    finally:
        tap.close()
    assert not ns.has("tapm")
