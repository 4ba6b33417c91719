# SPDX-License-Identifier: BSD-2-Clause
"""The split virtqueue, device side: its state record, the chain walker's rules,
used-ring publication and notification suppression; property tests with hostile rings
and a stateful test against a well-behaved driver."""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Iterator

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from hvf._kvm import ffi
from hvf.dma import GuestDma, write_views
from hvf.errors import VirtqueueError
from hvf.memory import HIGHMEM_BASE, LOWMEM_LIMIT, GiB, GuestMemory, MiB
from hvf.plugins.virtio.queue import (
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Chain,
    QueueState,
    SplitQueue,
)
from hvf.testing.virtio import VirtqDriver

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
_DESC = struct.Struct("<QIHH")
HIGH = 3 * GiB + 2 * MiB


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory(1 * MiB)
    yield mem
    mem.close()


def make(memory: GuestMemory, size: int = 8, *, event_idx: bool = False,
         indirect: bool = True, start: int = 0) -> tuple[VirtqDriver, SplitQueue]:
    driver = VirtqDriver(memory, size, event_idx=event_idx, start=start)
    queue = SplitQueue(GuestDma(memory), driver.state(), event_idx=event_idx,
                       indirect=indirect, name="test queue")
    return driver, queue


def take(queue: SplitQueue) -> Chain:
    chain = queue.pop()
    assert chain is not None
    return chain


def file_offset(memory: GuestMemory, view: memoryview) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(view))) - memory.host_addr


def hand_built(driver: VirtqDriver, *descriptors: tuple[int, int, int, int],
               at: int = 0) -> int:
    """Write ``(addr, len, flags, next)`` descriptors from table index ``at`` and make
    the chain from ``at`` available."""
    for i, desc in enumerate(descriptors):
        driver.write_descriptor(driver.desc_gpa(at + i), *desc)
    driver.publish(at)
    return at


def write_table(memory: GuestMemory, gpa: int, *descriptors: tuple[int, int, int, int]) -> int:
    for i, desc in enumerate(descriptors):
        memory.write(gpa + 16 * i, _DESC.pack(*desc))
    return 16 * len(descriptors)


# ---- the state record ----

def ready_state(**changes: object) -> dict[str, object]:
    fields = QueueState(size=256, ready=True, desc_addr=0x1000, avail_addr=0x2002,
                        used_addr=0x3004, next_avail=65535, next_used=65530).to_fields()
    fields.update(changes)
    return fields


def test_state_round_trips_through_plain_fields() -> None:
    fields = ready_state()
    assert fields == {"size": 256, "ready": True, "desc_addr": 0x1000, "avail_addr": 0x2002,
                      "used_addr": 0x3004, "next_avail": 65535, "next_used": 65530}
    assert QueueState.from_fields(fields).to_fields() == fields


