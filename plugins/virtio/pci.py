# SPDX-License-Identifier: BSD-2-Clause
"""virtio-pci, modern (virtio 1.x §4.1) only: the transport every virtio device uses.

PCI identity 1af4:(1040 + device type), revision 1. One 64-bit memory BAR (BAR 4)
holds every structure, each found through its own vendor capability::

    0x0000  common configuration      (features, status, queue setup)
    0x1000  ISR status                (read to clear; INTx deasserts)
    0x2000  device-specific configuration
    0x3000  notifications             (queue q at 0x3000 + 4q: a KVM ioeventfd)
    0x4000  MSI-X table, 0x6000 PBA   (one vector per queue plus one for config)

A queue notification is an ioeventfd: the vCPU never leaves the kernel for it. The
device's work runs on the machine's I/O thread, woken by that eventfd; it interrupts
the guest through its MSI-X vector (an irqfd) or, with MSI-X off, INTx and the ISR.
A driver that breaks the rules (bad rings, bad indices, addresses outside RAM) puts
the device in DEVICE_NEEDS_RESET with a rate-limited log line; the VMM carries on.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from hvf.errors import DeviceError, VirtqueueError
from hvf.plugins.pci import BAR_MEM64, Bar, MsixCapability, PciDevice
from hvf.plugins.virtio.common import CommonConfig, TransportState
from hvf.plugins.virtio.queue import SplitQueue
from hvf.plugins.virtio.spec import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    NO_VECTOR,
    TRANSPORT_FEATURES,
)

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.ioevent import IoEvent

VENDOR_VIRTIO = 0x1AF4
DEVICE_ID_BASE = 0x1040
VIRTIO_BAR = 4
BAR_SIZE = 0x8000
COMMON_OFFSET, COMMON_LENGTH = 0x0000, 0x38
ISR_OFFSET, ISR_LENGTH = 0x1000, 4
DEVICE_OFFSET, DEVICE_LENGTH = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_LENGTH = 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x4000, 0x6000

CAP_VENDOR = 0x09
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5

ISR_QUEUE = 1 << 0
ISR_CONFIG = 1 << 1

class VirtioPciDevice(PciDevice):
    """A virtio device on the PCI transport. A device type subclasses it and sets
    :attr:`device_type`, :attr:`class_code`, :attr:`queue_max_sizes` and
    :attr:`device_features`, provides :meth:`device_config`, and does its work in
    :meth:`queue_notified` (on the I/O thread, with :attr:`lock` held)."""

    device_type = 0
    class_code = 0xFF0000
    #: The maximum size of each queue (the driver may choose smaller).
    queue_max_sizes: tuple[int, ...] = ()
    #: Device-type feature bits offered (transport bits are added).
    device_features = 0
    #: Transport feature bits offered (a vhost-user device offers its back end's).
    transport_features = TRANSPORT_FEATURES

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.set_identity(VENDOR_VIRTIO, DEVICE_ID_BASE + self.device_type, self.class_code,
                          revision=1, subsystem_vendor=VENDOR_VIRTIO,
                          subsystem=DEVICE_ID_BASE + self.device_type)
        self.lock = threading.RLock()
        self.state = TransportState.initial(self.queue_max_sizes)
        self.queues: list[SplitQueue | None] = [None] * len(self.queue_max_sizes)
        #: Queue notifications the back end received, and how many of them reached
        #: the vCPU loop (a write the ioeventfd did not match) instead of the kernel.
        self.kicks = 0
        #: One doorbell (ioeventfd) per queue, made when the device attaches.
        self.doorbells: list[IoEvent] = []
        self.notify_exits = 0
        #: Interrupts sent: MSI-X (each an irqfd write) and INTx.
        self.msix_interrupts = 0
        self.intx_interrupts = 0
        self.bar = self.add_bar(VIRTIO_BAR, BAR_MEM64, BAR_SIZE, self._bar_read, self._bar_write)
        self._add_virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_LENGTH)
        self._add_virtio_cap(CFG_ISR, ISR_OFFSET, ISR_LENGTH)
        self._add_virtio_cap(CFG_DEVICE, DEVICE_OFFSET, DEVICE_LENGTH)
        self._add_virtio_cap(CFG_NOTIFY, NOTIFY_OFFSET, NOTIFY_LENGTH,
                             NOTIFY_MULTIPLIER.to_bytes(4, "little"))
        self.request_intx()
        self.common = CommonConfig(self)

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"") -> int:
        body = (bytes([16 + len(extra), cfg_type, VIRTIO_BAR, 0, 0, 0])
                + offset.to_bytes(4, "little") + length.to_bytes(4, "little") + extra)
        return self.add_capability(CAP_VENDOR, body)

    # ---- attaching ----

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.msix = MsixCapability(self, ctx.interrupts, len(self.queues) + 1, bar=VIRTIO_BAR,
                                   table_offset=MSIX_TABLE_OFFSET, pba_offset=MSIX_PBA_OFFSET,
                                   on_control=self.interrupt_routes_changed)
        self.doorbells = [ctx.ioevent(2) for _ in self.queues]
        self.watch_doorbells()

    def watch_doorbells(self) -> None:
        """Wait for queue notifications on the I/O thread (a device whose queues run
        elsewhere, as vhost-user's, hands the doorbells over instead)."""
        for index, doorbell in enumerate(self.doorbells):
            self.ctx.loop.add_reader(doorbell.fd, lambda i=index: self._doorbell(i))

    def bar_decoding_changed(self, bar: Bar) -> None:
        if bar is not self.bar:
            return
        base = bar.address if bar.range is not None and bar.range.mapped else None
        for index, doorbell in enumerate(self.doorbells):
            doorbell.bind(None if base is None else
                          base + NOTIFY_OFFSET + index * NOTIFY_MULTIPLIER)

    # ---- the BAR ----

    def _bar_read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset < COMMON_OFFSET + COMMON_LENGTH:
                return self.common.read(offset, size)
            if ISR_OFFSET <= offset < ISR_OFFSET + ISR_LENGTH:
                return self._read_isr() if offset == ISR_OFFSET else 0
            if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
                config = self.device_config()
                o = offset - DEVICE_OFFSET
                return int.from_bytes(config[o : o + size].ljust(size, b"\0"), "little")
            if MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
                return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
            if offset >= MSIX_PBA_OFFSET:
                return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
            return 0

    def _bar_write(self, offset: int, size: int, value: int) -> None:
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_LENGTH:
            index = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
            if index < len(self.doorbells):
                self.notify_exits += 1  # not an ioeventfd: hand it to the I/O thread
                self.doorbells[index].signal()
            return
        with self.lock:
            if offset < COMMON_OFFSET + COMMON_LENGTH:
                self.common.write(offset, size, value)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
                self.device_config_write(offset - DEVICE_OFFSET, size, value)
            elif MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
                self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)

    def _read_isr(self) -> int:
        isr, self.state.isr = self.state.isr, 0
        if isr:
            self.set_intx(False)
        return isr

    # ---- queues (common configuration calls these) ----

    @property
    def negotiated(self) -> int:
        return self.state.driver_features

    def queue_enabled(self, index: int) -> None:
        """The driver set queue_enable: map the rings (or refuse them)."""
        state = self.state.queues[index]
        try:
            self.queues[index] = SplitQueue(
                self.ctx.dma, state, event_idx=bool(self.negotiated & F_RING_EVENT_IDX),
                indirect=bool(self.negotiated & F_RING_INDIRECT_DESC),
                name=f"{self.name} queue {index}")
        except VirtqueueError as e:
            state.ready = False  # as saved state too: no live queue on a bad layout
            self.needs_reset(str(e))

    def status_written(self, old: int, new: int) -> None:
        if new & DRIVER_OK and not old & DRIVER_OK:
            self.activate()

    def reset(self) -> None:
        """Device reset (status written 0): queues off, features and vectors cleared."""
        self.state = TransportState.initial(self.queue_max_sizes)
        self.queues = [None] * len(self.queues)
        self.set_intx(False)
        for doorbell in self.doorbells:
            doorbell.consume()
        self.device_reset()

    def needs_reset(self, why: str) -> None:
        """The driver broke the rules: stop the device until it is reset."""
        self.ctx.log(f"{self.name}: {why}; device needs reset")
        if not self.state.status & DEVICE_NEEDS_RESET:
            self.state.status |= DEVICE_NEEDS_RESET
            self.queues = [None] * len(self.queues)
            self._interrupt(self.state.config_msix_vector, ISR_CONFIG)

    # ---- notifications, both ways (I/O thread) ----

    def _doorbell(self, index: int) -> None:
        count = self.doorbells[index].consume()
        if not count:
            return
        with self.lock:
            self.kicks += count
            self.run_queue(index)

    def run_queue(self, index: int) -> None:
        """Let the device work on queue ``index`` (lock held)."""
        queue = self.queues[index]
        if queue is None or not self.state.status & DRIVER_OK:
            return
        try:
            self.queue_notified(index, queue)
        except VirtqueueError as e:
            self.needs_reset(str(e))

    def interrupt_queue(self, index: int) -> None:
        """Used buffers were added to queue ``index``: interrupt unless suppressed."""
        queue = self.queues[index]
        if queue is not None and queue.needs_interrupt():
            self._interrupt(self.state.queues_msix[index], ISR_QUEUE)

    def queue_irqfd(self, index: int) -> int | None:
        """The eventfd whose write raises queue ``index``'s MSI-X vector (a back-end
        thread may signal it directly), -1 when the queue has no vector, None without
        MSI-X (INTx: :meth:`interrupt_queue` on the I/O thread)."""
        if not self.msix.enabled:
            return None
        vector = self.state.queues_msix[index]
        if vector == NO_VECTOR or vector >= self.msix.count:
            return -1
        return self.msix.vectors[vector].fd

    def interrupt_routes_changed(self) -> None:
        """The driver turned MSI-X on or off or gave a queue another vector (lock
        held): a back end that signals :meth:`queue_irqfd` itself looks again."""

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR and vector < self.msix.count:
                self.msix_interrupts += 1
                self.msix.trigger(vector)
        else:
            self.intx_interrupts += 1
            self.state.isr |= isr_bit
            self.set_intx(True)

    def stats(self) -> dict[str, int]:
        """Counters for ``hvf ctl status``."""
        return {"kicks": self.kicks, "kicks_through_vcpu_loop": self.notify_exits,
                "msix_interrupts": self.msix_interrupts, "intx_interrupts": self.intx_interrupts,
                "status": self.state.status}

    # ---- what a device type provides ----

    def device_config(self) -> bytes:
        """The device-specific configuration structure."""
        return b""

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        """A driver write of device configuration (ignored unless overridden)."""

    def activate(self) -> None:
        """The driver set DRIVER_OK: start (e.g. look at every queue)."""
        for index in range(len(self.queues)):
            self.run_queue(index)

    def device_reset(self) -> None:
        """Forget device-type state on reset."""

    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        """The driver made buffers available on ``queue``; take and complete them."""
        raise NotImplementedError

    def save_device(self) -> dict[str, Any]:
        return {}

    def restore_device(self, fields: dict[str, Any], version: int) -> None:
        pass

    # ---- state ----

    def save_state(self) -> dict[str, Any]:
        with self.lock:
            return {"pci": super().save_state(), "msix": self.msix.save_state(),
                    "transport": self.state.to_fields(), "device": self.save_device()}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        parts = {name: fields.get(name) for name in ("pci", "msix", "transport", "device")}
        for name, part in parts.items():
            if not isinstance(part, dict):
                raise DeviceError(f"{self.name}: saved state lacks its {name!r} part")
        with self.lock:
            state = TransportState.from_fields(parts["transport"], len(self.queues),
                                               self.queue_max_sizes)
            super().restore_state(parts["pci"], version)
            self.msix.restore_state(parts["msix"])
            self.state = state
            self.queues = [None] * len(self.queues)
            for index, queue in enumerate(state.queues):
                if queue.ready and not state.status & DEVICE_NEEDS_RESET:
                    self.queue_enabled(index)
            self.restore_device(parts["device"], version)
        for index in range(len(self.queues)):  # work posted while paused
            self.doorbells[index].signal()

    def close(self) -> None:
        for doorbell in self.doorbells:
            self.ctx.loop.remove_reader(doorbell.fd)
            doorbell.close()
        if hasattr(self, "msix"):
            self.msix.close()

