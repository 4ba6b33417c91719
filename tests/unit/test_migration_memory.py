# SPDX-License-Identifier: BSD-2-Clause
"""What migration needs of guest RAM: pages hvf itself writes are recorded while a
migration tracks them, rings are registered, and a handed-over memfd is adopted."""

from __future__ import annotations

import mmap
import os

from hypothesis import given
from hypothesis import strategies as st

from hvf.dma import GuestDma
from hvf.memory import HIGHMEM_BASE, LOWMEM_LIMIT, MiB, GuestMemory

PAGE = mmap.PAGESIZE


def written_pages(memory: GuestMemory) -> list[int]:
    assert memory.written is not None
    return [i for i, b in enumerate(memory.written) if b]


def test_nothing_is_recorded_unless_tracking() -> None:
    memory = GuestMemory(4 * MiB)
    try:
        memory.write(0x1000, b"x")
        GuestDma(memory).view(0x3000, 10)
        assert memory.written is None
    finally:
        memory.close()


def test_writes_slices_and_dma_views_are_recorded() -> None:
    memory = GuestMemory(4 * MiB)
    try:
        memory.written = bytearray(memory.size // PAGE)
        memory.write(0x1FFF, b"ab")  # straddles pages 1 and 2
        memory.slice(0x5000, 1)
        dma = GuestDma(memory)
        dma.view(0x8000, 0)  # an empty view writes nothing
        dma.view(0x9000, PAGE + 1)
        dma.write_u32(0xC000, 7)
        assert written_pages(memory) == [1, 2, 5, 9, 10, 12]
    finally:
        memory.close()


def test_high_memory_is_recorded_at_its_file_offset() -> None:
    memory = GuestMemory(LOWMEM_LIMIT + 2 * MiB)
    try:
        memory.written = bytearray(memory.size // PAGE)
        GuestDma(memory).view(HIGHMEM_BASE + PAGE, 1)
        assert written_pages(memory) == [LOWMEM_LIMIT // PAGE + 1]
    finally:
        memory.close()


@given(st.integers(0, 64 * PAGE), st.integers(0, 8 * PAGE))
def test_recorded_pages_cover_exactly_the_range(gpa: int, length: int) -> None:
    memory = GuestMemory(MiB)
    try:
        memory.written = bytearray(memory.size // PAGE)
        GuestDma(memory).view(gpa, length)
        expected = list(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else []
        assert written_pages(memory) == expected
    finally:
        memory.close()


def test_a_ring_is_registered_under_its_owner_and_replaced() -> None:
    memory = GuestMemory(LOWMEM_LIMIT + 2 * MiB)
    try:
        dma = GuestDma(memory)
        dma.ring(0x4000, 100, ("virtio", 0))
        dma.ring(HIGHMEM_BASE, 200, ("virtio", 1))
        assert memory.rings == {("virtio", 0): (0x4000, 100), ("virtio", 1): (LOWMEM_LIMIT, 200)}
        dma.ring(0x6000, 50, ("virtio", 0))
        assert memory.rings[("virtio", 0)] == (0x6000, 50)
    finally:
        memory.close()


def test_an_adopted_memfd_is_the_same_memory() -> None:
    """``--local``: the receiving process maps the sender's memfd shared."""
    sender = GuestMemory(2 * MiB, shared=True)
    receiver = None
    try:
        sender.write(0x1234, b"before")
        receiver = GuestMemory(2 * MiB, os.dup(sender.fd), shared=True, adopt=True)
        assert not receiver.private
        assert receiver.read(0x1234, 6) == b"before"
        receiver.write(0x2000, b"after")
        assert sender.read(0x2000, 5) == b"after"
    finally:
        sender.close()
        if receiver is not None:
            receiver.close()


def test_a_shared_copy_is_not_adopted() -> None:
    """Without ``adopt``, ``shared`` still loads a RAM file into a new memfd."""
    source = GuestMemory(2 * MiB, shared=True)
    copy = None
    try:
        source.write(0x3000, b"data")
        copy = GuestMemory(2 * MiB, os.dup(source.fd), shared=True)
        copy.write(0x3000, b"DATA")
        assert source.read(0x3000, 4) == b"data" and copy.read(0x3000, 4) == b"DATA"
    finally:
        source.close()
        if copy is not None:
            copy.close()