@pytest.mark.parametrize(("changes", "message"), [
    ({"extra": 1}, "unknown virtqueue state field 'extra'"),
    ({"ready": 1}, "'ready' is not a bool"),
    ({"size": True}, "'size' is not an unsigned integer"),
    ({"size": 65536}, "'size' is not an unsigned integer of 16 bits"),
    ({"desc_addr": 1 << 64}, "'desc_addr' is not an unsigned integer of 64 bits"),
    ({"avail_addr": -2}, "'avail_addr' is not an unsigned"),
    ({"next_avail": 65536}, "'next_avail' is not an unsigned integer of 16 bits"),
    ({"next_used": "0"}, "'next_used' is not an unsigned"),
    ({"size": 0}, "'size' \\(0\\) is not a power of two"),
    ({"size": 96}, "'size' \\(96\\) is not a power of two up to 32768"),
    ({"size": 65535}, "is not a power of two up to 32768"),
    ({"desc_addr": 0x1008}, "'desc_addr' \\(0x1008\\) is not 16-byte aligned"),
    ({"avail_addr": 0x2001}, "'avail_addr' \\(0x2001\\) is not 2-byte aligned"),
    ({"used_addr": 0x3002}, "'used_addr' \\(0x3002\\) is not 4-byte aligned"),
    ({"next_avail": 300, "next_used": 43}, "more chains in flight than the queue holds"),
])
def test_state_from_fields_refuses_what_no_queue_holds(changes: dict[str, object],
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QueueState.from_fields(ready_state(**changes))


@pytest.mark.parametrize("name", ["size", "ready", "desc_addr", "avail_addr", "used_addr",
                                  "next_avail", "next_used"])
def test_state_from_fields_needs_every_field(name: str) -> None:
    fields = ready_state()
    del fields[name]
    with pytest.raises(ValueError, match=f"'{name}' is missing"):
        QueueState.from_fields(fields)


def test_a_queue_not_ready_may_hold_unaligned_addresses() -> None:
    fields = ready_state(ready=False, desc_addr=0x1001, avail_addr=3, used_addr=0x3003)
    assert QueueState.from_fields(fields).desc_addr == 0x1001
    with pytest.raises(ValueError, match="power of two"):
        QueueState.from_fields(ready_state(ready=False, size=3))


# ---- setting up the queue ----

@pytest.mark.parametrize(("changes", "message"), [
    ({"desc_addr": 1 * MiB - 64}, "descriptor table at 0xfffc0 \\(128 bytes\\) is not inside"),
    ({"avail_addr": 1 * MiB - 20}, "available ring at 0xfffec \\(22 bytes\\)"),
    ({"used_addr": 1 * MiB - 68}, "used ring at 0xfffbc \\(70 bytes\\)"),
    ({"used_addr": 0x3002}, "'used_addr' \\(0x3002\\) is not 4-byte aligned"),
    ({"size": 12}, "not a power of two"),
])
def test_queue_refuses_rings_outside_ram_or_misplaced(memory: GuestMemory,
                                                      changes: dict[str, int],
                                                      message: str) -> None:
    state = VirtqDriver(memory, 8).state()
    for name, value in changes.items():
        setattr(state, name, value)
    with pytest.raises(VirtqueueError, match=f"^test queue: .*{message}"):
        SplitQueue(GuestDma(memory), state, event_idx=False, indirect=False, name="test queue")


# ---- taking chains ----

def test_pop_returns_nothing_until_the_driver_publishes(memory: GuestMemory) -> None:
    driver, queue = make(memory)
    assert queue.pop() is None
    head = driver.add([b"req"], [4])
    chain = take(queue)
    assert chain.head == head
    assert queue.pop() is None
    assert queue.state.next_avail == 1


def test_chain_views_are_guest_ram_readable_first(memory: GuestMemory) -> None:
    driver, queue = make(memory)
    head = driver.add([b"head", b"er"], [3, 5])
    chain = take(queue)
    assert [bytes(v) for v in chain.readable] == [b"head", b"er"]
    assert (chain.readable_length, chain.writable_length) == (6, 8)
    assert [len(v) for v in chain.writable] == [3, 5]
    assert write_views(chain.writable, b"abcdefgh") == 8
    queue.push(chain, 8)
    [used] = driver.used()
    assert (used.head, used.length, used.data) == (head, 8, b"abcdefgh")


def test_indirect_chain(memory: GuestMemory) -> None:
    driver, queue = make(memory, 8)
    head = driver.add([b"a", b"bc", b"def"], [1, 2, 3], indirect=True)
    assert len(driver._free_descriptors) == 7  # six buffers, one descriptor of the ring
    chain = take(queue)
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"a", b"bc", b"def"]
    assert [len(v) for v in chain.writable] == [1, 2, 3]


def test_direct_descriptors_then_one_indirect_table(memory: GuestMemory) -> None:
    driver, queue = make(memory)
    table = 0x80000
    write_table(memory, table, (0x5000, 2, NEXT, 1), (0x6000, 7, WRITE, 0))
    # The write flag of the descriptor that refers to a table is ignored.
    hand_built(driver, (0x4000, 1, NEXT, 1), (table, 32, INDIRECT | WRITE, 0))
    chain = take(queue)
    assert [file_offset(memory, v) for v in chain.readable] == [0x4000, 0x5000]
    assert [file_offset(memory, v) for v in chain.writable] == [0x6000]
    assert (chain.readable_length, chain.writable_length) == (3, 7)


