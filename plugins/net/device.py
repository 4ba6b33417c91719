# SPDX-License-Identifier: BSD-2-Clause
"""virtio-net (virtio 1.x §5.1) on a :class:`~hvf.plugins.net.backend.NetBackend`.

Queues: receive 2p and transmit 2p+1 for each queue pair p, then the control queue
(at 2N with VIRTIO_NET_F_MQ negotiated, else at 2), 256 entries each. Offered:
MAC, STATUS, MRG_RXBUF, CTRL_VQ with CTRL_RX, CTRL_MAC_ADDR and GUEST_ANNOUNCE, MTU
when ``mtu=`` is given (as bhyve), MQ with ``queues=N`` > 1, and the offloads the back
end carries (CSUM, HOST_TSO4/6, GUEST_CSUM, GUEST_TSO4/6 on a tap). Work runs on the
I/O thread under the device lock: receive when the back end's descriptor is readable
or the driver posts buffers (:mod:`.rx`), transmit on the queue's doorbell
(:mod:`.tx`), commands on the control queue's (:mod:`.ctrl`); interrupts go through
the queues' MSI-X vectors. After a restore the device announces the guest
(:meth:`VirtioNet.announce`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from hvf.errors import DeviceError
from hvf.plugins.net import ctrl
from hvf.plugins.net.fastpath import NetPath
from hvf.plugins.net.frames import announcement
from hvf.plugins.net.rx import RxQueue
from hvf.plugins.net.spec import (
    CONFIG,
    ETH_HEADER,
    F_CTRL_MAC_ADDR,
    F_CTRL_RX,
    F_CTRL_VQ,
    F_GUEST_ANNOUNCE,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_MTU,
    F_STATUS,
    HEADER_SIZE,
    MAX_GSO_FRAME,
    S_ANNOUNCE,
    TYPE_NET,
    VLAN_TAG,
    format_mac,
)
from hvf.plugins.net.state import NetState
from hvf.plugins.net.tx import TxQueue
from hvf.plugins.virtio.pci import ISR_CONFIG, VirtioPciDevice
from hvf.plugins.virtio.spec import DEVICE_NEEDS_RESET, DRIVER_OK
from hvf.snapshot_api import Fields

if TYPE_CHECKING:
    from hvf.plugins.net.backend import NetBackend
    from hvf.plugins.virtio.queue import SplitQueue

QUEUE_SIZE = 256
DEFAULT_MTU = 1500
GUEST_OFFLOADS = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6


@attrs.define
class Counters:
    """What ``hvf ctl status`` shows of the data path."""

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    #: Received frames dropped: too large for the guest's MTU or buffers, or runts.
    rx_oversize: int = 0
    #: Received frames the driver's receive filter refused.
    rx_filtered: int = 0
    #: Receive chains too small for a header (returned empty).
    rx_bad_buffers: int = 0
    #: Times the receive buffers ran out (hvf stopped reading until the guest posted).
    rx_no_buffers: int = 0
    #: Transmitted frames dropped for breaking the rules, and refused by the back end.
    tx_dropped: int = 0
    tx_errors: int = 0
    ctrl_commands: int = 0
    ctrl_errors: int = 0
    announcements: int = 0


class VirtioNet(VirtioPciDevice):
    device_type = TYPE_NET
    class_code = 0x020000  # network, Ethernet

    def __init__(self, name: str, backend: NetBackend, mac: bytes, *,
                 mtu: int | None = None) -> None:
        self.pairs = backend.pairs
        self.queue_max_sizes = (QUEUE_SIZE,) * (2 * self.pairs + 1)
        super().__init__(name)
        self.backend = backend
        self.default_mac = mac
        self.mtu = mtu or DEFAULT_MTU
        #: The largest frame (Ethernet header and a VLAN tag included) without GSO.
        self.mtu_frame = self.mtu + ETH_HEADER + VLAN_TAG
        self.device_features = (F_MAC | F_STATUS | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX
                                | F_CTRL_MAC_ADDR | F_GUEST_ANNOUNCE
                                | (F_MTU if mtu else 0) | (F_MQ if self.pairs > 1 else 0)
                                | backend.host_offloads | backend.guest_offloads)
        self.net = NetState(mac)
        self.counters = Counters()
        self.rx = [RxQueue(self, pair) for pair in range(self.pairs)]
        self.tx = [TxQueue(self, pair) for pair in range(self.pairs)]
        #: Set by a restore: announce the guest once the machine runs.
        self.announce_pending = False
        self._path: NetPath | None = None

    # ---- what the data path asks ----

    @property
    def path(self) -> NetPath | None:
        """The C data path, on a back end with a frame descriptor (a tap)."""
        if self._path is None and self.backend.frame_fd and self.backend.vnet_header:
            self._path = NetPath(self.ctx.memory)
        return self._path

    @property
    def merge(self) -> bool:
        return bool(self.negotiated & F_MRG_RXBUF)

    @property
    def rx_limit(self) -> int:
        """The largest frame the guest may receive, its header included."""
        gso = self.negotiated & (F_GUEST_TSO4 | F_GUEST_TSO6)
        return HEADER_SIZE + (MAX_GSO_FRAME if gso else self.mtu_frame)

    @property
    def control_index(self) -> int:
        return 2 * self.pairs if self.negotiated & F_MQ else 2

    @property
    def running(self) -> bool:
        return self.state.status & (DRIVER_OK | DEVICE_NEEDS_RESET) == DRIVER_OK

    def receiving(self, pair: int) -> bool:
        return self.running and pair < self.net.active_pairs and (
            pair == 0 or bool(self.negotiated & F_MQ))

    # ---- configuration ----

    def device_config(self) -> bytes:
        return CONFIG.pack(self.net.mac, self.net.status, self.pairs, self.mtu)

    def config_changed(self) -> None:
        """The configuration structure changed: a new generation."""
        self.state.config_generation = (self.state.config_generation + 1) & 0xFF

    # ---- the transport's calls ----

    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        if index == self.control_index and self.negotiated & F_CTRL_VQ:
            ctrl.serve(self, queue)
            return
        pair = index // 2
        if index == self.control_index or pair >= self.pairs or (
                pair and not self.negotiated & F_MQ):
            return  # not a queue of the negotiated layout
        if index % 2:
            self.tx[pair].run()
        elif pair < self.net.active_pairs:
            self.rx[pair].run()

    def activate(self) -> None:
        """DRIVER_OK (a vCPU thread): offloads set, then the I/O thread starts."""
        self.backend.set_offloads(self.negotiated & GUEST_OFFLOADS)
        self.backend.set_active_pairs(self.net.active_pairs)
        self.ctx.loop.call_soon(self._kick_all)

    def _kick_all(self) -> None:
        with self.lock:
            for index in range(len(self.queues)):
                self.run_queue(index)

    def device_reset(self) -> None:
        self.net = NetState(self.default_mac, guest_ipv4=self.net.guest_ipv4)
        for rx in self.rx:
            rx.forget()
            rx.pending = 0
        self.backend.set_offloads(0)
        self.backend.set_active_pairs(1)
        self.ctx.loop.call_soon(self._stop_reading)

    def _stop_reading(self) -> None:
        with self.lock:
            for rx in self.rx:
                rx.run()  # not running: it stops watching the back end
            for tx in self.tx:
                tx.forget()

    def set_active_pairs(self, count: int) -> None:
        """VQ_PAIRS_SET (I/O thread): pairs beyond ``count`` stop, those below start."""
        self.net.active_pairs = count
        self.backend.set_active_pairs(count)
        for rx in self.rx:
            rx.run()

    # ---- announcing ----

    def announce(self) -> None:
        """Tell the network where the guest is (after a restore, I/O thread): ask the
        driver to (VIRTIO_NET_S_ANNOUNCE and a configuration interrupt) when it
        negotiated GUEST_ANNOUNCE, else send a gratuitous ARP (or RARP) ourselves."""
        with self.lock:
            if not self.running:
                return
            self.counters.announcements += 1
            if self.negotiated & F_GUEST_ANNOUNCE:
                self.net.status |= S_ANNOUNCE
                self.config_changed()
                self._interrupt(self.state.config_msix_vector, ISR_CONFIG)
                return
            try:
                self.backend.announce(announcement(self.net.mac, self.net.guest_ipv4))
            except OSError as e:
                self.ctx.log(f"{self.name}: the announcement was not sent: {e.strerror}")

    # ---- status and state ----

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "backend": self.backend.name,
                "mac": format_mac(self.net.mac), "active_pairs": self.net.active_pairs,
                **attrs.asdict(self.counters), **self.backend.stats()}

    def save_state(self) -> dict[str, Any]:
        with self.lock:
            for rx in self.rx:
                rx.rewind()  # chains taken but unfilled go back to the ring
            return super().save_state()

    def save_device(self) -> Fields:
        return self.net.to_fields()

    def restore_device(self, fields: Fields, version: int) -> None:
        try:
            net = NetState.from_fields(fields, self.pairs)
        except ValueError as e:
            raise DeviceError(f"{self.name}: {e}") from None
        missing = self.negotiated & ~self.common.offered
        if missing:
            raise DeviceError(f"{self.name}: the snapshot's driver uses features "
                              f"{missing:#x} that {self.backend.name} does not offer")
        self.net = net
        for rx in self.rx:
            rx.forget()
        self.backend.set_offloads(self.negotiated & GUEST_OFFLOADS)
        self.backend.set_active_pairs(net.active_pairs)
        self.announce_pending = self.running

    def close(self) -> None:
        with self.lock:
            for rx in self.rx:
                if rx.reading:
                    self.ctx.loop.remove_reader(self.backend.fileno(rx.pair))
                    rx.reading = False
            for tx in self.tx:
                tx.forget()
        super().close()
        self.backend.close()
