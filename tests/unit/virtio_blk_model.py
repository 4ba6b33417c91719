# SPDX-License-Identifier: BSD-2-Clause
"""The reference model and harness of tests/unit/test_virtio_blk_fuzz.py: what the
split queue must make of a descriptor chain (:func:`walk`, the rules
:mod:`hvf.plugins.virtio.queue` documents), what virtio-blk must answer to it
(:func:`serve`), and a virtio-blk function on a fake machine whose guest RAM has the
PCI hole (low RAM up to 3 GiB, 2 MiB from 4 GiB), driven by hand (:class:`Disk`)."""

from __future__ import annotations

import functools
import logging
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from fakes import FakeVm
from hvf.memory import HIGHMEM_BASE, LOWMEM_LIMIT, GuestMemory, MiB
from hvf.plugins.block._libc import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.virtio import blk
from hvf.plugins.virtio.queue import (
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from hvf.plugins.virtio.spec import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    FEATURES_OK,
)
from hvf.testing.virtio import STATUS, Driver, VirtqDriver

BDF = (0, 5, 0)
RAM_SIZE = LOWMEM_LIMIT + 2 * MiB
RAM = ((0, LOWMEM_LIMIT), (HIGHMEM_BASE, HIGHMEM_BASE + 2 * MiB))
RINGS = 0x10000  # descriptor table, available ring, used ring: 12 KiB at most
INDIRECT = 0x18000  # indirect tables, 2 KiB each
DATA, DATA_END = 0x100000, 0x140000
EDGE = 0x4000
#: Where the test looks for changes: everything a buffer in RAM may start in, and more.
WATCHED = ((RINGS, DATA_END - RINGS), (LOWMEM_LIMIT - EDGE, EDGE),
           (HIGHMEM_BASE, EDGE), (HIGHMEM_BASE + 2 * MiB - EDGE, EDGE))
IMAGE = 64 * 1024
CAPACITY = IMAGE // 512
SERIAL = b"FUZZ-DISK"
_DESC = struct.Struct("<QIHH")

def in_ram(addr: int, length: int) -> bool:
    return length >= 0 and any(lo <= addr and addr + length <= hi for lo, hi in RAM)


@attrs.define
class Walk:
    """The model's chain: device-readable and device-writable (addr, length) buffers."""

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]


def walk(memory: GuestMemory, desc_addr: int, size: int, head: int,
         indirect: bool) -> Walk | None:
    """The chain from ``head`` as the split queue must take it, or None where the
    queue must refuse it (and the device need a reset)."""
    if head >= size:
        return None
    table, table_size = desc_addr, size
    table_left = budget = size
    in_table = False
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    total = 0
    index = head
    while True:
        addr, length, flags, next_index = _DESC.unpack(memory.read(table + 16 * index, 16))
        if flags & VIRTQ_DESC_F_INDIRECT:
            if (in_table or not indirect or flags & VIRTQ_DESC_F_NEXT or not length
                    or length % 16 or not in_ram(addr, length)):
                return None
            table, table_size = addr, length // 16
            table_left, in_table, index = table_size, True, 0
            continue
        budget -= 1
        table_left -= 1
        if budget < 0 or table_left < 0 or not in_ram(addr, length):
            return None
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append((addr, length))
        elif writable:
            return None
        else:
            readable.append((addr, length))
        total += length
        if total > MAX_CHAIN_BYTES:
            return None
        if not flags & VIRTQ_DESC_F_NEXT:
            return Walk(head, readable, writable)
        if next_index >= table_size:
            return None
        index = next_index


def take(memory: GuestMemory, buffers: list[tuple[int, int]], count: int) -> bytes:
    """The first ``count`` bytes of ``buffers`` (``count`` small)."""
    out = bytearray()
    for addr, length in buffers:
        if len(out) >= count:
            break
        out += memory.read(addr, min(length, count - len(out)))
    return bytes(out)


def split(buffers: list[tuple[int, int]], count: int) -> tuple[list[tuple[int, int]],
                                                              list[tuple[int, int]]]:
    """``buffers`` cut after ``count`` bytes."""
    head: list[tuple[int, int]] = []
    for i, (addr, length) in enumerate(buffers):
        if count <= 0:
            return head, buffers[i:]
        if length > count:
            return [*head, (addr, count)], [(addr + count, length - count), *buffers[i + 1:]]
        head.append((addr, length))
        count -= length
    return head, []


@attrs.define
class Outcome:
    """What the device must do with a chain: the used length, the status (None: no
    status byte), bytes written to guest RAM (in order) and to the image."""

    written: int
    status: int | None
    ram: list[tuple[int, bytes]] = attrs.Factory(list)
    image: list[tuple[int, bytes]] = attrs.Factory(list)