def test_zero_length_buffers_are_accepted(memory: GuestMemory) -> None:
    driver, queue = make(memory)
    hand_built(driver, (0x4000, 0, NEXT, 1), (1 * MiB, 0, WRITE, 0))
    chain = take(queue)
    assert (chain.readable_length, chain.writable_length) == (0, 0)


def test_pop_rereads_the_available_index(memory: GuestMemory) -> None:
    driver, queue = make(memory)
    first = driver.add([b"1"], [])
    second = driver.add([b"2"], [])
    assert [take(queue).head, take(queue).head] == [first, second]
    assert queue.pop() is None
    third = driver.add([b"3"], [])
    assert take(queue).head == third


def test_a_chain_may_be_as_long_as_the_queue(memory: GuestMemory) -> None:
    driver, queue = make(memory, 4)
    hand_built(driver, *[(0x4000 + i, 1, NEXT, i + 1) for i in range(3)], (0x5000, 1, WRITE, 0))
    chain = take(queue)
    assert len(chain.readable) + len(chain.writable) == 4


# Each: queue size, descriptors from index 0, indirect tables {gpa: descriptors}, message.
TABLE = 0x80000
REJECTED = {
    "next beyond the table": (
        4, [(0x4000, 1, NEXT, 4)], {}, "descriptor 0 links to 4, beyond the 4 descriptors"),
    "a loop": (4, [(0x4000, 1, NEXT, 1), (0x4000, 1, NEXT, 0)], {},
               "the chain from head 0 is longer than the queue size 4"),
    "a self loop": (2, [(0x4000, 1, NEXT, 0)], {}, "longer than the queue size 2"),
    "readable after writable": (
        4, [(0x4000, 1, WRITE | NEXT, 1), (0x4000, 1, 0, 0)], {},
        "descriptor 1 is device-readable after a device-writable one"),
    "a buffer past the end of RAM": (
        4, [(1 * MiB - 4, 5, 0, 0)], {}, "descriptor 0 buffer 0xffffc length 0x5 is not inside"),
    "a buffer past 2^64": (4, [((1 << 64) - 2, 4, 0, 0)], {}, "is not inside guest RAM"),
    "indirect inside a table": (
        4, [(TABLE, 16, INDIRECT, 0)], {TABLE: [(TABLE, 16, INDIRECT, 0)]},
        "an indirect table holds an indirect descriptor"),
    "indirect with next": (4, [(TABLE, 16, INDIRECT | NEXT, 1)], {TABLE: [(0x4000, 1, 0, 0)]},
                           "descriptor 0 is indirect and has VIRTQ_DESC_F_NEXT set"),
    "an empty indirect table": (4, [(TABLE, 0, INDIRECT, 0)], {},
                                "table length 0 is not a non-zero multiple of 16"),
    "a ragged indirect table": (4, [(TABLE, 24, INDIRECT, 0)], {TABLE: [(0x4000, 1, 0, 0)]},
                                "table length 24 is not a non-zero multiple of 16"),
    "an indirect table outside RAM": (
        4, [(1 * MiB - 16, 32, INDIRECT, 0)], {},
        "descriptor 0's indirect table 0xffff0 length 0x20 is not inside guest RAM"),
    "next beyond the indirect table": (
        8, [(TABLE, 32, INDIRECT, 0)], {TABLE: [(0x4000, 1, NEXT, 1), (0x4000, 1, NEXT, 2)]},
        "indirect descriptor 1 of the chain from head 0 links to 2, beyond the 2"),
    "a loop in the indirect table": (
        8, [(TABLE, 32, INDIRECT, 0)], {TABLE: [(0x4000, 1, NEXT, 1), (0x4000, 1, NEXT, 0)]},
        "longer than its indirect table of 2 descriptors"),
    "an indirect chain longer than the queue": (
        2, [(TABLE, 48, INDIRECT, 0)],
        {TABLE: [(0x4000, 1, NEXT, 1), (0x4000, 1, NEXT, 2), (0x4000, 1, 0, 0)]},
        "longer than the queue size 2"),
    "direct then indirect longer than the queue": (
        4, [(0x4000, 1, NEXT, 1), (0x4000, 1, NEXT, 2), (TABLE, 48, INDIRECT, 0)],
        {TABLE: [(0x4000, 1, NEXT, 1), (0x4000, 1, NEXT, 2), (0x4000, 1, 0, 0)]},
        "longer than the queue size 4"),
    "readable in the table after writable before it": (
        4, [(0x4000, 1, WRITE | NEXT, 1), (TABLE, 16, INDIRECT, 0)], {TABLE: [(0x4000, 1, 0, 0)]},
        "indirect descriptor 0 of the chain from head 0 is device-readable after"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_pop_rejects_rule_breaking_chains(memory: GuestMemory, case: str) -> None:
    size, descriptors, tables, message = REJECTED[case]
    driver, queue = make(memory, size)
    for gpa, table in tables.items():
        write_table(memory, gpa, *table)
    hand_built(driver, *descriptors)
    with pytest.raises(VirtqueueError, match="^test queue: .*" + re.escape(message)):
        queue.pop()
    assert queue.state.next_avail == 0  # nothing was taken


def test_indirect_needs_the_feature(memory: GuestMemory) -> None:
    driver, queue = make(memory, indirect=False)
    driver.add([b"x"], [], indirect=True)
    with pytest.raises(VirtqueueError, match="VIRTIO_F_INDIRECT_DESC was not negotiated"):
        queue.pop()


def test_head_index_beyond_the_queue(memory: GuestMemory) -> None:
    driver, queue = make(memory, 4)
    driver.publish(4)
    with pytest.raises(VirtqueueError, match="head index 4 is not below the queue size 4"):
        queue.pop()


def test_available_index_too_far_ahead(memory: GuestMemory) -> None:
    driver, queue = make(memory, 4, start=65534)
    memory.write(driver.avail_addr + 2, struct.pack("<H", 3))  # 5 past 65534, wrapping
    with pytest.raises(VirtqueueError, match="available index 3 is more than the queue size "
                                             "past the device's position 65534"):
        queue.pop()


def test_chain_longer_than_4_gib_is_refused() -> None:
    memory = GuestMemory(HIGH)
    try:
        driver, queue = make(memory)
        hand_built(driver, (0, LOWMEM_LIMIT, NEXT, 1), (HIGHMEM_BASE, 2 * MiB, NEXT, 2),
                   (0, LOWMEM_LIMIT, 0, 0))
        hand_built(driver, (0, LOWMEM_LIMIT, NEXT, 5), (HIGHMEM_BASE, 2 * MiB, 0, 0), at=4)
        with pytest.raises(VirtqueueError, match=f"longer than {MAX_CHAIN_BYTES:#x} bytes"):
            queue.pop()
        queue.state.next_avail = 1  # skip it: the second, 3 GiB + 2 MiB, is fine
        chain = take(queue)
        assert chain.readable_length == LOWMEM_LIMIT + 2 * MiB
    finally:
        memory.close()


# ---- handing chains back ----

def test_push_writes_the_element_then_the_index(memory: GuestMemory) -> None:
    driver, queue = make(memory, 4, start=65535)
    head = driver.add([], [16])
    chain = take(queue)
    queue.push(chain, 16)
    slot = 65535 % 4
    assert memory.read(driver.used_addr + 4 + 8 * slot, 8) == struct.pack("<II", head, 16)
    assert memory.read(driver.used_addr + 2, 2) == b"\0\0"  # 65535 + 1 wraps
    assert queue.state.next_used == 0
    queue.push(head, 3)  # by head index too
    assert queue.state.next_used == 1


def test_push_refuses_impossible_completions(memory: GuestMemory) -> None:
    _, queue = make(memory, 4)
    chain = Chain(head=1, readable=[], writable=[], readable_length=0, writable_length=8)
    with pytest.raises(ValueError, match="test queue: cannot return head 1 with 9 bytes"):
        queue.push(chain, 9)
    with pytest.raises(ValueError, match="head 4"):
        queue.push(4, 0)
    with pytest.raises(ValueError, match="head 0 with -1"):
        queue.push(0, -1)
    with pytest.raises(ValueError):
        queue.push(0, 1 << 32)
    assert queue.state.next_used == 0


# ---- notification suppression ----

def test_interrupts_follow_the_avail_flag_without_event_idx(memory: GuestMemory) -> None:
    driver, queue = make(memory)
    assert not queue.needs_interrupt()  # nothing pushed
    queue.push(driver.add([b"x"], []), 0)
    assert queue.needs_interrupt()
    assert not queue.needs_interrupt()  # already decided
    driver.set_interrupts(False)
    queue.push(driver.add([b"x"], []), 0)
    assert not queue.needs_interrupt()


def test_interrupts_follow_used_event_with_event_idx(memory: GuestMemory) -> None:
    driver, queue = make(memory, event_idx=True, start=65534)
    driver.set_used_event(65535)  # interrupt once the element at 65535 is used
    for _ in range(3):
        driver.add([b"x"], [])
    queue.push(take(queue), 0)  # used idx 65535: not passed yet
    assert not queue.needs_interrupt()
    queue.push(take(queue), 0)  # used idx 0: passed 65535
    assert queue.needs_interrupt()
    queue.push(take(queue), 0)
    assert not queue.needs_interrupt()
    driver.set_used_event(0)  # an event already behind the used index: no interrupt
    assert not queue.needs_interrupt()


def test_batched_pushes_interrupt_once_the_event_is_passed(memory: GuestMemory) -> None:
    driver, queue = make(memory, event_idx=True)
    driver.set_used_event(2)
    for _ in range(5):
        driver.add([b"x"], [])
    for _ in range(5):
        queue.push(take(queue), 0)
    assert queue.needs_interrupt()  # 0 -> 5 passes 2


def test_notifications_without_event_idx(memory: GuestMemory) -> None:
    driver, queue = make(memory)
    flags = lambda: struct.unpack("<H", memory.read(driver.used_addr, 2))[0]  # noqa: E731
    queue.disable_notifications()
    assert flags() == VIRTQ_USED_F_NO_NOTIFY
    driver.add([b"x"], [])
    assert not driver.notify
    assert queue.enable_notifications()  # one came meanwhile
    assert flags() == 0
    queue.pop()
    assert not queue.enable_notifications()
    driver.add([b"y"], [])
    assert driver.notify


def test_notifications_with_event_idx(memory: GuestMemory) -> None:
    driver, queue = make(memory, event_idx=True, start=65535)
    avail_event = lambda: struct.unpack(  # noqa: E731
        "<H", memory.read(driver.used_addr + 4 + 8 * driver.size, 2))[0]
    driver.add([b"x"], [])
    assert driver.notify  # avail_event is the device's position
    queue.pop()
    assert avail_event() == 0  # taking a chain moves it on
    queue.disable_notifications()
    driver.add([b"y"], [])
    assert driver.notify  # the device has not taken it back yet, so it still asks
    driver.add([b"z"], [])
    assert not driver.notify  # the event stays where disable left it
    queue.pop()
    assert avail_event() == 0
    assert queue.enable_notifications()  # "z" is still there
    assert avail_event() == 1
    queue.pop()
    assert not queue.enable_notifications()
    driver.add([b"w"], [])
    assert driver.notify


def test_a_new_queue_asks_for_notifications(memory: GuestMemory) -> None:
    """A restored snapshot's ring may hold a device's old "don't notify"."""
    driver = VirtqDriver(memory, 8)
    memory.write(driver.used_addr, struct.pack("<H", VIRTQ_USED_F_NO_NOTIFY))
    SplitQueue(GuestDma(memory), driver.state(), event_idx=False, indirect=False)
    assert memory.read(driver.used_addr, 2) == b"\0\0"
    driver = VirtqDriver(memory, 8, event_idx=True, start=300)
    memory.write(driver.used_addr + 4 + 8 * 8, struct.pack("<H", 7))
    state = driver.state()
    SplitQueue(GuestDma(memory), state, event_idx=True, indirect=False)
    assert memory.read(driver.used_addr + 4 + 8 * 8, 2) == struct.pack("<H", 300)


# ---- hostile rings ----

SMALL = 64 * 1024
DESC_TABLE, AVAIL, USED, TABLES = 0x1000, 0x2000, 0x3000, 0x4000
TABLE_STRIDE = 0x400  # indirect tables of up to 64 descriptors at TABLES + k * stride
EDGES = (0, 8, SMALL - 16, SMALL - 1, SMALL, LOWMEM_LIMIT - 16, LOWMEM_LIMIT,
         HIGHMEM_BASE - 8, HIGHMEM_BASE, HIGHMEM_BASE + 2 * MiB - 16, HIGHMEM_BASE + 2 * MiB,
         (1 << 63), (1 << 64) - 16, (1 << 64) - 1)

hostile_addresses = st.one_of(
    st.sampled_from(EDGES), st.builds(lambda k: TABLES + k * TABLE_STRIDE, st.integers(0, 3)),
    st.integers(0, (1 << 64) - 1))
hostile_lengths = st.one_of(
    st.sampled_from([16, 32, 48, 64, 17, TABLE_STRIDE, SMALL, LOWMEM_LIMIT, 1 << 31,
                     (1 << 32) - 1]),
    st.integers(0, (1 << 32) - 1))


@st.composite
def descriptor_tables(draw: st.DrawFn, entries: int, tables: list[int]) -> bytes:
    """A table of ``entries`` descriptors, mostly plausible (buffers in RAM, links
    inside the table, indirect ones to the indirect tables of ``tables`` entries
    each), some hostile in any field, or sometimes raw bytes."""
    if draw(st.integers(0, 9)) == 5:
        return draw(st.binary(min_size=16 * entries, max_size=16 * entries))
    descriptors = []
    for _ in range(entries):
        if draw(st.integers(0, 5)) == 3:
            descriptors.append((draw(hostile_addresses), draw(hostile_lengths),
                                draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))))
            continue
        flags = draw(st.sampled_from([0, NEXT, WRITE, WRITE | NEXT, INDIRECT]))
        if flags == INDIRECT:
            k = draw(st.integers(0, len(tables) - 1))
            addr, length = TABLES + k * TABLE_STRIDE, 16 * tables[k]
        else:
            addr, length = draw(st.integers(0x8000, SMALL - 64)), draw(st.integers(0, 64))
        descriptors.append((addr, length, flags, draw(st.integers(0, max(entries - 1, 0)))))
    return b"".join(_DESC.pack(*d) for d in descriptors)


