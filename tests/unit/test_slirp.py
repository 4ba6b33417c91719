# SPDX-License-Identifier: BSD-2-Clause
"""The slirp back end against the real libslirp: frames built here go in through the
device's end of the frame pair, and what the library answers comes back on it (DHCP,
ARP, a TCP connection to a real listener on the host's loopback, hostfwd), plus its
option checks and guest frames it must survive."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvf.iowait import readable, writable
from hvf.errors import ConfigError
from hvf.plugins.net.slirp import SlirpBackend, open_slirp, parse_hostfwd

try:
    from hvf.plugins.net import _slirp  # noqa: F401
except ImportError:
    pytestmark = pytest.mark.skip(reason="hvf was built without libslirp (libslirp-dev)")

GUEST_MAC = bytes.fromhex("00a098123456")
SLIRP_MAC = bytes.fromhex("52550a000202")  # libslirp's: 52:55 then the host address
BROADCAST = b"\xff" * 6
GUEST = ipaddress.IPv4Address("10.0.2.15")
HOST = ipaddress.IPv4Address("10.0.2.2")
WHERE = "pci.0.2.0"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + GUEST_MAC + ethertype.to_bytes(2, "big") + payload


def ipv4(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, proto: int,
         payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                         src.packed, dst.packed)
    return header[:10] + checksum(header).to_bytes(2, "big") + header[12:] + payload


def arp_request(target: ipaddress.IPv4Address) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST.packed,
                       bytes(6), target.packed)
    return ethernet(BROADCAST, 0x0806, body)


def dhcp_discover(xid: int) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), GUEST_MAC, b"", b"")
    options = bytes.fromhex("63825363") + bytes([53, 1, 1, 255])
    payload = bootp + options
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
    zero, everyone = ipaddress.IPv4Address(0), ipaddress.IPv4Address("255.255.255.255")
    return ethernet(BROADCAST, 0x0800, ipv4(zero, everyone, 17, udp))


def tcp_syn(dst: ipaddress.IPv4Address, sport: int, dport: int, seq: int) -> bytes:
    segment = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = GUEST.packed + dst.packed + struct.pack("!BBH", 0, 6, len(segment))
    segment = segment[:16] + checksum(pseudo + segment).to_bytes(2, "big") + segment[18:]
    return ethernet(SLIRP_MAC, 0x0800, ipv4(GUEST, dst, 6, segment))


def send(backend: SlirpBackend, frame: bytes) -> None:
    backend.send(0, [memoryview(frame)])


def frames(backend: SlirpBackend, timeout: float = 5.0) -> Iterator[bytes]:
    """Frames the stack sends to the guest, until ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    buffer = bytearray(65536)
    while (left := deadline - time.monotonic()) > 0:
        if readable([backend.fileno(0)], left):
            length = backend.receive(0, [memoryview(buffer)])
            yield bytes(buffer[:length])


