# SPDX-License-Identifier: BSD-2-Clause
"""virtio-net's C data path (:mod:`hvf.plugins.net.fastpath`) against the Python one.

Two fake machines, each with guest RAM of its own, run the same driver actions: one on
a back end the C path serves (a datagram socket pair standing in for a tap's frame
descriptor), one on the Python path. A Hypothesis test drives both with hostile rings
(descriptors with any address, length, flags and link; indirect tables; garbage
headers; frames of any size and address) and asserts the same outcome: the frames the
host got, the used elements and their data, the counters, the log, the device status,
and guest RAM byte for byte outside the receive buffers (where the Python path may
also have read frames into chains it holds). The C checks of headers and of the
receive filter are compared with the Python rules they stand for, and the dirty-page
marks a migration needs are checked for received frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fakes import FakeVm
from hvf.memory import PAGE_SHIFT, GuestMemory, MiB
from hvf.plugins.net import fastpath
from hvf.plugins.net._netpath import ffi, lib
from hvf.plugins.net.device import VirtioNet
from hvf.plugins.net.frames import announcement
from hvf.plugins.net.spec import (
    F_CSUM,
    F_CTRL_RX,
    F_CTRL_VQ,
    F_GUEST_CSUM,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_MAC,
    F_MRG_RXBUF,
    F_STATUS,
    HEADER,
    HEADER_SIZE,
)
from hvf.plugins.net.state import RxFilter
from hvf.plugins.net.tx import header_problem
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.virtio.spec import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    FEATURES_OK,
)
from hvf.testing.virtio import STATUS, Driver, VirtqDriver
from test_virtio_net import MAC, ManualLoop, PairBackend, ethernet, tx_header

BDF = (0, 2, 0)
BASIC = F_VERSION_1 | F_MAC | F_STATUS
RAM = 2 * MiB
QUEUE_SIZE = 16
QUEUE_SPACING = 0x48000
QUEUE_BASE = 0x100000


class FramePairBackend(PairBackend):
    """The test's socket pair offered as a frame descriptor: the C path serves it."""

    frame_fd = True


class Machine:
    """A virtio-net function on a fake machine with 2 MiB of RAM of its own."""

    def __init__(self, features: int, *, direct: bool, size: int = QUEUE_SIZE) -> None:
        self.memory = GuestMemory(RAM)
        self.vm = FakeVm({"name": "unit"}, memory=self.memory)
        self.loop = ManualLoop()
        self.vm._loop = self.loop  # type: ignore[assignment]
        bus = PciBus()
        self.vm.attach(bus)
        self.backend = FramePairBackend() if direct else PairBackend()
        self.device = VirtioNet("virtio-net@pci.0.2.0", self.backend, MAC)
        bus.add(BDF, self.device)
        bus.assign_resources(enable_decoding=True)
        self.driver = Driver(self.vm, BDF)
        self.features = features & self.driver.features()
        assert self.driver.negotiate(self.features) & FEATURES_OK
        self.queues = {}
        for index in range(3):
            queue = VirtqDriver(self.memory, size, base=QUEUE_BASE + index * QUEUE_SPACING)
            self.queues[index] = queue
            self.driver.setup_queue(index, queue)
        self.driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        self.loop.run()

    def kick(self, index: int) -> None:
        self.driver.kick(index)
        self.device._doorbell(index)
        self.loop.run()

    def close(self) -> None:
        self.device.close()
        self.memory.close()


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine(BASIC | F_MRG_RXBUF | F_CSUM | F_HOST_TSO4, direct=True)
    yield m
    m.close()