@attrs.frozen
class HostileRing:
    """A queue's setup and what the guest wrote in its rings."""

    ram: int
    size: int
    event_idx: bool
    indirect: bool
    next_avail: int
    ahead: int  # how far the available index is past next_avail
    ring: list[int]
    table: bytes
    indirect_tables: list[bytes]


@st.composite
def hostile_rings(draw: st.DrawFn) -> HostileRing:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))

    def mostly(usual: st.SearchStrategy[int], rare: st.SearchStrategy[int]) -> int:
        return draw(rare if draw(st.integers(0, 9)) == 5 else usual)

    table_sizes = draw(st.lists(st.integers(0, 16), min_size=4, max_size=4))
    return HostileRing(
        ram=draw(st.sampled_from([SMALL, HIGH])),
        size=size,
        event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()),
        next_avail=draw(st.one_of(st.integers(0, 65535), st.integers(65530, 65535))),
        ahead=mostly(st.integers(1, size), st.integers(0, 65535)),
        ring=[mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF)) for _ in range(size)],
        table=draw(descriptor_tables(size, table_sizes)),
        indirect_tables=[draw(descriptor_tables(n, table_sizes)) for n in table_sizes],
    )


def reference_chain(memory: GuestMemory, size: int, head: int,
                    indirect: bool) -> list[tuple[int, int, bool]] | None:
    """The spec's rules written out plainly: the chain's (gpa, length, writable)
    buffers, or None for a chain the device must refuse."""
    def read(table: int, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(memory.read(table + 16 * index, 16))

    if head >= size:
        return None
    buffers: list[tuple[int, int, bool]] = []
    table, entries, index, in_table, taken_from_table = DESC_TABLE, size, head, False, 0
    while True:
        addr, length, flags, next_index = read(table, index)
        if flags & INDIRECT:
            if (in_table or not indirect or flags & NEXT or length == 0 or length % 16
                    or not memory.contains(addr, length)):
                return None
            table, entries, index, in_table = addr, length // 16, 0, True
            continue
        taken_from_table += in_table
        if len(buffers) == size or taken_from_table > entries:
            return None
        writable = bool(flags & WRITE)
        if not memory.contains(addr, length) or (not writable and any(w for *_, w in buffers)):
            return None
        buffers.append((addr, length, writable))
        if sum(n for _, n, _ in buffers) > 1 << 32:
            return None
        if not flags & NEXT:
            return buffers
        if next_index >= entries:
            return None
        index = next_index


def guest_offset(memory: GuestMemory, gpa: int) -> int:
    for r in memory.regions:
        if r.guest_base <= gpa <= r.guest_end:
            return r.file_offset + gpa - r.guest_base
    raise AssertionError(f"{gpa:#x} is not in RAM")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=hostile_rings())