def serve(memory: GuestMemory, chain: Walk, image: bytearray, *, readonly: bool,
          can_punch: bool) -> Outcome:
    """virtio-blk's answer to a chain the queue took (see plugins/virtio/blk.py)."""
    writable = [(a, n) for a, n in chain.writable if n]
    room = sum(n for _, n in writable)
    if not room:
        return Outcome(0, None)
    data_in, status_part = split(writable, room - 1)
    status_at = status_part[0][0]

    def done(status: int, written: int = 1, ram: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
             disk: list[tuple[int, bytes]] = ()) -> Outcome:  # type: ignore[assignment]
        if status != blk.S_OK:
            written, ram, disk = 1, [], []
        return Outcome(written, status, [*ram, (status_at, bytes([status]))], list(disk))

    length_out = sum(n for _, n in chain.readable)
    if length_out < 16:
        return done(blk.S_IOERR)
    kind, _reserved, sector = struct.unpack("<IIQ", take(memory, chain.readable, 16))
    _, data_out = split(chain.readable, 16)
    length_out -= 16
    length_in = room - 1
    if kind in (blk.T_IN, blk.T_OUT):
        length = length_in if kind == blk.T_IN else length_out
        if length % 512 or sector + length // 512 > CAPACITY:
            return done(blk.S_IOERR)
        offset = sector * 512
        if kind == blk.T_IN:
            data = bytes(image[offset : offset + length])
            ram, at = [], 0
            for addr, n in data_in:
                ram.append((addr, data[at : at + n]))
                at += n
            return done(blk.S_OK, length + 1, ram)
        if readonly:
            return done(blk.S_IOERR)
        return done(blk.S_OK, disk=[(offset, take(memory, data_out, length))])
    if kind == blk.T_FLUSH:
        return done(blk.S_OK)
    if kind == blk.T_GET_ID:
        ident = SERIAL.ljust(blk.ID_BYTES, b"\0")[:length_in]
        ram, at = [], 0
        for addr, n in data_in:
            if at < len(ident):
                ram.append((addr, ident[at : at + n]))
            at += n
        return done(blk.S_OK, len(ident) + 1, ram)
    if kind in (blk.T_DISCARD, blk.T_WRITE_ZEROES):
        if readonly:
            return done(blk.S_IOERR)
        if (not length_out or length_out % 16
                or length_out // 16 > blk.MAX_RANGE_SEGMENTS):
            return done(blk.S_IOERR)
        raw = take(memory, data_out, length_out)
        segments = [struct.unpack_from("<QII", raw, o) for o in range(0, len(raw), 16)]
        for start, count, flags in segments:
            if flags & ~blk.SEGMENT_UNMAP or (kind == blk.T_DISCARD and flags):
                return done(blk.S_UNSUPP)
            if count > blk.MAX_RANGE_SECTORS or start + count > CAPACITY:
                return done(blk.S_IOERR)
        if kind == blk.T_DISCARD and not can_punch and any(n for _, n, _ in segments):
            return done(blk.S_UNSUPP)
        return done(blk.S_OK, disk=[(s * 512, bytes(n * 512)) for s, n, _ in segments])
    return done(blk.S_UNSUPP)


# ---- the device, driven by hand ----


@attrs.define
class Options:
    readonly: bool
    nocache: bool
    indirect: bool
    size: int


class Disk:
    """virtio-blk on a fake machine whose RAM has the PCI hole; INTx (MSI-X off)."""

    def __init__(self, memory: GuestMemory, path: Path, options: Options) -> None:
        self.memory = memory
        self.options = options
        self.vm = FakeVm(memory=memory)
        bus = PciBus()
        self.vm.attach(bus)
        config = {"path": str(path), "ser": SERIAL.decode(), "nocache": str(options.nocache).lower(),
                  "ro": str(options.readonly).lower()}
        self.device = blk.create(vm=self.vm, slot=BDF, config=config)
        bus.add(BDF, self.device)
        bus.assign_resources(enable_decoding=True)
        self.driver = Driver(self.vm, BDF)
        self.start()

    def start(self) -> None:
        """Reset, negotiate, set queue 0 up at RINGS, DRIVER_OK."""
        features = F_VERSION_1 | (F_RING_INDIRECT_DESC if self.options.indirect else 0)
        assert self.driver.negotiate(features) & FEATURES_OK
        self.queue = VirtqDriver(self.memory, self.options.size, base=RINGS)
        self.driver.setup_queue(0, self.queue)
        self.driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        assert self.device.queues[0] is not None

    def kick(self) -> None:
        self.driver.kick(0)
        self.device._doorbell(0)
        assert self.device.drain(10)

    def used(self) -> list[tuple[int, int]]:
        """Used elements since the last call."""
        q = self.queue
        found = []
        used_idx = int.from_bytes(self.memory.read(q.used_addr + 2, 2), "little")
        while q.used_seen != used_idx:
            slot = q.used_addr + 4 + 8 * (q.used_seen % q.size)
            found.append(struct.unpack("<II", self.memory.read(slot, 8)))
            q.used_seen = (q.used_seen + 1) & 0xFFFF
        return found

    def needs_reset(self) -> bool:
        return bool(self.device.state.status & DEVICE_NEEDS_RESET)


@contextmanager
def disk(options: Options) -> Iterator[tuple[Disk, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.img"
        path.write_bytes(bytes((i * 13 + 7) & 0xFF for i in range(IMAGE)))
        d = Disk(guest_memory(), path, options)
        try:
            yield d, path
        finally:
            d.device.close()


@functools.cache
def guest_memory() -> GuestMemory:
    """One guest RAM for every test (sparse: only what the tests touch is allocated)."""
    return GuestMemory(RAM_SIZE)


def _can_punch() -> bool:
    """Whether the temporary folder's file system punches holes (discards work)."""
    with tempfile.TemporaryFile() as f:
        f.write(bytes(8192))
        f.flush()
        try:
            fallocate(f.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        except OSError:
            return False
    return True


CAN_PUNCH = _can_punch()


class _Failures(logging.Handler):
    """Records what hvf logs at ERROR (a request or completion that raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@contextmanager
def no_failures_logged() -> Iterator[None]:
    handler = _Failures()
    logger = logging.getLogger("hvf")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, handler.records