def first(backend: SlirpBackend, match: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    for frame in frames(backend, timeout):
        if match(frame):
            return frame
    raise AssertionError("no such frame from the stack")


def tcp_of(frame: bytes) -> tuple[ipaddress.IPv4Address, int, int, int, int] | None:
    """(destination, source port, destination port, flags, ack) of a TCP/IPv4 frame."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0xF) * 4
    sport, dport, _seq, ack, _off, flags = struct.unpack_from("!HHIIBB", frame, 14 + ihl)
    return ipaddress.IPv4Address(frame[30:34]), sport, dport, flags, ack


def learn_guest(backend: SlirpBackend) -> bytes:
    """An ARP request for the host from 10.0.2.15 (which the stack learns) and its reply."""
    send(backend, arp_request(HOST))
    return first(backend, lambda f: f[12:14] == b"\x08\x06" and f[28:32] == HOST.packed
                 and f[32:42] == GUEST_MAC + GUEST.packed)


@pytest.fixture
def open_stack() -> Iterator[Callable[..., SlirpBackend]]:
    made: list[SlirpBackend] = []

    def make(**values: str) -> SlirpBackend:
        made.append(open_slirp("slirp", values, 1, WHERE))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dhcp_offer_from_the_library(open_stack: Callable[..., SlirpBackend]) -> None:
    backend = open_stack()
    send(backend, dhcp_discover(0x1234ABCD))
    offer = first(backend, lambda f: f[12:14] == b"\x08\x00" and f[23] == 17)
    udp = offer[34:]
    assert struct.unpack_from("!HH", udp) == (67, 68)
    bootp = udp[8:]
    assert bootp[0] == 2  # BOOTREPLY
    assert struct.unpack_from("!I", bootp, 4)[0] == 0x1234ABCD
    assert ipaddress.IPv4Address(bootp[16:20]) == GUEST  # yiaddr
    options = bootp[240:]
    assert options[:3] == bytes([53, 1, 2])  # DHCPOFFER
    assert backend.stats()["slirp_from_guest"] == 1


def test_arp_reply_for_the_host(open_stack: Callable[..., SlirpBackend]) -> None:
    reply = learn_guest(open_stack())
    assert reply[:6] == GUEST_MAC
    op, sha, spa, tha, tpa = struct.unpack_from("!6xH6s4s6s4s", reply, 14)
    assert (op, sha, spa, tha, tpa) == (2, SLIRP_MAC, HOST.packed, GUEST_MAC, GUEST.packed)


def test_tcp_to_the_host_loopback(open_stack: Callable[..., SlirpBackend]) -> None:
    backend = open_stack(restrict="off")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        learn_guest(backend)
        send(backend, tcp_syn(HOST, 40000, port, 1000))
        listener.settimeout(5)
        conn, peer = listener.accept()
        conn.close()
    assert peer[0] == "127.0.0.1"
    syn_ack = first(backend, lambda f: (t := tcp_of(f)) is not None and t[3] & 0x12 == 0x12)
    assert tcp_of(syn_ack) == (GUEST, port, 40000, 0x12, 1001)


def test_restricted_by_default_as_bhyve(open_stack: Callable[..., SlirpBackend]) -> None:
    backend = open_stack()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        learn_guest(backend)
        send(backend, tcp_syn(HOST, 40001, listener.getsockname()[1], 7))
        assert not readable([listener], 1.0)


def test_hostfwd_reaches_the_guest(open_stack: Callable[..., SlirpBackend]) -> None:
    port = free_port()
    backend = open_stack(hostfwd=f"udp::{free_port()}-:53;tcp:127.0.0.1:{port}-:22")
    learn_guest(backend)
    with socket.socket() as client:
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        syn = first(backend, lambda f: (t := tcp_of(f)) is not None and t[3] & 0x02 != 0)
    destination, _sport, dport, flags, _ack = tcp_of(syn)  # type: ignore[misc]
    assert (destination, dport, flags & 0x12) == (GUEST, 22, 0x02)


def test_a_busy_host_port_is_refused(open_stack: Callable[..., SlirpBackend]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"hostfwd rule 'tcp:127.0.0.1:{port}-:22': "
                                              f"cannot listen on 127.0.0.1:{port}"):
            open_stack(hostfwd=f"tcp:127.0.0.1:{port}-:22")


@pytest.mark.parametrize(("spec", "why"), [
    ("sctp:127.0.0.1:2222-:22", "expected"),
    ("tcp:127.0.0.1:2222", "expected"),
    ("tcp:127.0.0.1-:22", "no port in the host part"),
    ("tcp:127.0.0.1:0-:22", "'0' is not a port number"),
    ("tcp:127.0.0.1:2222-:65536", "'65536' is not a port number"),
    ("tcp:127.0.0.1:ssh-:22", "'ssh' is not a port number"),
    ("tcp::2222-:" + "2" * 5000, "is not a port number"),
    ("tcp:localhost:2222-:22", "'localhost' is not an IPv4 address"),
    ("tcp:[::1]:2222-:22", "is not an IPv4 address"),
    ("tcp::2222-192.168.1.5:22", "guest address must be"),
    ("tcp::2222-10.0.2.2:22", "guest address must be"),
    ("tcp::2222-:22;", "expected"),
])
def test_bad_hostfwd_rules(spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"{WHERE}: invalid hostfwd rule .*{why}"):
        parse_hostfwd(spec, WHERE)


def test_rules_and_defaults() -> None:
    first_rule, second = parse_hostfwd("tcp:127.0.0.1:2222-:22;udp::5353-10.0.2.20:53", WHERE)
    assert (first_rule.udp, str(first_rule.host_addr), first_rule.host_port,
            first_rule.guest_addr, first_rule.guest_port) == (False, "127.0.0.1", 2222, None, 22)
    assert (second.udp, str(second.host_addr), str(second.guest_addr)) == \
        (True, "0.0.0.0", "10.0.2.20")


def test_bad_options(open_stack: Callable[..., SlirpBackend]) -> None:
    with pytest.raises(ConfigError, match=f"{WHERE}: unknown slirp options hostfw, "
                                          f"open \\(slirp takes hostfwd, restrict\\)"):
        open_stack(hostfw="tcp::2222-:22", open="yes", mac="00:a0:98:12:34:56")
    with pytest.raises(ConfigError, match=f"{WHERE}: invalid restrict value 'maybe'"):
        open_stack(restrict="maybe")
    with pytest.raises(ConfigError, match="one queue pair, not 2"):
        open_slirp("slirp", {}, 2, WHERE)


@given(st.text(max_size=40))
def test_any_hostfwd_text_parses_or_is_a_config_error(spec: str) -> None:
    try:
        rules = parse_hostfwd(spec, WHERE)
    except ConfigError as e:
        assert str(e).startswith(f"{WHERE}: invalid hostfwd rule")
    else:
        assert all(0 < r.host_port < 65536 and 0 < r.guest_port < 65536 for r in rules)


@pytest.fixture(scope="module")
def shared_stack() -> Iterator[SlirpBackend]:
    """Restricted (the default), so that no fuzzed frame leaves the host."""
    backend = open_slirp("slirp", {}, 1, WHERE)
    yield backend
    backend.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=100).map(lambda tail: ethernet(SLIRP_MAC, 0x0800, bytes([0x45]) + tail)),
    st.binary(max_size=60).map(lambda tail: ethernet(BROADCAST, 0x0806, tail)),
), max_size=8))
def test_hostile_guest_frames_leave_the_stack_answering(shared_stack: SlirpBackend,
                                                        garbage: list[bytes]) -> None:
    for frame in garbage:
        send(shared_stack, frame)
    reply = learn_guest(shared_stack)
    assert reply[28:32] == HOST.packed


def test_a_frame_too_long_for_the_stack_is_counted(open_stack: Callable[..., SlirpBackend]) -> None:
    backend = open_stack()
    send(backend, bytes(70000))
    learn_guest(backend)
    assert backend.stats()["slirp_from_guest_dropped"] == 1


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_frames_for_a_guest_that_stops_reading_are_bounded(
        open_stack: Callable[..., SlirpBackend]) -> None:
    backend = open_stack()
    sent = 6000  # each answered by a 64-byte ARP reply: more than the pair holds
    for _ in range(sent):
        writable(backend.fileno(0), 5)
        send(backend, arp_request(HOST))
    wait_for(lambda: backend.stats()["slirp_from_guest"] == sent)
    stats = backend.stats()
    assert stats["slirp_to_guest"] + stats["slirp_to_guest_dropped"] == sent
    assert stats["slirp_to_guest_dropped"] > 0
    assert sum(1 for _ in frames(backend, 0.5)) == stats["slirp_to_guest"]
