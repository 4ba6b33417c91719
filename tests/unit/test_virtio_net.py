# SPDX-License-Identifier: BSD-2-Clause
"""virtio-net driven from the guest's side on a fake machine, its back end a datagram
socket pair (one frame per datagram, as a tap's descriptor gives them): options,
configuration, transmit and receive with and without merged buffers, the receive
filter and the other control commands, a guest that posts no buffers, hostile frames
and chains (a hypothesis fuzz), and the saved state."""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeVm, mmio_read
from hvf.iowait import readable
from hvf.errors import ConfigError, DeviceError
from hvf.plugins.net import options
from hvf.plugins.net.backend import NetBackend, Views
from hvf.plugins.net.device import VirtioNet
from hvf.plugins.net.frames import announcement
from hvf.plugins.net.spec import (
    CTRL_ANNOUNCE,
    CTRL_ERR,
    CTRL_MAC,
    CTRL_MQ,
    CTRL_OK,
    CTRL_RX,
    F_CSUM,
    F_CTRL_MAC_ADDR,
    F_CTRL_RX,
    F_CTRL_VQ,
    F_GUEST_ANNOUNCE,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_HOST_TSO4,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_MTU,
    F_STATUS,
    HEADER,
    HEADER_SIZE,
    S_ANNOUNCE,
    S_LINK_UP,
)
from hvf.plugins.net.state import NetState
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.virtio.pci import CFG_DEVICE, ISR_CONFIG
from hvf.plugins.virtio.spec import ACKNOWLEDGE, DRIVER, DRIVER_OK, F_VERSION_1, FEATURES_OK
from hvf.testing.virtio import STATUS, Driver, Used, VirtqDriver

BDF = (0, 2, 0)
MAC = bytes.fromhex("589cfc000001")
PEER = bytes.fromhex("020000000002")
GUEST_OFFLOADS = F_GUEST_CSUM | F_GUEST_TSO4
BASIC = F_VERSION_1 | F_MAC | F_STATUS


