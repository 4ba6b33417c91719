# SPDX-License-Identifier: BSD-2-Clause
"""virtio-console's C transmit path (:class:`hvf.plugins.virtio.cring.TxPath`) against
the Python one.

Two fake machines, each with guest RAM of its own, run the same driver actions on port
0's transmit queue, with a real pipe as the host side: one with the C path, one with
it switched off. A small pipe makes the host take part of a ``writev`` (the C path's
BLOCKED case, where Python queues the rest of a guest buffer). A Hypothesis test
drives both with hostile rings (descriptors with any address, length, flags and link;
indirect tables; buffers of any size) and asserts the same outcome: the bytes the host
read, the used elements, the device status, the counters and the log.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fakes import FakeVm
from hvf.console import ConsoleBackend, Receiver
from hvf.eventloop import EventLoop
from hvf.memory import GuestMemory, MiB
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.virtio import cring
from hvf.plugins.virtio.console import VirtioConsole
from hvf.plugins.virtio.queue import SplitQueue
from hvf.plugins.virtio.spec import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    FEATURES_OK,
)
from hvf.testing.virtio import STATUS, Driver, VirtqDriver
from test_virtio_net import ManualLoop

BDF = (0, 4, 0)
RAM = 2 * MiB
QUEUE_SIZE = 16
SLOT = 16 * 1024
TX = 1  # port 0's transmit queue
F_SETPIPE_SZ = 1031


class PipeConsole(ConsoleBackend):
    """Guest output into a pipe of ``capacity`` bytes; the test reads the other end."""

    capacity = 64 * 1024

    def open(self, loop: EventLoop, receiver: Receiver) -> None:
        super().open(loop, receiver)
        self.host, self.pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        fcntl.fcntl(self.pipe, F_SETPIPE_SZ, self.capacity)
        self.connect(None, self.pipe)

    def read(self, most: int) -> bytes:
        try:
            return os.read(self.host, most)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        with self._lock:
            self._out.clear()  # the test read what it wanted
        super().close()
        os.close(self.host)
        os.close(self.pipe)


class Machine:
    """A one-port virtio-console on a fake machine with 2 MiB of RAM of its own."""

    def __init__(self, features: int, *, direct: bool, capacity: int) -> None:
        self.memory = GuestMemory(RAM)
        self.vm = FakeVm({"name": "unit"}, memory=self.memory)
        self.loop = ManualLoop()
        self.vm._loop = self.loop  # type: ignore[assignment]
        PipeConsole.capacity = capacity
        self.vm.plugins.console_backends.add("pipe", PipeConsole)
        bus = PciBus()
        self.vm.attach(bus)
        self.device = VirtioConsole("virtio-console@pci.0.4.0", [("con", "pipe=")])
        bus.add(BDF, self.device)
        bus.assign_resources(enable_decoding=True)
        if not direct:
            self.device.tx_path = None
        self.driver = Driver(self.vm, BDF)
        self.features = features & self.driver.features()
        assert self.driver.negotiate(self.features) & FEATURES_OK
        event_idx = bool(self.features & F_RING_EVENT_IDX)
        self.queues = {}
        for index in (0, TX):
            queue = VirtqDriver(self.memory, QUEUE_SIZE, event_idx=event_idx,
                                base=0x10000 + index * 0x80000, slot_size=SLOT, slots=24)
            self.queues[index] = queue
            self.driver.setup_queue(index, queue)
        self.driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        self.loop.run()
        self.host = bytearray()

    @property
    def backend(self) -> PipeConsole:
        backend = self.device.ports[0].backend
        assert isinstance(backend, PipeConsole)
        return backend

    def kick(self) -> None:
        self.driver.kick(TX)
        self.device._doorbell(TX)
        self.loop.run()

    def drain(self, most: int) -> None:
        """The host reads up to ``most`` bytes; queued output follows (the I/O
        thread's writer callback), and a held-back queue resumes."""
        self.host += self.backend.read(most)
        for callback in list(self.loop.writers.values()):
            callback()
        self.loop.run()

    def close(self) -> None:
        self.device.close()
        self.memory.close()


def _pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 31 + i) & 0xFF for i in range(length))


