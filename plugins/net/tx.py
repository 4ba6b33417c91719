# SPDX-License-Identifier: BSD-2-Clause
"""The transmit side of one virtio-net queue pair (I/O thread, device lock held).

Each chain is one frame behind its ``virtio_net_hdr``. The header is checked against
what the driver negotiated and rebuilt (unknown flag bits and ``num_buffers``
cleared) before the frame goes to the back end as views of guest RAM (one
``writev``, no copy); a back end without vnet headers gets the bare frame. A frame
the rules forbid (shorter than an Ethernet header, over the MTU without segmentation
offload, an offload or checksum the driver did not negotiate or that points outside
the frame) is dropped and counted, and the chain goes back as used all the same.

On a back end with a frame descriptor (a tap) batches go through the C data path
(:mod:`.fastpath`), which stops at any chain it leaves to this module's rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvf.plugins.net import fastpath
from hvf.plugins.net.frames import arp_sender, peek, skip
from hvf.plugins.net.spec import (
    ETH_HEADER,
    F_CSUM,
    F_HOST_TSO4,
    F_HOST_TSO6,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    HDR_F_NEEDS_CSUM,
    HEADER,
    HEADER_SIZE,
    MAX_GSO_FRAME,
)

if TYPE_CHECKING:
    from hvf.plugins.net.device import VirtioNet
    from hvf.plugins.virtio.queue import Chain, SplitQueue

#: Frames sent per call before the I/O thread serves others (the rest follow at once).
TX_BATCH = 256
#: Bytes of a frame looked at for the guest's ARP (Ethernet + ARP for IPv4).
ARP_HEAD = 42

_GSO_FEATURE = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6}


def header_problem(header: tuple[int, ...], frame_length: int, negotiated: int,
                   mtu_frame: int) -> str | None:
    """Why a transmitted frame of ``frame_length`` bytes (after the header) with this
    unpacked ``header`` must be dropped, or None."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = header
    if frame_length < ETH_HEADER:
        return f"a {frame_length}-byte frame is shorter than an Ethernet header"
    if flags & HDR_F_NEEDS_CSUM:
        if not negotiated & F_CSUM:
            return "NEEDS_CSUM without VIRTIO_NET_F_CSUM"
        if csum_start + csum_offset + 2 > frame_length:
            return (f"checksum at {csum_start}+{csum_offset} is past the "
                    f"{frame_length}-byte frame")
    if gso_type & GSO_ECN:
        return "GSO with ECN, which was not offered"
    if gso_type == GSO_NONE:
        if frame_length > mtu_frame:
            return (f"a {frame_length}-byte frame is over the MTU ({mtu_frame} bytes "
                    f"with its Ethernet header) without segmentation offload")
        return None
    feature = _GSO_FEATURE.get(gso_type)
    if feature is None or not negotiated & feature:
        return f"gso_type {gso_type} was not negotiated"
    if not flags & HDR_F_NEEDS_CSUM or not gso_size:
        return "a segmentation offload without NEEDS_CSUM or gso_size"
    if frame_length > MAX_GSO_FRAME or hdr_len > frame_length:
        return f"a {frame_length}-byte GSO frame (hdr_len {hdr_len}) is out of bounds"
    return None


class TxQueue:
    """Transmit queue ``2 * pair + 1`` and the back end's descriptor for that pair."""

    def __init__(self, device: VirtioNet, pair: int) -> None:
        self.device = device
        self.pair = pair
        self.index = 2 * pair + 1
        #: A chain the back end could not take yet (it waits to be writable).
        self.held: Chain | None = None

    def run(self) -> None:
        device = self.device
        queue = device.queues[self.index]
        if queue is None or self.held is not None:
            return
        path = device.path
        while True:
            queue.disable_notifications()
            sent = 0
            while sent < TX_BATCH:
                if path is not None:
                    status, frames = self._send_batch(path, queue, TX_BATCH - sent)
                    sent += frames
                    if status == fastpath.EMPTY:
                        break
                    if status == fastpath.LIMIT:
                        continue
                chain = queue.pop()
                if chain is None:
                    break
                if not self._send(chain):
                    self.held = chain
                    device.ctx.loop.add_writer(device.backend.fileno(self.pair), self._writable)
                    device.interrupt_queue(self.index)
                    return
                queue.push(chain, 0)
                sent += 1
            device.interrupt_queue(self.index)
            if sent == TX_BATCH:
                device.ctx.loop.call_soon(self._again)
                return
            if not queue.enable_notifications():
                return

    def _send_batch(self, path: fastpath.NetPath, queue: SplitQueue,
                    limit: int) -> tuple[int, int]:
        """Frames sent by the C data path, up to ``limit``: (its status, frames)."""
        device = self.device
        status, frames, sent_bytes = path.transmit(
            self.index, queue, device.negotiated, device.backend.fileno(self.pair),
            device.mtu_frame, limit)
        device.counters.tx_frames += frames
        device.counters.tx_bytes += sent_bytes
        return status, frames

    def _again(self) -> None:
        with self.device.lock:
            self.device.run_queue(self.index)

    def _writable(self) -> None:
        device = self.device
        with device.lock:
            device.ctx.loop.remove_writer(device.backend.fileno(self.pair))
            chain, self.held = self.held, None
            queue = device.queues[self.index]
            if chain is None or queue is None:
                return
            if not self._send(chain):
                self.held = chain
                device.ctx.loop.add_writer(device.backend.fileno(self.pair), self._writable)
                return
            queue.push(chain, 0)
            device.run_queue(self.index)

    def forget(self) -> None:
        """The driver reset: a held chain is the old driver's."""
        if self.held is not None:
            self.held = None
            self.device.ctx.loop.remove_writer(self.device.backend.fileno(self.pair))

    def _send(self, chain: Chain) -> bool:
        """Send (or drop) one frame; False when the back end cannot take it now."""
        device = self.device
        counters = device.counters
        length = chain.readable_length - HEADER_SIZE
        raw = peek(chain.readable, 0, HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            counters.tx_dropped += 1
            device.ctx.log(f"{device.name}: dropped a transmit chain of "
                           f"{chain.readable_length} bytes, shorter than its header")
            return True
        header = HEADER.unpack(raw)
        problem = header_problem(header, length, device.negotiated, device.mtu_frame)
        if problem:
            counters.tx_dropped += 1
            device.ctx.log(f"{device.name}: dropped a transmitted frame: {problem}")
            return True
        frame = skip(chain.readable, HEADER_SIZE)
        ipv4 = arp_sender(peek(frame, 0, ARP_HEAD), device.net.mac)
        if ipv4 is not None:
            device.net.guest_ipv4 = ipv4
        backend = device.backend
        if backend.vnet_header:
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = header
            clean = HEADER.pack(flags & HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size,
                                csum_start, csum_offset, 0)
            frame = [memoryview(clean), *frame]
        try:
            backend.send(self.pair, frame)
        except BlockingIOError:
            return False
        except OSError as e:
            counters.tx_errors += 1
            device.ctx.log(f"{device.name}: {backend.name} refused a frame: {e.strerror}")
            return True
        counters.tx_frames += 1
        counters.tx_bytes += length
        return True
