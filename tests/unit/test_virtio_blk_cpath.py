# SPDX-License-Identifier: BSD-2-Clause
"""virtio-blk's C path (hvf.plugins.virtio.blkpath) on a fake machine with a real image:
the data, the used ring it shares with the Python path, MSI-X and EVENT_IDX
interrupts from its threads, and the pages a migration must resend."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fakes import FakeVm, cfg_write, mmio_write
from hvf.plugins.pci.bus import PciBus
from hvf.plugins.virtio import blk
from hvf.plugins.virtio.common import TransportState
from hvf.plugins.virtio.pci import ISR_QUEUE
from hvf.plugins.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hvf.plugins.virtio.spec import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    F_RING_EVENT_IDX,
    F_VERSION_1,
    FEATURES_OK,
    NO_VECTOR,
)
from hvf.testing.virtio import Q_MSIX, Q_SELECT, STATUS, Driver, VirtqDriver

BDF = (0, 5, 0)
SECTORS = 128
VECTOR = 1


class Disk:
    """virtio-blk with MSI-X vector 1 on queue 0 (EVENT_IDX if asked)."""

    def __init__(self, path: Path, *, event_idx: bool = False, nocache: bool = False,
                 msix: bool = True) -> None:
        self.vm = FakeVm()
        bus = PciBus()
        self.vm.attach(bus)
        self.device = blk.create(vm=self.vm, slot=BDF, config={
            "path": str(path), "nocache": "true" if nocache else "false"})
        bus.add(BDF, self.device)
        bus.assign_resources(enable_decoding=True)
        self.driver = Driver(self.vm, BDF)
        features = F_VERSION_1 | (F_RING_EVENT_IDX if event_idx else 0)
        assert self.driver.negotiate(features) & FEATURES_OK
        self.queue = VirtqDriver(self.vm.memory, 64, event_idx=event_idx)
        self.driver.setup_queue(0, self.queue, vector=VECTOR if msix else NO_VECTOR)
        if msix:
            self._enable_msix()
        self.driver.write(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    def _enable_msix(self) -> None:
        table = self.device.bar.address + 0x4000
        mmio_write(self.vm, table + 16 * VECTOR, 4, 0xFEE0_0000)
        mmio_write(self.vm, table + 16 * VECTOR + 8, 4, 0x45)
        mmio_write(self.vm, table + 16 * VECTOR + 12, 4, 0)  # unmasked
        cfg_write(self.vm, BDF, self.driver.msix_cap + 2, 2, 0x8000)  # MSI-X enable

    def run(self) -> list[tuple[int, int, bytes | None]]:
        """Kick, let the I/O thread take the chains, wait for them: the used elements."""
        self.driver.kick(0)
        self.device._doorbell(0)
        assert self.device.drain(10)
        return [(u.head, u.length, u.data) for u in self.queue.used()]

    def interrupts(self) -> int:
        """Triggers of the queue's vector since the last call (the irqfd's count)."""
        try:
            return os.eventfd_read(self.device.msix.vectors[VECTOR].fd)
        except BlockingIOError:
            return 0


def header(kind: int, sector: int) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(length))


@contextmanager
def disk(where: Path | None = None, **options: bool) -> Iterator[tuple[Disk, Path]]:
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        path = Path(tmp) / "disk.img"
        path.write_bytes(bytes(SECTORS * 512))
        d = Disk(path, **options)
        try:
            yield d, path
        finally:
            d.device.close()


def test_reads_and_writes_go_through_c_and_signal_the_vector() -> None:
    with disk() as (d, path):
        assert d.device.path is not None
        heads = {}
        for i in range(8):  # each write in two buffers, the second 1.5 sectors
            data = pattern(i, 1024)
            head = d.queue.add([header(blk.T_OUT, 8 * i), data[:256], data[256:]], [1])
            heads[head] = data
        used = d.run()
        assert sorted((h, n) for h, n, _ in used) == sorted((h, 1) for h in heads)
        assert all(status == bytes([blk.S_OK]) for _, _, status in used)
        image = path.read_bytes()
        for i, data in enumerate(heads.values()):
            assert image[8 * i * 512 : 8 * i * 512 + 1024] == data
        assert d.interrupts() >= 1
        reads = {d.queue.add([header(blk.T_IN, 8 * i)], [512, 512, 1]): i for i in range(8)}
        used = d.run()
        for head, length, data in used:
            assert length == 1025
            assert data == pattern(reads[head], 1024) + bytes([blk.S_OK])
        stats = d.device.stats()
        assert stats["block_writes"] == 8 and stats["block_reads"] == 8
        assert d.device.backend.stats()["reads"] == 0  # none took the Python path
        assert stats["c_path_interrupts"] >= 2 and d.interrupts() >= 1


def test_direct_io_takes_the_c_path_when_aligned_and_python_when_not(direct_dir: Path) -> None:
    """With nocache, page-aligned buffers go through C (the status byte alone in its
    descriptor); a buffer at an odd address takes the Python path's bounce buffer."""
    with disk(direct_dir, nocache=True) as (d, path):
        q = d.queue
        assert q.slot_size % 4096 == 0 and q.slot_base % 4096 == 0
        data = pattern(3, 4096)
        head = q.add([header(blk.T_OUT, 16), data], [1])
        assert d.run() == [(head, 1, bytes([blk.S_OK]))]
        head = q.add([header(blk.T_IN, 16)], [4096, 1])
        assert d.run() == [(head, 4097, data + bytes([blk.S_OK]))]
        assert d.device.backend.stats()["reads"] == 0
        assert d.device.backend.stats()["writes"] == 0
        odd = q.slot_base + 3 * q.slot_size + 1  # a slot the queue's chains do not use
        d.vm.memory.write(odd, pattern(4, 512))
        first = q._free_descriptors[-1]
        status = q.slot_base + 64
        head = q.add_raw([(q.slot_base, 16, VIRTQ_DESC_F_NEXT, (first + 1) % q.size),
                          (odd, 512, VIRTQ_DESC_F_NEXT, (first + 2) % q.size),
                          (status, 1, VIRTQ_DESC_F_WRITE, 0)], header(blk.T_OUT, 40))
        d.driver.kick(0)
        d.device._doorbell(0)
        assert d.device.drain(10) and q.used_elements() == [(head, 1, None)]
        assert d.vm.memory.read(status, 1) == bytes([blk.S_OK])
        assert d.device.backend.stats()["writes"] == 1
        assert path.read_bytes()[40 * 512 : 41 * 512] == pattern(4, 512)