class ManualLoop:
    """The I/O thread's loop, run by the test: callbacks queued, descriptors watched."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.soon: list[Callable[[], None]] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.writers[fd] = callback

    def remove_writer(self, fd: int) -> None:
        self.writers.pop(fd, None)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def run(self, rounds: int = 50) -> None:
        """Run queued callbacks and ready readers until nothing is left to do."""
        for _ in range(rounds):
            soon, self.soon = self.soon, []
            for callback in soon:
                callback()
            ready = readable(list(self.readers), 0) if self.readers else []
            for fd in ready:
                if fd in self.readers:
                    self.readers[fd]()
            if not soon and not ready:
                return


class PairBackend(NetBackend):
    """A back end whose host side is the test: one datagram socket pair per queue pair."""

    def __init__(self, pairs: int = 1, *, vnet_header: bool = True,
                 guest_offloads: int = GUEST_OFFLOADS) -> None:
        super().__init__("pair", pairs)
        self.vnet_header = vnet_header
        self.guest_offloads = guest_offloads if vnet_header else 0
        self.host_offloads = F_CSUM | F_HOST_TSO4 if vnet_header else 0
        self.sockets = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                        for _ in range(pairs)]
        for ours, theirs in self.sockets:
            ours.setblocking(False)
            theirs.setblocking(False)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.offloads: list[int] = []
        self.active: list[int] = []

    def fileno(self, pair: int) -> int:
        return self.sockets[pair][0].fileno()

    def receive(self, pair: int, views: Views) -> int:
        return self.sockets[pair][0].recvmsg_into(views, 0, socket.MSG_TRUNC)[0]

    def send(self, pair: int, views: Views) -> None:
        self.sockets[pair][0].sendmsg(views)

    def set_offloads(self, guest_features: int) -> None:
        self.offloads.append(guest_features)

    def set_active_pairs(self, count: int) -> None:
        self.active.append(count)

    def inject(self, frame: bytes, pair: int = 0, header: bytes | None = None) -> None:
        """A frame from the host to the guest."""
        if self.vnet_header:
            frame = (header if header is not None else bytes(HEADER_SIZE)) + frame
        self.sockets[pair][1].send(frame)

    def sent(self, pair: int = 0) -> list[bytes]:
        """Every frame the device sent the host so far."""
        out = []
        while True:
            try:
                out.append(self.sockets[pair][1].recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        for ours, theirs in self.sockets:
            ours.close()
            theirs.close()


def ethernet(destination: bytes = MAC, source: bytes = PEER, kind: int = 0x88B5,
             payload: bytes = b"x" * 46) -> bytes:
    return destination + source + kind.to_bytes(2, "big") + payload


def tx_header(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0,
              csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return HEADER.pack(flags, gso, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


#: Every Nic made by the running test, closed after it (their eventfds and socket pairs
#: would otherwise pile up over a run: thousands in the Hypothesis tests).
_OPEN: list[Nic] = []


@pytest.fixture(autouse=True)
def _close_nics() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().device.close()


class Nic:
    """A virtio-net function on a fake machine, its driver, and its queues."""

    def __init__(self, features: int = BASIC | F_MRG_RXBUF, *, pairs: int = 1,
                 mtu: int | None = None, vnet_header: bool = True, size: int = 64,
                 start: int = 0) -> None:
        self.vm = FakeVm({"name": "unit"})
        self.loop = ManualLoop()
        self.vm._loop = self.loop  # type: ignore[assignment]
        bus = PciBus()
        self.vm.attach(bus)
        self.backend = PairBackend(pairs, vnet_header=vnet_header)
        self.device = VirtioNet("virtio-net@pci.0.2.0", self.backend, MAC, mtu=mtu)
        _OPEN.append(self)
        bus.add(BDF, self.device)
        bus.assign_resources(enable_decoding=True)
        self.driver = Driver(self.vm, BDF)
        self.offered = self.driver.features()
        self.features = features & self.offered
        assert self.driver.negotiate(self.features) & FEATURES_OK
        self.queues: dict[int, VirtqDriver] = {}
        count = 2 * pairs + 1 if features & F_MQ else 3
        for index in range(count):
            queue = VirtqDriver(self.vm.memory, size, base=0x100000 + index * 0x480000,
                                start=start)
            self.queues[index] = queue
            self.driver.setup_queue(index, queue)
        self.driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        self.loop.run()

    @property
    def ctrl(self) -> int:
        return 2 * self.device.pairs if self.features & F_MQ else 2

    def config(self, offset: int, size: int) -> int:
        return mmio_read(self.vm, self.driver.addr(CFG_DEVICE, offset), size)

    def kick(self, index: int) -> None:
        self.driver.kick(index)
        self.device._doorbell(index)
        self.loop.run()

    def post_rx(self, count: int, length: int = 2048, queue: int = 0) -> None:
        for _ in range(count):
            self.queues[queue].add([], [length])
        self.kick(queue)

    def transmit(self, *parts: bytes, queue: int = 1) -> list[Used]:
        self.queues[queue].add(list(parts), [])
        self.kick(queue)
        return self.queues[queue].used()

    def command(self, kind: int, code: int, data: bytes = b"") -> int:
        queue = self.queues[self.ctrl]
        queue.add([bytes([kind, code]) + data], [1])
        self.kick(self.ctrl)
        (used,) = queue.used()
        assert used.length == 1
        return used.data[0]

    def received(self, queue: int = 0) -> list[Used]:
        self.loop.run()
        return self.queues[queue].used()

    def frames(self, queue: int = 0) -> list[tuple[bytes, bytes]]:
        """(header, frame) of each frame received, merged buffers joined."""
        out, pending, need = [], b"", 0
        for used in self.received(queue):
            if not need:
                pending = used.data
                need = struct.unpack_from("<H", used.data, 10)[0] - 1
            else:
                pending += used.data
                need -= 1
            if not need:
                out.append((pending[:HEADER_SIZE], pending[HEADER_SIZE:]))
        assert not need, "a merged frame was not complete"
        return out


@contextmanager
def nic(*args: Any, **kwargs: Any) -> Iterator[Nic]:
    n = Nic(*args, **kwargs)
    try:
        yield n
    finally:
        n.device.close()


# ---- options ----


def test_default_mac_is_bhyves() -> None:
    digest = hashlib.md5(b"2-0-myvm").digest()
    assert options.default_mac("myvm", 2, 0) == bytes.fromhex("589cfc") + digest[:3]
    assert options.default_mac("myvm", 2, 0) == options.default_mac("myvm", 2, 0)
    assert options.default_mac("myvm", 3, 0) != options.default_mac("myvm", 2, 0)


def test_parse_options() -> None:
    assert options.parse(["tap3", "mac=02:00:00:00:00:01", "mtu=9000"]) == {
        "backend": "tap3", "mac": "02:00:00:00:00:01", "mtu": "9000"}
    for conf in ([], [""], ["mac=02:00:00:00:00:01"], ["tap0", "bare"]):
        with pytest.raises(ConfigError):
            options.parse(conf)


@pytest.mark.parametrize("config, message", [
    ({"backend": "tap0", "mac": "02:00:00:00:00"}, "invalid MAC address '02:00:00:00:00'"),
    ({"backend": "tap0", "mac": "03:00:00:00:00:01"}, "invalid MAC address"),
    ({"backend": "tap0", "mac": "00:00:00:00:00:00"}, "invalid MAC address"),
    ({"backend": "tap0", "mac": "zz:00:00:00:00:01"}, "invalid MAC address"),
    ({"backend": "tap0", "mtu": "67"}, "mtu= takes 68 to 65535, not '67'"),
    ({"backend": "tap0", "queues": "0"}, "queues= takes 1 to 16"),
    ({"backend": "netmap:em0"}, "unknown network back end 'netmap:em0'"),
    ({"backend": "tap0", "type": "vde"}, "unknown network back end 'tap0' .type 'vde'"),
    ({"backend": "bad/name"}, "unknown network back end 'bad/name'"),
    ({"backend": "a-name-far-too-long"}, "unknown network back end"),
])
def test_bad_options(config: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options.create(vm=FakeVm({"name": "vm"}), slot=BDF, config={"device": "virtio-net",
                                                                   **config})


# ---- configuration and features ----


def test_configuration_and_features() -> None:
    with nic() as n:
        offered = n.offered
        for bit in (F_MAC, F_STATUS, F_MRG_RXBUF, F_CTRL_VQ, F_CTRL_RX, F_CTRL_MAC_ADDR,
                    F_GUEST_ANNOUNCE, F_CSUM, F_HOST_TSO4, F_GUEST_CSUM, F_GUEST_TSO4):
            assert offered & bit, hex(bit)
        assert not offered & (F_MTU | F_MQ)
        assert bytes(n.config(i, 1) for i in range(6)) == MAC
        assert n.config(6, 2) == S_LINK_UP
        assert n.config(8, 2) == 1
        assert n.backend.offloads[-1] == 0  # the driver took no receive offloads
    with nic(BASIC | F_GUEST_CSUM | F_GUEST_TSO4) as n:
        assert n.backend.offloads[-1] == F_GUEST_CSUM | F_GUEST_TSO4
    with nic(pairs=2, mtu=9000) as n:
        assert n.offered & F_MTU and n.offered & F_MQ
        assert n.config(8, 2) == 2 and n.config(10, 2) == 9000
    with nic(vnet_header=False) as n:
        assert not n.offered & (F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4)


# ---- transmit ----


def test_transmit_passes_a_clean_header_and_the_frame() -> None:
    with nic(BASIC | F_CSUM) as n:
        frame = ethernet(PEER, MAC, 0x0800, bytes(range(60)))
        header = tx_header(1 | 0x40, 0, 34, 0, 34, 16, 7)  # NEEDS_CSUM, an unknown bit
        (used,) = n.transmit(header[:5], header[5:] + frame[:20], frame[20:])
        assert used.length == 0
        (sent,) = n.backend.sent()
        assert sent == tx_header(1, 0, 34, 0, 34, 16, 0) + frame
        assert n.device.counters.tx_frames == 1
        assert n.device.counters.tx_bytes == len(frame)


def test_transmit_learns_the_guests_address_from_its_arp() -> None:
    with nic() as n:
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC, bytes([10, 0, 0, 7]),
                          bytes(6), bytes([10, 0, 0, 1]))
        n.transmit(tx_header(), ethernet(b"\xff" * 6, MAC, 0x0806, arp))
        assert n.device.net.guest_ipv4 == "10.0.0.7"


def test_transmit_without_vnet_header_strips_it() -> None:
    with nic(vnet_header=False) as n:
        frame = ethernet(PEER, MAC)
        n.transmit(tx_header() + frame)
        assert n.backend.sent() == [frame]


@pytest.mark.parametrize("features, header, frame, problem", [
    (BASIC, tx_header(), b"short", "shorter than an Ethernet header"),
    (BASIC, tx_header(), ethernet(payload=bytes(1600)), "over the MTU"),
    (BASIC, tx_header(1, 0, 0, 0, 14, 6), ethernet(), "NEEDS_CSUM without"),
    (BASIC | F_CSUM, tx_header(1, 0, 0, 0, 50, 10), ethernet(), "past the"),
    (BASIC | F_CSUM, tx_header(1, 1, 54, 1448, 34, 16), ethernet(), "gso_type 1 was not"),
    (BASIC | F_CSUM | F_HOST_TSO4, tx_header(0, 1, 54, 1448), ethernet(), "without NEEDS_CSUM"),
    (BASIC | F_CSUM | F_HOST_TSO4, tx_header(1, 0x81, 54, 1448, 34, 16), ethernet(), "ECN"),
    (BASIC, b"\0" * 11, b"", "shorter than its header"),
])
def test_transmit_drops_bad_frames(features: int, header: bytes, frame: bytes,
                                   problem: str) -> None:
    with nic(features) as n:
        (used,) = n.transmit(header + frame)
        assert used.length == 0
        assert n.backend.sent() == []
        assert n.device.counters.tx_dropped == 1
        assert problem in n.vm.logged[-1]


def test_transmit_of_a_tso_frame() -> None:
    with nic(BASIC | F_CSUM | F_HOST_TSO4) as n:
        header = tx_header(1, 1, 54, 1448, 34, 16)
        frame = ethernet(PEER, MAC, 0x0800, bytes(20000))
        n.queues[1].slot_size = 4096
        n.transmit(header, *(frame[i : i + 4096] for i in range(0, len(frame), 4096)))
        assert n.backend.sent() == [header + frame]


# ---- receive ----


def test_receive_into_merged_buffers() -> None:
    with nic(BASIC | F_MRG_RXBUF, mtu=9000) as n:
        n.post_rx(12, 1024)
        big, small = ethernet(payload=bytes(range(256)) * 20), ethernet()
        n.backend.inject(big)
        n.backend.inject(small)
        frames = n.frames()
        assert [f for _, f in frames] == [big, small]
        assert frames[0][0][10] == -(-(len(big) + HEADER_SIZE) // 1024)  # num_buffers
        assert n.device.counters.rx_frames == 2


def test_receive_one_buffer_per_frame_without_merging() -> None:
    with nic(BASIC) as n:
        n.post_rx(4, 2048)
        frames = [ethernet(payload=bytes([i]) * (100 + 400 * i)) for i in range(4)]
        for frame in frames:
            n.backend.inject(frame)
        assert [f for _, f in n.frames()] == frames


def test_small_buffers_take_frames_that_fit_and_drop_the_rest() -> None:
    with nic(BASIC) as n:
        n.post_rx(2, 600)
        n.backend.inject(ethernet(payload=bytes(1000)))
        n.backend.inject(ethernet(payload=bytes(500)))
        assert [len(f) for _, f in n.frames()] == [514]
        assert n.device.counters.rx_oversize == 1


def test_a_guest_without_buffers_stops_the_reading() -> None:
    with nic() as n:
        for i in range(5):
            n.backend.inject(ethernet(payload=bytes([i]) * 46))
        n.loop.run()
        assert n.frames() == [] and not n.device.rx[0].reading
        n.post_rx(1, 1024)  # room for one frame only
        assert len(n.frames()) == 1 and not n.device.rx[0].reading
        assert n.device.counters.rx_no_buffers >= 1
        n.post_rx(64, 1024)
        assert [f[14] for _, f in n.frames()] == [1, 2, 3, 4]
        assert n.device.rx[0].reading
        assert n.device.counters.rx_frames == 5 and n.device.counters.rx_oversize == 0


def test_receive_clears_kernel_flags_for_a_driver_without_guest_csum() -> None:
    with nic(BASIC | F_MRG_RXBUF) as n:
        n.post_rx(4)
        n.backend.inject(ethernet(), header=tx_header(2))  # DATA_VALID
        ((header, _),) = n.frames()
        assert header[0] == 0
    with nic(BASIC | F_MRG_RXBUF | F_GUEST_CSUM) as n:
        n.post_rx(4)
        n.backend.inject(ethernet(), header=tx_header(2))
        ((header, _),) = n.frames()
        assert header[0] == 2


def test_receive_without_vnet_header_adds_one() -> None:
    with nic(BASIC | F_MRG_RXBUF, vnet_header=False) as n:
        n.post_rx(4)
        n.backend.inject(ethernet())
        ((header, frame),) = n.frames()
        assert header == tx_header(num_buffers=1) and frame == ethernet()


def test_oversized_frames_are_dropped() -> None:
    with nic(BASIC | F_MRG_RXBUF) as n:
        n.post_rx(64, 2048)
        n.backend.inject(ethernet(payload=bytes(1600)))  # over MTU 1500, no GSO
        n.backend.inject(ethernet())
        assert [f for _, f in n.frames()] == [ethernet()]
        assert n.device.counters.rx_oversize == 1


# ---- the control queue ----


def test_receive_filter() -> None:
    with nic(BASIC | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX) as n:
        other, group = bytes.fromhex("020000000009"), bytes.fromhex("01005e000001")
        n.post_rx(32)
        assert n.command(CTRL_RX, 0, b"\0") == CTRL_OK  # promiscuous off
        for destination in (other, MAC, b"\xff" * 6, group):
            n.backend.inject(ethernet(destination))
        assert [f[:6] for _, f in n.frames()] == [MAC, b"\xff" * 6]
        assert n.device.counters.rx_filtered == 2
        tables = struct.pack("<I", 1) + other + struct.pack("<I", 1) + group
        assert n.command(CTRL_MAC, 0, tables) == CTRL_OK
        n.backend.inject(ethernet(other))
        n.backend.inject(ethernet(group))
        assert [f[:6] for _, f in n.frames()] == [other, group]
        assert n.command(CTRL_MAC, 0, struct.pack("<II", 0, 0)) == CTRL_OK
        assert n.command(CTRL_RX, 1, b"\1") == CTRL_OK  # all multicast
        n.backend.inject(ethernet(group))
        n.backend.inject(ethernet(other))
        assert [f[:6] for _, f in n.frames()] == [group]
        assert n.command(CTRL_MAC, 0, struct.pack("<I", 5)) == CTRL_ERR
        assert n.command(CTRL_RX, 7, b"\1") == CTRL_ERR


def test_mac_address_set_announce_ack_and_pairs() -> None:
    with nic(BASIC | F_CTRL_VQ | F_CTRL_MAC_ADDR | F_GUEST_ANNOUNCE | F_MQ, pairs=2) as n:
        new = bytes.fromhex("020000aabbcc")
        generation = n.driver.read(0x15, 1)
        assert n.command(CTRL_MAC, 1, new) == CTRL_OK
        assert bytes(n.config(i, 1) for i in range(6)) == new
        assert n.driver.read(0x15, 1) != generation
        assert n.command(CTRL_MAC, 1, b"\x01" + new[1:]) == CTRL_ERR  # multicast
        n.device.net.status |= S_ANNOUNCE
        assert n.command(CTRL_ANNOUNCE, 0) == CTRL_OK
        assert n.config(6, 2) == S_LINK_UP
        assert n.command(CTRL_MQ, 0, struct.pack("<H", 2)) == CTRL_OK
        assert n.backend.active[-1] == 2 and n.device.net.active_pairs == 2
        n.post_rx(4, queue=2)
        n.backend.inject(ethernet(), pair=1)
        assert len(n.frames(2)) == 1
        assert n.transmit(tx_header() + ethernet(PEER, MAC), queue=3)
        assert len(n.backend.sent(1)) == 1
        assert n.command(CTRL_MQ, 0, struct.pack("<H", 3)) == CTRL_ERR
        assert n.command(CTRL_RX, 0, b"\0") == CTRL_ERR  # CTRL_RX not negotiated


def test_reset_forgets_the_driver() -> None:
    with nic(BASIC | F_CTRL_VQ | F_CTRL_MAC_ADDR) as n:
        assert n.command(CTRL_MAC, 1, bytes.fromhex("020000aabbcc")) == CTRL_OK
        n.driver.write(STATUS, 1, 0)
        n.loop.run()
        assert n.device.net.mac == MAC and n.backend.offloads[-1] == 0
        assert not n.device.rx[0].reading


# ---- state ----


def test_state_round_trip_gives_stashed_buffers_back() -> None:
    with nic(BASIC | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX) as n:
        n.post_rx(8)
        n.backend.inject(ethernet())
        assert len(n.frames()) == 1
        n.command(CTRL_RX, 1, b"\1")
        saved = n.device.save_state()
        rx = saved["transport"]["queues"][0]
        assert rx["next_avail"] == rx["next_used"] == 1  # the stash went back
        assert saved["device"]["allmulti"] is True
        with nic(BASIC | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX) as m:
            m.device.restore_state(saved, 1)
            assert m.device.net == n.device.net and m.device.announce_pending


def test_restore_announces_through_the_driver_or_by_itself() -> None:
    with nic(BASIC | F_CTRL_VQ | F_GUEST_ANNOUNCE) as n:
        saved = n.device.save_state()
        n.device.restore_state(saved, 1)
        n.device.announce()
        assert n.config(6, 2) == S_LINK_UP | S_ANNOUNCE
        assert n.device.state.isr & ISR_CONFIG and n.backend.sent() == []
    with nic(BASIC) as n:
        n.device.net.guest_ipv4 = "10.0.0.7"
        n.device.restore_state(n.device.save_state(), 1)
        n.device.announce()
        assert n.backend.sent() == [bytes(HEADER_SIZE) + announcement(MAC, "10.0.0.7")]
        assert n.device.counters.announcements == 1


@pytest.mark.parametrize("field, value, message", [
    ("mac", "01:00:00:00:00:01", "not a unicast address"),
    ("mac", "nonsense", "not a MAC address"),
    ("status", 4, "'status' has bits outside"),
    ("active_pairs", 2, "'active_pairs' .2. is not 1 to 1"),
    ("promisc", 1, "'promisc' is not a bool"),
    ("unicast", ["02:00:00:00:00:01"] * 65, "at most 64"),
    ("guest_ipv4", "10.0.0.300", "not an IPv4 address"),
    ("extra", 1, "'extra' is unknown"),
])
def test_malformed_state_is_refused(field: str, value: object, message: str) -> None:
    fields = NetState(MAC).to_fields()
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        NetState.from_fields(fields, 1)


def test_restore_refuses_features_the_back_end_lacks() -> None:
    with nic(BASIC | F_GUEST_CSUM) as n:
        saved = n.device.save_state()
    with nic(BASIC, vnet_header=False) as m, pytest.raises(DeviceError, match="does not offer"):
        m.device.restore_state(saved, 1)


# ---- a hostile guest ----

_ADDRESSES = st.one_of(st.integers(0, 0x4000000), st.integers(0, 1 << 64 - 1),
                       st.just(0xFFFF_FFFF_FFFF_F000))


@st.composite
def _descriptor(draw: st.DrawFn) -> tuple[int, int, int, int]:
    return (draw(_ADDRESSES), draw(st.integers(0, 1 << 17)), draw(st.integers(0, 7)),
            draw(st.integers(0, 70)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(features=st.sampled_from([BASIC, BASIC | F_MRG_RXBUF | F_CSUM | F_HOST_TSO4,
                                 BASIC | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX | F_GUEST_CSUM]),
       chains=st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.lists(_descriptor(),
                                                                        min_size=1, max_size=4),
                                 st.binary(max_size=80)), max_size=6),
       frames=st.lists(st.binary(max_size=3000), max_size=6))
def test_hostile_chains_and_frames_never_crash(features: int, chains: list[Any],
                                               frames: list[bytes]) -> None:
    """Descriptors with any address, length, flags and next; garbage headers and
    commands; frames of any size from the host: the device drops, counts, or asks for a
    reset, and every frame it sends has a header that passed its checks."""
    with nic(features, size=64) as n:
        for index, descriptors, data in chains:
            queue = n.queues[index]
            head = len(queue._free_descriptors) and queue._free_descriptors.pop()
            n.vm.memory.write(queue.slot_base, data)
            for i, (addr, length, flags, nxt) in enumerate(descriptors):
                if i == 0 and addr < 0x4000000 and data:
                    addr, length = queue.slot_base, len(data)
                queue.write_descriptor(queue.desc_gpa((head + i) % 64), addr, length, flags, nxt)
            queue.publish(head)
            n.kick(index)
        for frame in frames:
            n.backend.inject(frame)
        n.post_rx(2, 1600)
        n.loop.run()
        for sent in n.backend.sent():
            assert len(sent) >= HEADER_SIZE + 14
            flags, gso = sent[0], sent[1]
            assert flags in (0, 1) and (gso == 0 or features & F_HOST_TSO4)
        stats = n.device.stats()
        assert stats["rx_frames"] + stats["rx_oversize"] + stats["rx_filtered"] <= len(frames)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=st.lists(st.one_of(
    st.binary(max_size=40),
    st.tuples(st.integers(0, 5), st.integers(0, 3), st.binary(max_size=30)).map(
        lambda t: bytes(t[:2]) + t[2]),
    st.tuples(st.integers(0, 70), st.integers(0, 70)).map(
        lambda t: bytes([1, 0]) + struct.pack("<I", t[0]) + bytes(6 * t[0])
        + struct.pack("<I", t[1]) + b"\x01" * (6 * t[1]))), max_size=8))
def test_any_control_command_is_answered_and_leaves_a_valid_state(commands: list[bytes]) -> None:
    features = (BASIC | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR
                | F_GUEST_ANNOUNCE | F_MQ)
    with nic(features, pairs=2, size=16) as n:
        for command in commands:
            queue = n.queues[n.ctrl]
            queue.add([command] if command else [], [1])
            n.kick(n.ctrl)
            (used,) = queue.used()
            assert used.length == 1 and used.data[0] in (CTRL_OK, CTRL_ERR)
        fields = n.device.net.to_fields()
        assert NetState.from_fields(fields, 2) == n.device.net


@pytest.mark.parametrize("index", [0, 1, 2])
def test_buffers_outside_ram_stop_the_device_not_hvf(index: int) -> None:
    """A chain pointing past guest RAM on any queue: the device asks for a reset, logs
    why, sends and delivers nothing; a reset brings it back."""
    with nic(BASIC | F_MRG_RXBUF | F_CTRL_VQ) as n:
        queue = n.queues[index]
        queue.write_descriptor(queue.desc_gpa(0), 0xFFFF_0000_0000, 1500,
                               2 if index == 0 else 0, 0)
        queue.publish(0)
        n.kick(index)
        n.backend.inject(ethernet())
        n.loop.run()
        assert n.driver.read(STATUS, 1) & 0x40  # DEVICE_NEEDS_RESET
        assert "not inside guest RAM" in n.vm.logged[-1]
        assert n.backend.sent() == [] and n.device.counters.rx_frames == 0
        n.driver.write(STATUS, 1, 0)
        assert n.driver.read(STATUS, 1) == 0