@pytest.mark.parametrize("capacity", [4096, 1 << 20])
def test_a_stream_goes_through_c_byte_exact(capacity: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Chains of one to three buffers, some indirect; with a roomy pipe C takes every
    one (the Python walk never runs), with a one-page pipe the host takes part of a
    writev and the rest of that buffer is queued, in order."""
    pops = []
    real_pop = SplitQueue.pop
    monkeypatch.setattr(SplitQueue, "pop", lambda self: pops.append(1) or real_pop(self))
    calls = []
    real_transmit = cring.TxPath.transmit
    monkeypatch.setattr(cring.TxPath, "transmit",
                        lambda self, *a: calls.append(1) or real_transmit(self, *a))
    m = Machine(F_VERSION_1 | F_RING_INDIRECT_DESC, direct=True, capacity=capacity)
    try:
        sent = bytearray()
        tx = m.queues[TX]
        for i in range(40):
            parts = [_pattern(i + k, 1000 + 1500 * ((i + k) % 7)) for k in range(1 + i % 3)]
            if tx.can_add(len(parts), indirect=bool(i % 2)):
                tx.add(parts, [], indirect=bool(i % 2))
                sent += b"".join(parts)
            if i % 4 == 3:
                m.kick()
                m.drain(1 << 20)
                assert all(u.length == 0 for u in tx.used())
        for _ in range(50):
            m.drain(1 << 20)
        tx.used()
        assert m.host == sent
        assert m.device.ports[0].transmitted == len(sent)
        assert m.backend.written == len(sent) and m.backend.dropped == 0
        assert calls
        if capacity > len(sent):
            assert not pops
        else:
            assert pops  # the Python path queued what the pipe refused
        assert not m.driver.read(STATUS, 1) & DEVICE_NEEDS_RESET
    finally:
        m.close()


def test_a_chain_c_refuses_resets_the_device_as_python_does() -> None:
    m = Machine(F_VERSION_1, direct=True, capacity=1 << 20)
    try:
        tx = m.queues[TX]
        tx.add([b"first"], [])
        head = tx._free_descriptors.pop()
        tx.write_descriptor(tx.desc_gpa(head), RAM - 4, 16, 0, 0)  # past the end of RAM
        tx.publish(head)
        m.kick()
        m.drain(1 << 20)
        assert m.host == b"first"
        assert m.driver.read(STATUS, 1) & DEVICE_NEEDS_RESET
        assert "not inside guest RAM" in m.vm.logged[-1]
    finally:
        m.close()


# ---- the same outcome on both paths, whatever the guest does ----

_ADDRESSES = st.one_of(st.integers(0, RAM + 0x2000), st.integers(0, (1 << 64) - 1),
                       st.just(RAM - 16), st.just(0xFFFF_FFFF_FFFF_FFF0))
_DESCRIPTOR = st.tuples(_ADDRESSES, st.integers(0, 4096),
                        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 1]),
                        st.integers(0, 20))
_DATA_CHAIN = st.tuples(st.just("data"), st.lists(st.integers(0, 4096), min_size=1,
                                                  max_size=3), st.booleans())
_RAW_CHAIN = st.tuples(st.just("raw"), st.lists(_DESCRIPTOR, min_size=1, max_size=4),
                       st.binary(max_size=80))
#: Mostly well-formed chains, some hostile ones (a broken ring ends the story).
_CHAIN = st.integers(0, 19).flatmap(lambda i: _RAW_CHAIN if i == 0 else _DATA_CHAIN)
_TX = st.lists(_CHAIN, min_size=1, max_size=10)


def _add(m: Machine, chains: list[tuple[Any, ...]], seed: int) -> bytes:
    """Make ``chains`` available and notify; the bytes of the well-formed ones."""
    queue = m.queues[TX]
    indirect_ok = bool(m.features & F_RING_INDIRECT_DESC)
    sent = bytearray()
    for n, chain in enumerate(chains):
        if chain[0] == "data":
            _, lengths, indirect = chain
            parts = [_pattern(seed + n + k, length) for k, length in enumerate(lengths)]
            indirect = indirect and indirect_ok
            if queue.can_add(len(parts), indirect=indirect):
                queue.add(parts, [], indirect=indirect)
                sent += b"".join(parts)
        else:
            queue.add_raw(chain[1], chain[2])
    m.kick()
    return bytes(sent)


def _outcome(m: Machine) -> dict[str, Any]:
    m.drain(1 << 20)
    backend = m.backend
    return {"host": bytes(m.host), "used": m.queues[TX].used_elements(),
            "status": m.driver.read(STATUS, 1), "log": list(m.vm.logged),
            "dropped": backend.dropped, "written": backend.written,
            "transmitted": m.device.ports[0].transmitted}


_FEATURES = st.sampled_from([F_VERSION_1, F_VERSION_1 | F_RING_INDIRECT_DESC,
                             F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(features=_FEATURES, batches=st.lists(_TX, min_size=1, max_size=8))
def test_hostile_rings_have_the_same_outcome_on_both_paths(
        features: int, batches: list[list[tuple[Any, ...]]]) -> None:
    """A host that takes everything (the pipe holds more than the test sends), so that
    both paths return the same chains at the same moments."""
    python = Machine(features, direct=False, capacity=1 << 20)
    c = Machine(features, direct=True, capacity=1 << 20)
    try:
        for seed, chains in enumerate(batches):
            for m in (python, c):
                _add(m, chains, seed)
            assert _outcome(python) == _outcome(c)
        event(f"bytes {bool(c.host)}, reset {bool(c.driver.read(STATUS, 1) & 0x40)}")
    finally:
        python.close()
        c.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(features=_FEATURES, capacity=st.sampled_from([4096, 8192, 16384]),
       steps=st.lists(st.one_of(
           st.tuples(st.just("tx"), st.lists(_DATA_CHAIN, min_size=1, max_size=10)),
           st.tuples(st.just("drain"), st.integers(0, 1 << 15))), min_size=1, max_size=12))
def test_a_slow_host_gets_the_stream_in_order(features: int, capacity: int,
                                              steps: list[tuple[Any, ...]]) -> None:
    """Through a pipe that takes part of a writev: every byte once, in order, every
    chain returned once, nothing dropped."""
    m = Machine(features, direct=True, capacity=capacity)
    path = m.device.tx_path
    assert path is not None
    statuses = set()

    def transmit(*args: Any) -> tuple[int, int, int, int]:
        result = cring.TxPath.transmit(path, *args)
        statuses.add(result[0])
        return result

    path.transmit = transmit  # type: ignore[method-assign]
    try:
        sent = bytearray()
        posted = 0
        used: list[tuple[int, int, bytes | None]] = []
        for seed, (kind, what) in enumerate(steps):
            if kind == "tx":
                before = len(m.queues[TX]._posted)
                sent += _add(m, what, seed)
                posted += len(m.queues[TX]._posted) - before
            else:
                m.drain(what)
            used += m.queues[TX].used_elements()
        for _ in range(200):
            m.drain(1 << 20)
            used += m.queues[TX].used_elements()
            if m.host == sent:
                break
        assert m.host == sent
        assert len(used) == posted and all(length == 0 for _, length, _ in used)
        assert m.backend.dropped == 0 and not m.driver.read(STATUS, 1) & DEVICE_NEEDS_RESET
        event(f"host took part of a writev: {cring.BLOCKED in statuses}")
    finally:
        m.close()
