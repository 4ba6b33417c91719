# SPDX-License-Identifier: BSD-2-Clause
"""virtio-net's batch data path in C (:mod:`hvf.plugins.net._netpath`), for back ends
whose descriptor moves one whole frame per ``writev``/``readv`` (a tap:
:attr:`~hvf.plugins.net.backend.NetBackend.frame_fd`).

:meth:`NetPath.transmit` sends every available transmit chain and
:meth:`NetPath.receive` fills posted receive chains with frames, both in one C call
(the GIL released). Each stops where the next chain or frame needs what only the
Python path (:mod:`.tx`, :mod:`.rx`) does: a chain breaking the ring's rules (Python
raises the error that sets DEVICE_NEEDS_RESET), a transmitted frame to drop or an ARP
frame to learn from, a receive ring holding less than the largest frame, an error
from the back end. The ring positions live in the queue's state as before, so the
two paths take turns on a queue. Received bytes are marked written for a migration.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

from hvf.plugins.net._netpath import ffi, lib
from hvf.plugins.net.spec import F_GUEST_CSUM
from hvf.plugins.virtio.cring import RingRecords
from hvf.plugins.virtio.spec import F_RING_INDIRECT_DESC

if TYPE_CHECKING:
    from hvf.memory import GuestMemory
    from hvf.plugins.net.device import VirtioNet
    from hvf.plugins.net.state import RxFilter
    from hvf.plugins.virtio.queue import SplitQueue

#: What a call reports: the ring (tx) or the back end (rx) has no more; it did as
#: many frames as asked; the next chain or frame is the Python path's; the back end
#: cannot take a frame now (tx).
EMPTY = lib.HVF_NET_EMPTY
LIMIT = lib.HVF_NET_LIMIT
SLOW = lib.HVF_NET_SLOW
BLOCKED = lib.HVF_NET_BLOCKED


class NetPath:
    """The C data path over one guest's RAM, for the queues of one device."""

    def __init__(self, memory: GuestMemory) -> None:
        self._records = RingRecords(ffi, memory)
        self._tx = ffi.new("struct hvf_net_tx_args *")
        self._rx = ffi.new("struct hvf_net_rx_args *")
        #: The receive filter and address last given to C, as copies.
        self._filter: tuple[Any, ...] | None = None

    def transmit(self, index: int, queue: SplitQueue, negotiated: int, fd: int,
                 mtu_frame: int, limit: int) -> tuple[int, int, int]:
        """Send up to ``limit`` frames from ``queue``: (status, frames, bytes)."""
        ring = self._records.ring(index, queue, bool(negotiated & F_RING_INDIRECT_DESC))
        args = self._tx
        args.negotiated = negotiated
        args.mtu_frame = mtu_frame
        state = queue.state
        ring.next_avail, ring.next_used = state.next_avail, state.next_used
        status = lib.hvf_net_tx(self._records.ram, ring, fd, args, limit)
        state.next_avail, state.next_used = ring.next_avail, ring.next_used
        return status, args.frames, args.bytes

    def receive(self, index: int, queue: SplitQueue, fd: int, limit: int,
                device: VirtioNet) -> tuple[int, Any]:
        """Take up to ``limit`` frames from ``fd`` into ``queue``'s chains for ``device``:
        the status and the counts (``frames``, ``bytes``, ``oversize``, ``filtered``)."""
        args = self._rx
        records = self._records
        ring = records.known_ring(index, queue)
        if ring is None:  # a new queue: the driver's features are settled for its life
            negotiated = device.negotiated
            ring = records.ring(index, queue, bool(negotiated & F_RING_INDIRECT_DESC))
            args.merge = device.merge
            args.guest_csum = bool(negotiated & F_GUEST_CSUM)
            args.limit = device.rx_limit
            args.is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        net = device.net
        self._set_filter(args, net.mac, net.rx_filter)
        records.sync_written()
        state = queue.state
        ring.next_avail, ring.next_used = state.next_avail, state.next_used
        status = lib.hvf_net_rx(records.ram, ring, fd, args, limit)
        state.next_avail, state.next_used = ring.next_avail, ring.next_used
        return status, args

    def _set_filter(self, args: Any, mac: bytes, f: RxFilter) -> None:
        last = self._filter
        if (last is not None and last[0] == mac and last[1] == f.promisc
                and last[2] == f.allmulti and last[3] == f.unicast_overflow
                and last[4] == f.multicast_overflow and last[5] == f.unicast
                and last[6] == f.multicast):
            return
        self._filter = (mac, f.promisc, f.allmulti, f.unicast_overflow,
                        f.multicast_overflow, list(f.unicast), list(f.multicast))
        args.mac = list(mac)
        args.promisc, args.allmulti = f.promisc, f.allmulti
        args.unicast_overflow, args.multicast_overflow = f.unicast_overflow, f.multicast_overflow
        args.nunicast, args.nmulticast = len(f.unicast), len(f.multicast)
        for i, address in enumerate(f.unicast):
            args.unicast[i] = list(address)
        for i, address in enumerate(f.multicast):
            args.multicast[i] = list(address)