def test_completions_of_one_batch_share_interrupts() -> None:
    """Sixteen reads in flight come back with fewer interrupts than chains, the last
    always signalled."""
    with disk() as (d, _):
        for i in range(16):
            d.queue.add([header(blk.T_IN, 8 * i)], [4096, 1])
        assert len(d.run()) == 16
        assert 1 <= d.interrupts() < 16


def test_the_last_completion_of_a_batch_signals() -> None:
    """EVENT_IDX asking for the 16th chain only: its completion must interrupt."""
    with disk(event_idx=True) as (d, _):
        d.queue.set_used_event(15)
        for i in range(16):
            d.queue.add([header(blk.T_IN, 8 * i)], [4096, 1])
        assert len(d.run()) == 16 and d.interrupts() == 1


def test_a_device_that_needs_a_reset_saves_the_used_position_c_reached() -> None:
    """A hundred reads through C on a 64-entry queue, then a chain outside RAM: the
    saved transport state has both ring positions at 100, and loads again."""
    with disk() as (d, _):
        for _ in range(5):
            for i in range(20):  # three descriptors each
                d.queue.add([header(blk.T_IN, i)], [512, 1])
            assert len(d.run()) == 20
        q = d.queue
        q.add_raw([(d.vm.memory.size + 0x1000, 16, 0, 0)])
        d.driver.kick(0)
        d.device._doorbell(0)
        assert d.device.state.status & 0x40  # DEVICE_NEEDS_RESET
        saved = d.device.save_state()
        state = d.device.state.queues[0]
        assert (state.next_avail, state.next_used) == (100, 100)
        TransportState.from_fields(saved["transport"], 1, d.device.queue_max_sizes)