def test_hostile_rings_give_valid_chains_or_virtqueue_errors(setup: HostileRing) -> None:
    size, next_avail, ring = setup.size, setup.next_avail, setup.ring
    memory = GuestMemory(setup.ram)
    try:
        memory.write(DESC_TABLE, setup.table)
        avail_idx = (next_avail + setup.ahead) & 0xFFFF
        memory.write(AVAIL, struct.pack(f"<HH{size}H", 0, avail_idx, *ring))
        for k, data in enumerate(setup.indirect_tables):
            memory.write(TABLES + k * TABLE_STRIDE, data)
        state = QueueState(size=size, ready=True, desc_addr=DESC_TABLE, avail_addr=AVAIL,
                           used_addr=USED, next_avail=next_avail, next_used=next_avail)
        queue = SplitQueue(GuestDma(memory), state, event_idx=setup.event_idx,
                           indirect=setup.indirect)
        for position in range(min(setup.ahead, size) + 1):
            pending = (avail_idx - state.next_avail) & 0xFFFF
            if pending == 0:
                assert queue.pop() is None
                return
            expected = None if pending > size else reference_chain(
                memory, size, ring[(next_avail + position) % size], setup.indirect)
            if expected is None:
                with pytest.raises(VirtqueueError):
                    queue.pop()
                return
            chain = take(queue)
            got = [(file_offset(memory, v), len(v), False) for v in chain.readable] + [
                (file_offset(memory, v), len(v), True) for v in chain.writable]
            assert got == [(guest_offset(memory, g), n, w) for g, n, w in expected]
            assert len(got) <= size
            assert chain.readable_length == sum(n for _, n, w in expected if not w)
            assert chain.writable_length == sum(n for _, n, w in expected if w)
    finally:
        memory.close()


