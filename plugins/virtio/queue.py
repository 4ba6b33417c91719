# SPDX-License-Identifier: BSD-2-Clause
"""The split virtqueue (virtio 1.x §2.7), device side.

The transport keeps a :class:`QueueState` per queue: what the driver programmed (size,
ring addresses, enable) and the device's two free-running ring positions; it is what a
snapshot saves. Once the driver enables the queue, a :class:`SplitQueue` works on it in
guest RAM: :meth:`~SplitQueue.pop` takes the next available descriptor chain as
zero-copy views of its buffers, :meth:`~SplitQueue.push` hands it back through the used
ring, and notifications are suppressed both ways as the driver and device ask.

The guest is untrusted. A ring that breaks one of these rules raises
:class:`~hvf.errors.VirtqueueError` naming the problem (the transport then sets
DEVICE_NEEDS_RESET), and no ring content makes the walk touch memory outside guest RAM
or follow more than queue-size descriptors:

* a head or next index at or beyond the queue size (or the indirect table's length);
* a chain of more than queue-size descriptors, those in an indirect table included
  (which catches loops), or more than its indirect table holds;
* an indirect descriptor without VIRTIO_F_INDIRECT_DESC, inside an indirect table,
  with NEXT set, or whose table length is not a non-zero multiple of 16;
* a device-readable descriptor after a device-writable one;
* a buffer or indirect table not wholly inside one RAM region (zero-length buffers
  are accepted, at an address in RAM);
* a chain of more than :data:`MAX_CHAIN_BYTES`, the spec's 2^32 bytes;
* an available index more than queue-size entries ahead of the device's.

Ordering (x86-TSO, see :mod:`hvf.dma`): :meth:`~SplitQueue.pop` reads the available
index afresh, then the ring entry, then the descriptors; :meth:`~SplitQueue.push`
writes the used element, then the used index; a fence separates each store of ours
from a load of the driver's that it must precede. Ring fields are read in host byte
order, which on x86 is virtio's little-endian.

A back-end's loop, woken by the driver's notification::

    while True:
        queue.disable_notifications()
        while (chain := queue.pop()) is not None:
            queue.push(chain, serve(chain))
        if queue.needs_interrupt():
            interrupt()
        if not queue.enable_notifications():
            break  # sleep until the next notification
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import attrs

from hvf.dma import GuestDma, memory_fence
from hvf.errors import GuestMemoryError, VirtqueueError
from hvf.snapshot_api import field_int

MAX_QUEUE_SIZE = 32768
#: The most bytes a chain may describe, readable and writable together (§2.7.5).
MAX_CHAIN_BYTES = 1 << 32

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
DESC_SIZE = 16

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U32_MAX = 0xFFFF_FFFF


def desc_table_bytes(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_bytes(size: int) -> int:
    """flags, idx, ring[size], used_event: u16 each."""
    return 6 + 2 * size


def used_ring_bytes(size: int) -> int:
    """flags, idx (u16), ring[size] of (id, len) (u32), avail_event (u16)."""
    return 6 + 8 * size


def need_event(event: int, new: int, old: int) -> bool:
    """Whether moving an index from ``old`` to ``new`` passes ``event`` (16-bit
    free-running indices; the spec's vring_need_event)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


_FIELDS = ("size", "ready", "desc_addr", "avail_addr", "used_addr", "next_avail", "next_used")


@attrs.define
class QueueState:
    """One queue as the transport holds it: ``size`` (a power of two up to 32768; the
    transport ignores other values the driver writes), ``ready`` (queue_enable), the
    guest-physical addresses of the descriptor table, available ring and used ring
    (queue_desc, queue_driver, queue_device), and the device's free-running 16-bit
    positions in the available and used rings."""

    size: int
    ready: bool = False
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    next_avail: int = 0
    next_used: int = 0

    def to_fields(self) -> dict[str, int | bool]:
        """The state as plain snapshot fields (see :meth:`from_fields`)."""
        return attrs.asdict(self)

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> QueueState:
        """Rebuild a state from :meth:`to_fields` output, raising ``ValueError`` naming
        the field for an unknown, missing or mistyped field, an out-of-range value, or
        a combination no queue reaches (a ready queue's layout is checked as
        :meth:`layout_problem` does)."""
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown virtqueue state field {unknown[0]!r}")
        if "ready" not in fields:
            raise ValueError("saved field 'ready' is missing")
        ready = fields["ready"]
        if type(ready) is not bool:
            raise ValueError("saved field 'ready' is not a bool")
        state = cls(
            size=field_int(fields, "size", 16),
            ready=ready,
            desc_addr=field_int(fields, "desc_addr", 64),
            avail_addr=field_int(fields, "avail_addr", 64),
            used_addr=field_int(fields, "used_addr", 64),
            next_avail=field_int(fields, "next_avail", 16),
            next_used=field_int(fields, "next_used", 16),
        )
        problem = state.layout_problem() if ready else state._positions_problem()
        if problem:
            raise ValueError(f"saved virtqueue state: {problem}")
        return state

    def layout_problem(self) -> str | None:
        """Why a queue cannot run on this state, or None: a size that is not a power of
        two up to 32768, more chains taken than the queue holds, or a ring address
        not aligned as the spec requires (descriptors 16, available 2, used 4)."""
        problem = self._positions_problem()
        if problem:
            return problem
        for name, alignment in (("desc_addr", DESC_ALIGN), ("avail_addr", AVAIL_ALIGN),
                                ("used_addr", USED_ALIGN)):
            address = getattr(self, name)
            if address % alignment:
                return f"field {name!r} ({address:#x}) is not {alignment}-byte aligned"
        return None

    def _positions_problem(self) -> str | None:
        size = self.size
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            return f"field 'size' ({size}) is not a power of two up to {MAX_QUEUE_SIZE}"
        if (self.next_avail - self.next_used) & 0xFFFF > size:
            return (f"fields 'next_avail' ({self.next_avail}) and 'next_used' "
                    f"({self.next_used}) have more chains in flight than the queue holds")
        return None


@attrs.define
class Chain:
    """A descriptor chain taken from the available ring: its head index and its guest
    buffers as views of guest RAM (no copy), the device-readable ones (which the
    device must not write) and the device-writable ones, each with their total
    length. The views stay valid while the VM runs; the chain ends with its push."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    readable_length: int
    writable_length: int


class SplitQueue:
    """The device side of one enabled split virtqueue in guest RAM (through ``dma``).

    ``event_idx`` and ``indirect`` say whether VIRTIO_F_EVENT_IDX and
    VIRTIO_F_INDIRECT_DESC were negotiated; ``name`` begins every error message
    (a device and queue number, say). The ring positions live in ``state``, which
    the queue updates in place. Construction raises VirtqueueError when the state's
    layout is invalid or a ring is not inside guest RAM, and leaves notifications
    enabled (writing that to the ring, which a restored snapshot may hold stale).

    One thread at a time may use a queue; the driver runs concurrently.
    """

    __slots__ = ("_avail", "_avail_event_index", "_desc", "_dma", "_event_idx", "_indirect",
                 "_mask", "_notify", "_signalled_used", "_size", "_state", "_used16",
                 "_used32", "_used_event_index", "name")

    def __init__(self, dma: GuestDma, state: QueueState, *, event_idx: bool,
                 indirect: bool, name: str = "virtqueue") -> None:
        self.name = name
        problem = state.layout_problem()
        if problem:
            raise VirtqueueError(f"{name}: {problem}")
        self._dma = dma
        size = state.size
        self._desc = self._ring_view("descriptor table", state.desc_addr, desc_table_bytes(size))
        self._avail = self._ring_view("available ring", state.avail_addr,
                                      avail_ring_bytes(size)).cast("H")
        used = self._ring_view("used ring", state.used_addr, used_ring_bytes(size))
        self._used16 = used.cast("H")
        self._used32 = used[4 : 4 + 8 * size].cast("I")
        self._used_event_index = 2 + size  # in the available ring, as u16s
        self._avail_event_index = 2 + 4 * size  # in the used ring, as u16s
        self._size = size
        self._mask = size - 1
        self._state = state
        self._event_idx = event_idx
        self._indirect = indirect
        self._signalled_used = state.next_used
        self._notify = True
        self.enable_notifications()

    @property
    def state(self) -> QueueState:
        """The live state record (the ring positions move as chains are taken)."""
        return self._state

    @property
    def size(self) -> int:
        return self._size

    @property
    def event_idx(self) -> bool:
        """Whether VIRTIO_F_EVENT_IDX was negotiated."""
        return self._event_idx

    def pop(self) -> Chain | None:
        """The next available chain, or None when the driver has made none available.

        With EVENT_IDX and notifications enabled, taking a chain also moves
        avail_event on, so a device that never disables notifications still hears of
        every new chain. A chain that breaks the rules raises VirtqueueError and is not
        taken."""
        state = self._state
        next_avail = state.next_avail
        avail = self._avail
        available = avail[1]
        if available == next_avail:
            if not (self._notify and self._event_idx):
                return None
            # avail_event was stored when the last chain was taken: the driver either
            # sees it and notifies, or has published an index we see now.
            memory_fence()
            available = avail[1]
            if available == next_avail:
                return None
        if (available - next_avail) & 0xFFFF > self._size:
            raise self._error(f"the available index {available} is more than the queue "
                              f"size past the device's position {next_avail}")
        chain = self._walk(avail[2 + (next_avail & self._mask)])
        next_avail = (next_avail + 1) & 0xFFFF
        state.next_avail = next_avail
        if self._notify and self._event_idx:
            self._used16[self._avail_event_index] = next_avail
        return chain

    def push(self, chain: Chain | int, written: int) -> None:
        """Hand a chain (or a head index) back with ``written`` bytes written to its
        device-writable buffers: the used element, then the new used index."""
        if isinstance(chain, Chain):
            head, capacity = chain.head, min(chain.writable_length, _U32_MAX)
        else:
            head, capacity = chain, _U32_MAX
        if not 0 <= head < self._size or not 0 <= written <= capacity:
            raise ValueError(f"{self.name}: cannot return head {head} with {written} bytes "
                             f"written")
        state = self._state
        used_idx = state.next_used
        slot = (used_idx & self._mask) << 1
        used32 = self._used32
        used32[slot] = head
        used32[slot + 1] = written
        used_idx = (used_idx + 1) & 0xFFFF
        state.next_used = used_idx
        self._used16[1] = used_idx

    def needs_interrupt(self) -> bool:
        """Whether the chains pushed since the last call need a used buffer
        notification: with EVENT_IDX, whether the used index passed the driver's
        used_event; otherwise, unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
        Call it after each batch of pushes (before 65536 of them)."""
        new = self._state.next_used
        old = self._signalled_used
        if new == old:
            return False
        self._signalled_used = new
        memory_fence()  # the used index we stored before the driver's field we read
        if self._event_idx:
            return need_event(self._avail[self._used_event_index], new, old)
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_avail_event(self) -> None:
        """With EVENT_IDX, ask for a notification when the driver makes the next chain
        available beyond those taken (avail_event = the device's position)."""
        self._used16[self._avail_event_index] = self._state.next_avail

    def disable_notifications(self) -> None:
        """Tell the driver it need not notify (a hint: it may still). With EVENT_IDX,
        avail_event is left where it is until :meth:`enable_notifications`."""
        self._notify = False
        if not self._event_idx:
            self._used16[0] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask the driver to notify when it makes chains available; return whether it
        made some available meanwhile (then pop them: no notification will come)."""
        self._notify = True
        if self._event_idx:
            self.set_avail_event()
        else:
            self._used16[0] = 0
        memory_fence()  # our request before the driver's index we read
        return self._avail[1] != self._state.next_avail

    def _walk(self, head: int) -> Chain:
        size = self._size
        if head >= size:
            raise self._error(f"head index {head} is not below the queue size {size}")
        view = self._dma.view
        unpack = _DESC.unpack_from
        table = self._desc
        table_size = table_left = budget = size
        in_table = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_length = writable_length = 0
        index = head
        while True:
            addr, length, flags, next_index = unpack(table, index << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                table = self._indirect_table(index, addr, length, flags, in_table)
                table_size = table_left = length >> 4
                in_table = True
                index = 0
                continue
            budget -= 1
            table_left -= 1
            if budget < 0:
                raise self._error(f"the chain from head {head} is longer than the queue "
                                  f"size {size}")
            if table_left < 0:
                raise self._error(f"the chain from head {head} is longer than its "
                                  f"indirect table of {table_size} descriptors")
            try:
                buffer = view(addr, length)
            except GuestMemoryError:
                raise self._error(f"{self._where(index, in_table, head)} buffer {addr:#x} "
                                  f"length {length:#x} is not inside guest RAM") from None
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(buffer)
                writable_length += length
            elif writable:
                raise self._error(f"{self._where(index, in_table, head)} is device-readable "
                                  f"after a device-writable one")
            else:
                readable.append(buffer)
                readable_length += length
            if readable_length + writable_length > MAX_CHAIN_BYTES:
                raise self._error(f"the chain from head {head} is longer than "
                                  f"{MAX_CHAIN_BYTES:#x} bytes")
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, readable_length, writable_length)
            if next_index >= table_size:
                raise self._error(f"{self._where(index, in_table, head)} links to "
                                  f"{next_index}, beyond the {table_size} descriptors")
            index = next_index

    def _indirect_table(self, index: int, addr: int, length: int, flags: int,
                        in_table: bool) -> memoryview:
        """The table that descriptor ``index`` (VIRTQ_DESC_F_INDIRECT) refers to."""
        where = f"descriptor {index}"
        if in_table:
            problem = "an indirect table holds an indirect descriptor"
        elif not self._indirect:
            problem = f"{where} is indirect, but VIRTIO_F_INDIRECT_DESC was not negotiated"
        elif flags & VIRTQ_DESC_F_NEXT:
            problem = f"{where} is indirect and has VIRTQ_DESC_F_NEXT set"
        elif not length or length % DESC_SIZE:
            problem = f"{where}'s indirect table length {length} is not a non-zero multiple of 16"
        else:
            try:
                return self._dma.view(addr, length)
            except GuestMemoryError:
                problem = (f"{where}'s indirect table {addr:#x} length {length:#x} is not "
                           f"inside guest RAM")
        raise self._error(problem)

    def _ring_view(self, what: str, addr: int, length: int) -> memoryview:
        try:  # a ring: a migration resends its pages (the used ring's writes are ours)
            return self._dma.ring(addr, length, (self.name, what))
        except GuestMemoryError:
            raise VirtqueueError(f"{self.name}: the {what} at {addr:#x} ({length} bytes) is "
                                 f"not inside guest RAM") from None

    @staticmethod
    def _where(index: int, in_table: bool, head: int) -> str:
        return (f"indirect descriptor {index} of the chain from head {head}" if in_table
                else f"descriptor {index}")

    def _error(self, problem: str) -> VirtqueueError:
        return VirtqueueError(f"{self.name}: {problem}")