def test_with_intx_a_save_holds_the_interrupt_c_raised() -> None:
    """Without MSI-X the C path's completions reach the ISR through the I/O thread;
    a save taken before that thread ran still records the queue interrupt."""
    with disk(msix=False) as (d, _):
        d.queue.add([header(blk.T_IN, 0)], [512, 1])
        assert len(d.run()) == 1
        assert not d.device.state.isr  # the fake I/O thread has not run
        d.device.save_state()
        assert d.device.state.isr & ISR_QUEUE and d.device.intx_level


def test_python_requests_among_c_requests_share_one_used_ring() -> None:
    """A write, a flush, a read, GET_ID, an unknown type, a read past the end and a
    read into a buffer that is not whole sectors, in one notification: each comes back
    once with its status, and the queue's saved position counts them all."""
    with disk() as (d, path):
        q = d.queue
        write = q.add([header(blk.T_OUT, 3), pattern(9, 512)], [1])
        flush = q.add([header(blk.T_FLUSH, 0)], [1])
        read = q.add([header(blk.T_IN, 3)], [512, 1])
        get_id = q.add([header(blk.T_GET_ID, 0)], [20, 1])
        unknown = q.add([header(99, 0)], [1])
        past_end = q.add([header(blk.T_IN, SECTORS)], [512, 1])
        ragged = q.add([header(blk.T_IN, 0)], [100, 1])
        heads = (write, flush, read, get_id, unknown, past_end, ragged)
        status_at = {h: q._posted[h].writable[-1] for h in heads}
        used = {h: n for h, n, _ in d.run()}

        def status(head: int) -> int:
            gpa, length = status_at[head]
            return d.vm.memory.read(gpa + length - 1, 1)[0]

        assert {h: (used[h], status(h)) for h in heads} == {
            write: (1, blk.S_OK), flush: (1, blk.S_OK), read: (513, blk.S_OK),
            get_id: (21, blk.S_OK), unknown: (1, blk.S_UNSUPP), past_end: (1, blk.S_IOERR),
            ragged: (1, blk.S_IOERR)}
        assert len(used) == 7 and path.read_bytes()[3 * 512 : 4 * 512] == pattern(9, 512)
        d.device.save_state()
        assert d.device.queues[0].state.next_used == 7
        assert d.device.queues[0].state.next_avail == 7


def test_event_idx_suppresses_the_c_paths_interrupts() -> None:
    with disk(event_idx=True) as (d, _):
        q = d.queue
        q.set_used_event(100)
        for i in range(3):
            q.add([header(blk.T_IN, i)], [512, 1])
        assert len(d.run()) == 3 and d.interrupts() == 0
        q.set_used_event(3)  # the driver wants to hear when the 4th comes back
        q.add([header(blk.T_IN, 0)], [512, 1])
        assert len(d.run()) == 1 and d.interrupts() == 1


def test_a_read_marks_the_pages_it_wrote_for_a_migration() -> None:
    with disk() as (d, _):
        memory = d.vm.memory
        head = d.queue.add([header(blk.T_IN, 0)], [4096, 1])
        (data, _), (status, _) = d.queue._posted[head].writable
        memory.written = bytearray(memory.size >> 12)  # marks from here on
        d.run()
        pages = {i for i, marked in enumerate(memory.written) if marked}
        assert {data >> 12, status >> 12} <= pages
        assert len(pages) <= 4  # those and the used ring's


def test_a_new_vector_takes_effect_for_chains_already_in_c() -> None:
    """The driver moves queue 0 to vector 0 after C took its chains: what C returns
    from then on signals vector 0, not the old one."""
    with disk() as (d, _):
        d.queue.add([header(blk.T_IN, 0)], [512, 1])
        assert len(d.run()) == 1 and d.interrupts() == 1
        d.driver.write(Q_SELECT, 2, 0)
        d.driver.write(Q_MSIX, 2, 0)
        assert d.device.path is not None
        d.device.path.push(0, d.device.queues[0], 0, 0)  # as a Python-path completion
        assert d.interrupts() == 0
        assert os.eventfd_read(d.device.msix.vectors[0].fd) == 1