def _calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the C path's batches."""
    calls = {"transmit": 0, "receive": 0}
    for name in calls:
        real = getattr(fastpath.NetPath, name)

        def counted(self: Any, *args: Any, _real: Any = real, _name: str = name,
                    **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(fastpath.NetPath, name, counted)
    return calls


# ---- the C path at work ----


def test_transmit_goes_through_c_with_a_clean_header(machine: Machine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _calls(monkeypatch)
    tx = machine.queues[1]
    frame = ethernet(b"\xff" * 6, MAC)
    sent, used = [], []
    for i in range(20):  # headers split across buffers, some with garbage flags
        header = tx_header(flags=0x81 if i % 2 else 0, num_buffers=7)
        tx.add([header[:5], header[5:] + frame[:3], frame[3:]] if i % 3 else
               [header + frame], [])
        if i % 5 == 4:
            machine.kick(1)
            sent += machine.backend.sent()
            used += tx.used()
    assert calls["transmit"] >= 4
    assert len(sent) == 20
    assert all(s == tx_header(flags=1 if i % 2 else 0) + frame for i, s in enumerate(sent))
    assert [u.length for u in used] == [0] * 20
    assert machine.device.counters.tx_frames == 20
    assert machine.device.counters.tx_bytes == 20 * len(frame)


def test_the_python_path_takes_what_c_leaves(machine: Machine) -> None:
    """An ARP frame (the guest's address is learnt), a frame to drop (logged), and a
    broken chain (DEVICE_NEEDS_RESET) among frames C sends."""
    tx = machine.queues[1]
    arp = announcement(MAC, "10.0.0.9")
    tx.add([tx_header() + ethernet()], [])
    tx.add([tx_header() + arp], [])
    tx.add([tx_header(gso=0x80) + ethernet()], [])
    tx.add([tx_header() + ethernet()], [])
    machine.kick(1)
    assert len(machine.backend.sent()) == 3
    assert machine.device.net.guest_ipv4 == "10.0.0.9"
    assert machine.device.counters.tx_dropped == 1
    assert "GSO with ECN" in machine.vm.logged[-1]
    tx.write_descriptor(tx.desc_gpa(0), RAM - 4, 16, 0, 0)  # runs past the end of RAM
    tx.publish(0)
    machine.kick(1)
    assert machine.driver.read(STATUS, 1) & 0x40
    assert "not inside guest RAM" in machine.vm.logged[-1]


def test_receive_goes_through_c_and_marks_pages_written(
        machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _calls(monkeypatch)
    machine.memory.written = bytearray(RAM >> PAGE_SHIFT)
    rx = machine.queues[0]
    for _ in range(8):
        rx.add([], [2048])
    machine.kick(0)
    frames = [ethernet(payload=bytes([i]) * (46 + 100 * i)) for i in range(5)]
    for frame in frames:
        machine.backend.inject(frame, header=b"\x03" + bytes(HEADER_SIZE - 1))
    machine.loop.run()
    assert calls["receive"] >= 1
    used = rx.used()
    assert [u.data[HEADER_SIZE:] for u in used] == frames
    # GUEST_CSUM was not negotiated: the flags go; one buffer each.
    assert all(u.data[:HEADER_SIZE] == HEADER.pack(0, 0, 0, 0, 0, 0, 1) for u in used)
    written = machine.memory.written
    first = rx.slot_base >> PAGE_SHIFT
    assert all(written[first + i] for i in range(5))  # each frame's page, by slot
    assert not any(written[first + 5 : first + 8])  # posted but not filled
    assert machine.device.counters.rx_frames == 5


def test_receive_merges_and_falls_back_to_the_bounce_buffer(machine: Machine) -> None:
    """Merged 1000-byte buffers for a 1500-byte frame; then too little room for the
    largest frame, which the Python path waits out."""
    rx = machine.queues[0]
    for _ in range(3):
        rx.add([], [1000])
    machine.kick(0)
    big = ethernet(payload=b"b" * 1486)
    machine.backend.inject(big)
    machine.loop.run()
    used = rx.used()
    assert [u.length for u in used] == [1000, HEADER_SIZE + len(big) - 1000]
    assert used[0].data[10:12] == b"\x02\x00"
    assert (used[0].data + used[1].data)[HEADER_SIZE:] == big
    machine.backend.inject(ethernet())
    machine.loop.run()  # one 1000-byte chain left: less than the largest frame
    assert [u.data[HEADER_SIZE:] for u in rx.used()] == [ethernet()]


# ---- the same outcome on both paths, whatever the guest does ----

_ADDRESSES = st.one_of(st.integers(0, RAM + 0x2000), st.integers(0, (1 << 64) - 1),
                       st.just(RAM - 16), st.just(0xFFFF_FFFF_FFFF_FFF0))
_DESCRIPTOR = st.tuples(_ADDRESSES, st.integers(0, 1 << 17),
                        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]),
                        st.integers(0, 20))
_HEADER = st.one_of(
    st.just(tx_header()), st.just(tx_header(flags=1, csum_start=34, csum_offset=16)),
    st.just(tx_header(flags=1, gso=1, hdr_len=54, gso_size=1448, csum_start=34,
                      csum_offset=16)),
    st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
_DESTINATIONS = st.sampled_from([MAC, b"\xff" * 6, bytes.fromhex("333300000001"),
                                 bytes.fromhex("020000000099")])
_FRAME_CHAIN = st.tuples(st.just("frame"), _HEADER, st.integers(0, 1600),
                         st.lists(st.integers(0, 1700), max_size=3), st.booleans())
_RAW_CHAIN = st.tuples(st.just("raw"), st.lists(_DESCRIPTOR, min_size=1, max_size=4),
                       st.binary(max_size=80))
#: Mostly well-formed chains, some hostile ones (a broken ring ends the story).
_TX_CHAIN = st.one_of(*[_FRAME_CHAIN] * 6, _RAW_CHAIN)
_TX = st.tuples(st.just("tx"), st.lists(_TX_CHAIN, min_size=1, max_size=5))
_POST = st.tuples(st.just("post"), st.lists(st.integers(0, 2100), min_size=1, max_size=5),
                  st.booleans())
_INJECT = st.tuples(st.just("inject"), st.lists(
    st.tuples(_DESTINATIONS, st.integers(0, 2000), st.binary(min_size=12, max_size=12)),
    min_size=1, max_size=6))
_ACTION = st.one_of(*[_TX, _POST, _INJECT] * 3,
                    st.tuples(st.just("bad_rx"), _DESCRIPTOR),
                    st.tuples(st.just("filter"), st.booleans(), st.booleans()))


def _frame_parts(header: bytes, length: int, splits: list[int]) -> list[bytes]:
    data = header + ethernet(MAC, MAC, 0x88B5, bytes(i & 0xFF for i in range(length)))
    cuts = sorted({min(s, len(data)) for s in splits} - {0, len(data)})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _apply(m: Machine, action: tuple[Any, ...]) -> None:
    kind = action[0]
    indirect_ok = bool(m.features & F_RING_INDIRECT_DESC)
    if kind == "tx":
        queue = m.queues[1]
        for chain in action[1]:
            if chain[0] == "frame":
                _, header, length, splits, indirect = chain
                parts = _frame_parts(header, length, splits)
                indirect = indirect and indirect_ok
                if queue.can_add(len(parts), indirect=indirect):
                    queue.add(parts, [], indirect=indirect)
            else:
                queue.add_raw(chain[1], chain[2])
        m.kick(1)
    elif kind == "post":
        queue = m.queues[0]
        indirect = action[2] and indirect_ok
        for length in action[1]:
            if queue.can_add(1, indirect=indirect):
                queue.add([], [length], indirect=indirect)
        m.kick(0)
    elif kind == "bad_rx":
        queue = m.queues[0]
        if queue._free_descriptors:
            head = queue._free_descriptors.pop()
            queue.write_descriptor(queue.desc_gpa(head), *action[1])
            queue.publish(head)
            m.kick(0)
    elif kind == "inject":
        for destination, length, header in action[1]:
            m.backend.inject((destination + MAC + b"\x88\xb5" + bytes(length))[:length + 12],
                             header=header)
        m.loop.run()
    elif kind == "filter" and m.features & F_CTRL_RX:
        queue = m.queues[2]
        for code, on in ((0, action[1]), (1, action[2])):  # PROMISC, ALLMULTI
            if queue.can_add(2):
                queue.add([bytes([0, code, on])], [1])
        m.kick(2)


def _outcome(m: Machine) -> dict[str, Any]:
    rx_slots = (m.queues[0].slot_base, QUEUE_BASE + QUEUE_SPACING)
    ram = bytes(m.memory.view[: rx_slots[0]]) + bytes(m.memory.view[rx_slots[1] :])
    return {"sent": m.backend.sent(), "used": {i: q.used_elements() for i, q in m.queues.items()},
            "counters": m.device.counters, "status": m.driver.read(STATUS, 1),
            "log": list(m.vm.logged), "ipv4": m.device.net.guest_ipv4, "ram": ram}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(features=st.sampled_from([
    BASIC, BASIC | F_MRG_RXBUF | F_CSUM | F_HOST_TSO4,
    BASIC | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX | F_GUEST_CSUM | F_RING_INDIRECT_DESC,
    BASIC | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_RING_INDIRECT_DESC]),
    actions=st.lists(_ACTION, min_size=1, max_size=8))
def test_hostile_rings_have_the_same_outcome_on_both_paths(
        features: int, actions: list[tuple[Any, ...]]) -> None:
    python = Machine(features, direct=False)
    c = Machine(features, direct=True)
    try:
        for action in actions:
            for m in (python, c):
                _apply(m, action)
            assert _outcome(python) == _outcome(c)
        counters = c.device.counters
        event(f"frames sent {bool(counters.tx_frames)}, received {bool(counters.rx_frames)}, "
              f"reset {bool(c.driver.read(STATUS, 1) & 0x40)}")
    finally:
        python.close()
        c.close()


# ---- C's checks are the Python rules ----


@settings(max_examples=500, deadline=None)
@given(header=st.one_of(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE), st.tuples(
    st.sampled_from([0, 1, 3]), st.sampled_from([0, 1, 4, 3, 0x81]), st.integers(0, 65535),
    st.integers(0, 2), st.integers(0, 2000), st.integers(0, 2000)).map(
        lambda t: tx_header(*t))),
    frame_length=st.integers(0, 70000),
    negotiated=st.sets(st.sampled_from([F_CSUM, F_HOST_TSO4, F_HOST_TSO6])).map(sum),
    mtu_frame=st.sampled_from([64, 1518, 9018]))
def test_the_c_header_check_is_header_problem(header: bytes, frame_length: int,
                                              negotiated: int, mtu_frame: int) -> None:
    ok = lib.hvf_net_tx_header_ok(header, frame_length, negotiated, mtu_frame)
    assert bool(ok) == (header_problem(HEADER.unpack(header), frame_length, negotiated,
                                       mtu_frame) is None)


_MACS = st.sampled_from([MAC, b"\xff" * 6, bytes.fromhex("333300000001"),
                         bytes.fromhex("01005e000001"), bytes.fromhex("020000000099"),
                         bytes.fromhex("020000000098")])


@settings(max_examples=300, deadline=None)
@given(flags=st.tuples(st.booleans(), st.booleans()),
       unicast=st.lists(_MACS, max_size=66), multicast=st.lists(_MACS, max_size=66),
       destination=_MACS)
def test_the_c_receive_filter_is_rx_filters(flags: tuple[bool, bool], unicast: list[bytes],
                                            multicast: list[bytes], destination: bytes) -> None:
    f = RxFilter(promisc=flags[0], allmulti=flags[1])
    f.set_tables(unicast, multicast)
    path = fastpath.NetPath(GuestMemory(1 * MiB))
    args = ffi.new("struct hvf_net_rx_args *")
    path._set_filter(args, MAC, f)
    assert bool(lib.hvf_net_rx_accepts(args, destination)) == f.accepts(destination, MAC)