# ---- a well-behaved driver, a device doing what devices may ----

class VirtqueueMachine(RuleBasedStateMachine):
    """Every chain the driver adds comes back once, in the order pushed, with what the
    device wrote; interrupts and notifications are decided as the spec says, and a
    device waiting for a notification always gets one."""

    @initialize(size=st.sampled_from([1, 2, 4, 4, 8, 8, 16, 16]), event_idx=st.booleans(),
                indirect=st.booleans(),
                start=st.one_of(st.just(0), st.integers(65500, 65535), st.integers(0, 65535)))
    def setup(self, size: int, event_idx: bool, indirect: bool, start: int) -> None:
        self.memory = GuestMemory(1 * MiB)
        self.driver, self.queue = make(self.memory, size, event_idx=event_idx,
                                       indirect=indirect, start=start)
        self.event_idx = event_idx
        self.indirect = indirect
        self.available: deque[tuple[int, list[bytes], list[int]]] = deque()
        self.in_flight: list[Chain] = []
        self.pushed: deque[tuple[int, int, bytes]] = deque()
        self.decided_used = start
        self.notifications_enabled = True
        self.device_waits = False

    def teardown(self) -> None:
        if hasattr(self, "memory"):
            self.memory.close()

    @rule(chains=st.lists(st.lists(st.one_of(st.binary(max_size=24), st.integers(0, 40)),
                                   min_size=1, max_size=4), min_size=1, max_size=3),
          indirect=st.booleans())
    def driver_adds(self, chains: list[list[bytes | int]], indirect: bool) -> None:
        """Each chain's buffers: bytes for the device to read, lengths for it to write."""
        indirect = indirect and self.indirect
        for buffers in chains:
            buffers = buffers[: self.driver.size]
            if not self.driver.can_add(len(buffers), indirect=indirect):
                self.driver_reaps()  # as a driver short of descriptors does
                if not self.driver.can_add(len(buffers), indirect=indirect):
                    return
            readable = [b for b in buffers if isinstance(b, bytes)]
            writable = [n for n in buffers if isinstance(n, int)]
            head = self.driver.add(readable, writable, indirect=indirect)
            self.available.append((head, readable, writable))
            if self.device_waits:
                assert self.driver.notify, "the device waits for a notification never sent"
            if self.driver.notify:
                self.device_waits = False

    @rule(count=st.integers(1, 4))
    def device_pops(self, count: int) -> None:
        for _ in range(count):
            chain = self.queue.pop()
            if not self.available:
                assert chain is None
                self.device_waits = self.notifications_enabled
                return
            head, readable, writable = self.available.popleft()
            assert chain is not None and chain.head == head
            assert [bytes(v) for v in chain.readable] == readable
            assert [len(v) for v in chain.writable] == writable
            assert chain.readable_length == sum(map(len, readable))
            assert chain.writable_length == sum(writable)
            self.in_flight.append(chain)
            self.device_waits = False

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def device_pushes(self, data: st.DataObject) -> None:
        """Some chains, in any order, each with a random amount written."""
        for _ in range(data.draw(st.integers(1, len(self.in_flight)))):
            chain = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
            written = data.draw(st.integers(0, chain.writable_length))
            payload = data.draw(st.binary(min_size=written, max_size=written))
            write_views(chain.writable, payload)
            self.queue.push(chain, written)
            self.pushed.append((chain.head, written, payload))

    @rule()
    def driver_reaps(self) -> None:
        for used in self.driver.used():
            assert (used.head, used.length, used.data) == self.pushed.popleft()
        assert not self.pushed

    @rule(ahead=st.integers(-3, 20), enabled=st.booleans())
    def driver_asks_for_interrupts(self, ahead: int, enabled: bool) -> None:
        """With EVENT_IDX, an event near the device's last decision (behind it too:
        a driver may lag)."""
        if self.event_idx:
            self.driver.set_used_event((self.decided_used + ahead) & 0xFFFF)
        else:
            self.driver.set_interrupts(enabled)

    @rule()
    def device_decides_interrupt(self) -> None:
        new, old = self.queue.state.next_used, self.decided_used
        self.decided_used = new
        if self.event_idx:  # the element at used_event was written since the last decision
            expected = (self.driver.used_event() - old) & 0xFFFF < (new - old) & 0xFFFF
        else:
            expected = new != old and self.driver.interrupts_enabled()
        assert self.queue.needs_interrupt() == expected

    @rule(enable=st.booleans())
    def device_switches_notifications(self, enable: bool) -> None:
        if enable:
            more = self.queue.enable_notifications()
            assert more == bool(self.available)
            self.device_waits = not more
        else:
            self.queue.disable_notifications()
            self.device_waits = False
        self.notifications_enabled = enable


TestVirtqueueMachine = VirtqueueMachine.TestCase
TestVirtqueueMachine.settings = settings(max_examples=200, stateful_step_count=80,
                                         deadline=None)
