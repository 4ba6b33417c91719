# SPDX-License-Identifier: BSD-2-Clause
"""Hostile guests against virtio-blk (Hypothesis), on a real image file and guest RAM
with the PCI hole (low RAM up to 3 GiB, 2 MiB from 4 GiB).

The guest writes descriptor tables by hand: chains built well and then mutated (next
links into loops or beyond the table, indirect tables where they are not allowed or
of bad lengths, device-readable after device-writable, no status byte), buffers at
the edges of RAM, in the hole, beyond it, of huge lengths, headers of every type,
sectors beyond the end, oversized discard and write-zeroes lists, on read-only and
direct-I/O images. A reference model of the split queue (as
:mod:`hvf.plugins.virtio.queue` documents it) and of virtio-blk's requests
(``virtio_blk_model.py``) says what each chain must do; the device must do exactly
that:

* a chain that breaks the queue's rules puts the device in DEVICE_NEEDS_RESET and
  nothing else happens;
* every other chain comes back in the used ring with the model's length and status
  (OK, IOERR or UNSUPP);
* guest RAM changes only where the model writes (device-writable buffers) and in the
  used ring; the image only where the model's valid writes and discards go, and keeps
  its size;
* nothing raises, nothing is logged as a failure.

Random queue layouts (sizes, ring addresses outside RAM, misaligned, overlapping)
either run or put the device in DEVICE_NEEDS_RESET, as the model says. Regressions:
GET_ID into a huge buffer, oversized discard lists, a bad chain behind requests in
flight, a reset with requests in flight.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hvf.memory import HIGHMEM_BASE, LOWMEM_LIMIT, GuestMemory, MiB
from hvf.plugins.virtio import blk
from hvf.plugins.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hvf.plugins.virtio.spec import ACKNOWLEDGE, DRIVER, DRIVER_OK, F_VERSION_1, FEATURES_OK
from hvf.testing.virtio import STATUS, VirtqDriver
from virtio_blk_model import (
    CAN_PUNCH,
    CAPACITY,
    DATA,
    DATA_END,
    IMAGE,
    INDIRECT,
    RAM,
    RINGS,
    SERIAL,
    WATCHED,
    Disk,
    Options,
    Outcome,
    guest_memory,
    disk,
    in_ram,
    no_failures_logged,
    serve,
    walk,
)

_FUZZ = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- regressions ----

BIG = 256 * MiB


def _peak_during(action: Callable[[], None]) -> int:
    """The most memory Python allocated (tracemalloc) while ``action`` ran."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_get_id_writes_twenty_bytes_into_a_huge_buffer() -> None:
    """GET_ID into a 256 MiB buffer: the NUL-padded 20-byte ID, status OK, used length
    21 (the ID was once padded to the whole buffer, allocating its size)."""
    memory = guest_memory()
    with disk(Options(readonly=False, nocache=False, indirect=False, size=4)) as (d, _):
        memory.write(DATA, struct.pack("<IIQ", blk.T_GET_ID, 0, 0))
        memory.write(DATA + 0x1000, b"\xee" * 64)
        status = DATA + 0x1000 + BIG
        q = d.queue
        q.write_descriptor(q.desc_gpa(0), DATA, 16, VIRTQ_DESC_F_NEXT, 1)
        q.write_descriptor(q.desc_gpa(1), DATA + 0x1000, BIG, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
        q.write_descriptor(q.desc_gpa(2), status, 1, VIRTQ_DESC_F_WRITE, 0)
        q.publish(0)
        assert _peak_during(d.kick) < MiB
        assert d.used() == [(0, blk.ID_BYTES + 1)]
        assert memory.read(DATA + 0x1000, 64) == SERIAL.ljust(20, b"\0") + b"\xee" * 44
        assert memory.read(status, 1) == bytes([blk.S_OK])


@pytest.mark.parametrize("kind", [blk.T_DISCARD, blk.T_WRITE_ZEROES])
def test_oversized_segment_list_is_refused_before_it_is_copied(kind: int) -> None:
    """A discard or write-zeroes list of 256 MiB is IOERR at once (it was joined into
    one bytes object first)."""
    memory = guest_memory()
    with disk(Options(readonly=False, nocache=False, indirect=False, size=4)) as (d, path):
        before = path.read_bytes()
        memory.write(DATA, struct.pack("<IIQ", kind, 0, 0))
        q = d.queue
        q.write_descriptor(q.desc_gpa(0), DATA, 16, VIRTQ_DESC_F_NEXT, 1)
        q.write_descriptor(q.desc_gpa(1), DATA + 0x1000, BIG, VIRTQ_DESC_F_NEXT, 2)
        q.write_descriptor(q.desc_gpa(2), DATA + 0x800, 1, VIRTQ_DESC_F_WRITE, 0)
        q.publish(0)
        assert _peak_during(d.kick) < MiB
        assert d.used() == [(0, 1)]
        assert memory.read(DATA + 0x800, 1) == bytes([blk.S_IOERR])
        assert path.read_bytes() == before


def _post_write(d: Disk, slot: int, sector: int, data: bytes, at: int) -> None:
    """A well-formed OUT chain at descriptors slot..slot+2, buffers from ``at``."""
    q = d.queue
    d.memory.write(at, struct.pack("<IIQ", blk.T_OUT, 0, sector))
    d.memory.write(at + 0x200, data)
    q.write_descriptor(q.desc_gpa(slot), at, 16, VIRTQ_DESC_F_NEXT, slot + 1)
    q.write_descriptor(q.desc_gpa(slot + 1), at + 0x200, len(data), VIRTQ_DESC_F_NEXT, slot + 2)
    q.write_descriptor(q.desc_gpa(slot + 2), at + 0x100, 1, VIRTQ_DESC_F_WRITE, 0)
    q.publish(slot)


def test_bad_chain_behind_requests_in_flight() -> None:
    """A write, then a chain out of RAM in the same notification: the device needs a
    reset; the write, already handed to the back end, lands in the image, but its
    completion does not touch the dead queue; after a reset the device serves again."""
    memory = guest_memory()
    with no_failures_logged(), disk(Options(readonly=False, nocache=False, indirect=False,
                                            size=16)) as (d, path):
        _post_write(d, 0, 3, b"\x5a" * 512, DATA)
        q = d.queue
        q.write_descriptor(q.desc_gpa(3), HIGHMEM_BASE - 8, 16, 0, 0)  # in the hole
        q.publish(3)
        d.kick()
        assert d.needs_reset() and d.device.in_flight == 0
        # The C path's thread may return the write before the I/O thread reaches the
        # bad chain; nothing is returned once the device needs a reset.
        early = d.used()
        assert early in ([], [(0, 1)])
        assert d.device.drain(10) and d.used() == early
        assert path.read_bytes()[3 * 512 : 4 * 512] == b"\x5a" * 512
        d.start()
        _post_write(d, 0, 5, b"\xa5" * 1024, DATA + 0x1000)
        d.kick()
        assert d.used() == [(0, 1)] and memory.read(DATA + 0x1100, 1) == bytes([blk.S_OK])
        assert path.read_bytes()[5 * 512 : 7 * 512] == b"\xa5" * 1024


def test_reset_with_requests_in_flight() -> None:
    """The driver resets the device while its writes run: nothing raises, the
    completions do not touch the reset queue, and the device serves again."""
    memory = guest_memory()
    with no_failures_logged(), disk(Options(readonly=False, nocache=True, indirect=False,
                                            size=16)) as (d, path):
        for k in range(5):
            _post_write(d, 3 * k, 8 * k, bytes([k + 1]) * 4096, DATA + 0x2000 * k)
        d.driver.kick(0)
        d.device._doorbell(0)
        d.driver.write(STATUS, 1, 0)  # reset, the writes in flight or done
        assert d.device.drain(10) and d.device.in_flight == 0
        assert d.device.queues == [None]
        assert int.from_bytes(memory.read(d.queue.used_addr + 2, 2), "little") <= 5
        d.start()
        _post_write(d, 0, 100, b"\x77" * 512, DATA + 0x10000)
        d.kick()
        assert d.used() == [(0, 1)]
        assert path.read_bytes()[100 * 512 : 101 * 512] == b"\x77" * 512

# ---- what the guest writes ----

#: Buffer addresses: the data area, the edges of both RAM regions (and the hole
#: between), anywhere at all (almost never RAM).
_ADDR = st.one_of(
    st.integers(DATA, DATA_END - 1), st.integers(DATA, DATA_END - 1),
    st.integers(LOWMEM_LIMIT - 0x400, LOWMEM_LIMIT + 0x400),
    st.integers(HIGHMEM_BASE - 0x400, HIGHMEM_BASE + 0x400),
    st.integers(HIGHMEM_BASE + 2 * MiB - 0x400, HIGHMEM_BASE + 2 * MiB + 0x400),
    st.integers(LOWMEM_LIMIT, 2**64 - 1))
_LEN = st.one_of(st.integers(0, 40), st.sampled_from([0, 1, 15, 16, 17, 32, 511, 512, 1024, 4096]),
                 st.integers(0, 2**32 - 1),
                 st.sampled_from([2**32 - 1, 2**31, LOWMEM_LIMIT - DATA]))
_SANE = st.tuples(st.integers(DATA // 512, DATA_END // 512 - 16).map(lambda s: s * 512),
                  st.sampled_from([16, 512, 1024, 4096]))
_BUFFER = st.one_of(_SANE, _SANE, st.tuples(_ADDR, _LEN))
_TYPES = st.sampled_from([blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID, blk.T_DISCARD,
                          blk.T_WRITE_ZEROES, 2, 3, 99, 2**32 - 1])
_SECTOR = st.one_of(st.integers(0, CAPACITY + 2), st.integers(CAPACITY - 8, CAPACITY),
                    st.integers(0, 2**64 - 1))
_SEGMENT = st.tuples(_SECTOR, st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1)),
                     st.sampled_from([0, 0, 0, 1, 2, 2**32 - 1]))
_MUTATION = st.tuples(st.integers(0, 7), st.sampled_from(["flags", "next", "len", "addr"]),
                      st.integers(0, 2**64 - 1))


@attrs.define
class ChainPlan:
    """One chain: its buffers in order (readable first), the bytes the readable ones
    hold, where its descriptors go, and what is then broken in them."""

    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    stream: bytes
    indirect: bool
    table_len: int | None  # the indirect table's length, if not 16 per buffer
    prefix: bool  # a direct descriptor first, linking to the indirect one
    slots: list[int]  # main-table indices, in chain order
    mutations: list[tuple[int, str, int]]


_SPOT = st.tuples(st.integers(DATA // 512, DATA_END // 512 - 24), st.sampled_from([0, 0, 0, 8, 100])
                  ).map(lambda t: t[0] * 512 + t[1])


@st.composite
def chain_plans(draw: st.DrawFn, size: int, indirect: bool) -> ChainPlan:
    """Mostly chains a driver would write (then perhaps broken), sometimes anything."""
    kind = draw(_TYPES)
    good = draw(st.integers(0, 3)) > 0
    sector = draw(st.integers(0, CAPACITY - 8) if good else _SECTOR)
    header = struct.pack("<IIQ", kind, draw(st.sampled_from([0, 0, 1, 2**32 - 1])), sector)
    if kind in (blk.T_DISCARD, blk.T_WRITE_ZEROES):
        segment = st.tuples(st.integers(0, CAPACITY - 16), st.integers(0, 16),
                            st.sampled_from([0, 0, 1])) if good else _SEGMENT
        payload = b"".join(struct.pack("<QII", *seg)
                           for seg in draw(st.lists(segment, min_size=good, max_size=3)))
    elif kind == blk.T_OUT or not good:
        payload = bytes([draw(st.integers(0, 255))]) * draw(st.sampled_from([0, 512, 1024, 100]))
    else:
        payload = b""
    if good:
        cut = draw(st.sampled_from([16, 16, 16, 3]))
        readable = [(draw(_SPOT), cut)] + ([(draw(_SPOT), 16 - cut)] if cut < 16 else [])
        if payload:
            readable.append((draw(_SPOT), len(payload)))
        writable = [(draw(_SPOT), draw(st.sampled_from([512, 1024, 20, 8])))
                    for _ in range(kind in (blk.T_IN, blk.T_GET_ID))]
        writable.append((draw(_SPOT), 1))
    else:
        readable = draw(st.lists(_BUFFER, min_size=0, max_size=3))
        writable = draw(st.lists(_BUFFER, min_size=0, max_size=3))
        if draw(st.booleans()):
            writable.append((draw(st.integers(DATA, DATA_END - 1)), 1))  # a status byte
    count = len(readable) + len(writable)
    slots = draw(st.permutations(range(size)))[: max(count, 1) + 1]
    use_indirect = draw(st.booleans()) if indirect or not good else False
    return ChainPlan(readable, writable, header + payload, use_indirect,
                     draw(st.sampled_from([None] * 6 + [0, 8, 24, 2**32 - 16])),
                     draw(st.booleans()), slots,
                     draw(st.lists(_MUTATION, max_size=2 if not good or draw(st.booleans())
                                   else 0)))


def place(memory: GuestMemory, queue: VirtqDriver, plan: ChainPlan) -> int:
    """Write the chain's contents and descriptors; return its head."""
    at = 0
    for addr, length in plan.readable:
        if at < len(plan.stream) and in_ram(addr, 1):
            part = plan.stream[at : at + min(length, 0x10000)]
            part = part[: max(0, min(len(part), _room(addr)))]
            memory.write(addr, part)
        at += length
    buffers = [(a, n, 0) for a, n in plan.readable] + [(a, n, VIRTQ_DESC_F_WRITE)
                                                        for a, n in plan.writable]
    if not buffers:
        buffers = [(DATA, 0, 0)]
    descriptors = [[a, n, f | VIRTQ_DESC_F_NEXT, i + 1] for i, (a, n, f) in enumerate(buffers)]
    descriptors[-1][2] &= ~VIRTQ_DESC_F_NEXT
    for which, field, value in plan.mutations:
        d = descriptors[which % len(descriptors)]
        if field == "flags":
            d[2] = value & 7
        elif field == "next":
            d[3] = value % (len(descriptors) + 2) if value & 1 else value & 0xFFFF
        elif field == "len":
            d[1] = value & 0xFFFFFFFF
        else:
            d[0] = value
    if plan.indirect:
        for i, (a, n, f, nxt) in enumerate(descriptors):
            queue.write_descriptor(INDIRECT + 16 * i, a, n, f, nxt)
        length = plan.table_len if plan.table_len is not None else 16 * len(descriptors)
        top = [(INDIRECT, length & 0xFFFFFFFF, VIRTQ_DESC_F_INDIRECT, 0)]
        if plan.prefix:
            top.insert(0, (DATA, 16, VIRTQ_DESC_F_NEXT, plan.slots[1 % len(plan.slots)]))
        entries = top
    else:
        entries = [(a, n, f, plan.slots[nxt] if nxt < len(descriptors) and nxt < len(plan.slots)
                    else nxt) for a, n, f, nxt in descriptors]
    for i, (a, n, f, nxt) in enumerate(entries[: len(plan.slots)]):
        queue.write_descriptor(queue.desc_gpa(plan.slots[i]), a, n, f, nxt & 0xFFFF)
    return plan.slots[0]


def _room(addr: int) -> int:
    """Bytes of RAM from ``addr`` to the end of its region."""
    return next(hi - addr for lo, hi in RAM if lo <= addr < hi)


def watched(memory: GuestMemory) -> list[bytes]:
    return [memory.read(base, length) for base, length in WATCHED]


def expected_ram(before: list[bytes], outcome: Outcome) -> list[bytearray]:
    out = [bytearray(b) for b in before]
    for addr, data in outcome.ram:
        for (base, length), window in zip(WATCHED, out):
            lo, hi = max(addr, base), min(addr + len(data), base + length)
            if lo < hi:
                window[lo - base : hi - base] = data[lo - addr : hi - addr]
    return out


def mask_used_ring(windows: list[bytearray] | list[bytes], queue: VirtqDriver,
                   after: list[bytes]) -> list[bytes]:
    """The windows with the used ring's bytes taken from ``after`` (the device writes
    there as the queue's rules allow)."""
    first = bytearray(windows[0])
    lo = queue.used_addr - WATCHED[0][0]
    hi = lo + 6 + 8 * queue.size
    first[lo:hi] = after[0][lo:hi]
    return [bytes(first), *map(bytes, windows[1:])]


_OPTIONS = st.builds(Options, readonly=st.booleans(), nocache=st.booleans(),
                     indirect=st.booleans(), size=st.sampled_from([1, 2, 4, 16, 256]))


@_FUZZ
@given(options=_OPTIONS, data=st.data())
def test_hostile_chains_get_the_model_outcome(options: Options, data: st.DataObject) -> None:
    plans = data.draw(st.lists(chain_plans(options.size, options.indirect), min_size=1,
                                max_size=4))
    memory = guest_memory()
    with no_failures_logged(), disk(options) as (d, path):
        image = bytearray(path.read_bytes())
        memory.write(RINGS, bytes(DATA - RINGS))
        for base, length in WATCHED[1:] + ((DATA, DATA_END - DATA),):
            # A fresh pattern, so that any stray write shows.
            memory.write(base, bytes((base + i) * 7 & 0xFF for i in range(length)))
        d.start()
        for plan in plans:
            memory.write(INDIRECT, bytes(0x800))
            head = place(memory, d.queue, plan)
            chain = walk(memory, d.queue.desc_addr, options.size, head, options.indirect)
            outcome = (serve(memory, chain, image, readonly=options.readonly,
                             can_punch=CAN_PUNCH) if chain is not None else None)
            d.queue.publish(head)
            before = watched(memory)
            d.kick()
            used = d.used()
            after = watched(memory)
            assert d.device.in_flight == 0
            event("the queue refuses the chain" if outcome is None else
                  f"type {struct.unpack_from('<I', plan.stream)[0]} status {outcome.status}")
            if outcome is None:
                assert used == [] and d.needs_reset()
                assert mask_used_ring(before, d.queue, after) == after
                d.start()
                continue
            assert not d.needs_reset()
            assert used == [(head, outcome.written)]
            assert mask_used_ring(expected_ram(before, outcome), d.queue, after) == after
            for offset, data_bytes in outcome.image:
                image[offset : offset + len(data_bytes)] = data_bytes
        content = path.read_bytes()
    assert len(content) == IMAGE
    assert content == image


# ---- queue layouts ----

_RING_ADDR = st.one_of(st.integers(RINGS, RINGS + 0x3000), _ADDR,
                       st.sampled_from([LOWMEM_LIMIT - 16, HIGHMEM_BASE + 2 * MiB - 8]))


@_FUZZ
@given(size=st.one_of(st.sampled_from([1, 16, 256, 512, 3, 0]), st.integers(0, 0xFFFF)),
       desc=_RING_ADDR, avail=_RING_ADDR, used=_RING_ADDR, indirect=st.booleans())
def test_hostile_queue_layouts(size: int, desc: int, avail: int, used: int,
                               indirect: bool) -> None:
    """The queue runs when its layout is valid (a power of two up to 256, else the
    size stays 256; aligned rings inside RAM), else the device needs a reset; either
    way a request posted on it raises nothing and the image keeps its size."""
    options = Options(readonly=False, nocache=False, indirect=indirect, size=16)
    memory = guest_memory()
    with no_failures_logged(), disk(options) as (d, path):
        driver = d.driver
        assert driver.negotiate(F_VERSION_1) & FEATURES_OK
        memory.write(RINGS, bytes(DATA - RINGS))
        queue = VirtqDriver(memory, 16, base=RINGS)
        queue.desc_addr, queue.avail_addr, queue.used_addr = desc, avail, used
        queue.size = size
        driver.setup_queue(0, queue)
        effective = size if 0 < size <= 256 and not size & (size - 1) else 256
        valid = (not desc % 16 and not avail % 2 and not used % 4
                 and in_ram(desc, 16 * effective) and in_ram(avail, 6 + 2 * effective)
                 and in_ram(used, 6 + 8 * effective))
        assert (d.device.queues[0] is not None) == valid
        assert d.needs_reset() == (not valid)
        # The rings may overlap: what the device then finds there is the guest's problem.
        driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        memory.write(DATA, struct.pack("<IIQ", blk.T_IN, 0, 0))
        if valid and desc + 16 <= DATA and in_ram(avail + 4, 2):
            queue.size = effective
            queue.write_descriptor(desc, DATA, 16, VIRTQ_DESC_F_NEXT, 1 % effective)
            queue.publish(0)
        d.kick()
        assert d.device.in_flight == 0
        assert path.stat().st_size == IMAGE
