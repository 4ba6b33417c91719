# SPDX-License-Identifier: BSD-2-Clause
"""The virtio-pci common configuration structure (virtio 1.x §4.1.4.3) and the
transport's state record.

Registers are decoded by field, not by access width: a driver may read or write a
field in pieces (a 64-bit queue address as two dwords), and each write updates the
fields it touches from the bytes written over their current value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from hvf.plugins.virtio.queue import MAX_QUEUE_SIZE, QueueState
from hvf.plugins.virtio.spec import (
    DEVICE_NEEDS_RESET,
    F_VERSION_1,
    FEATURES_OK,
    NO_VECTOR,
)
from hvf.snapshot_api import field_int

if TYPE_CHECKING:
    from hvf.plugins.virtio.pci import VirtioPciDevice


#: (offset, size, name) of every field; names the driver writes are handled below.
FIELDS: tuple[tuple[int, int, str], ...] = (
    (0x00, 4, "device_feature_select"),
    (0x04, 4, "device_feature"),
    (0x08, 4, "driver_feature_select"),
    (0x0C, 4, "driver_feature"),
    (0x10, 2, "config_msix_vector"),
    (0x12, 2, "num_queues"),
    (0x14, 1, "device_status"),
    (0x15, 1, "config_generation"),
    (0x16, 2, "queue_select"),
    (0x18, 2, "queue_size"),
    (0x1A, 2, "queue_msix_vector"),
    (0x1C, 2, "queue_enable"),
    (0x1E, 2, "queue_notify_off"),
    (0x20, 8, "queue_desc"),
    (0x28, 8, "queue_driver"),
    (0x30, 8, "queue_device"),
)
LENGTH = 0x38


@attrs.define
class TransportState:
    """What the virtio-pci transport holds for the driver, snapshot as it is."""

    status: int = 0
    device_feature_select: int = 0
    driver_feature_select: int = 0
    driver_features: int = 0
    config_msix_vector: int = NO_VECTOR
    config_generation: int = 0
    queue_select: int = 0
    isr: int = 0
    queues: list[QueueState] = attrs.Factory(list)
    queues_msix: list[int] = attrs.Factory(list)

    @classmethod
    def initial(cls, max_sizes: Sequence[int]) -> TransportState:
        """The state after reset: queues at their largest size, off, no vectors."""
        return cls(queues=[QueueState(size=size) for size in max_sizes],
                   queues_msix=[NO_VECTOR] * len(max_sizes))

    def to_fields(self) -> dict[str, Any]:
        fields = attrs.asdict(self, recurse=False)
        fields["queues"] = [q.to_fields() for q in self.queues]
        fields["queues_msix"] = list(self.queues_msix)
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, Any], count: int,
                    max_sizes: Sequence[int]) -> TransportState:
        """Validate saved transport state for a device with these queues."""
        queues, vectors = fields.get("queues"), fields.get("queues_msix")
        if not isinstance(queues, list) or len(queues) != count:
            raise ValueError(f"saved field 'queues' is not a list of {count} queues")
        if not isinstance(vectors, list) or len(vectors) != count or any(
                type(v) is not int or not 0 <= v <= NO_VECTOR for v in vectors):
            raise ValueError(f"saved field 'queues_msix' is not a list of {count} vectors")
        parsed = []
        for index, (queue, limit) in enumerate(zip(queues, max_sizes)):
            if not isinstance(queue, dict):
                raise ValueError(f"saved queue {index} is not a mapping")
            state = QueueState.from_fields(queue)
            if state.size > limit:
                raise ValueError(f"saved queue {index} is larger than the device allows")
            parsed.append(state)
        return cls(
            status=field_int(fields, "status", 8),
            device_feature_select=field_int(fields, "device_feature_select", 32),
            driver_feature_select=field_int(fields, "driver_feature_select", 32),
            driver_features=field_int(fields, "driver_features", 64),
            config_msix_vector=field_int(fields, "config_msix_vector", 16),
            config_generation=field_int(fields, "config_generation", 8),
            queue_select=field_int(fields, "queue_select", 16),
            isr=field_int(fields, "isr", 8),
            queues=parsed,
            queues_msix=list(vectors),
        )


class CommonConfig:
    """The common configuration registers of one device (its lock is held)."""

    def __init__(self, device: VirtioPciDevice) -> None:
        self.device = device

    @property
    def offered(self) -> int:
        return self.device.device_features | self.device.transport_features

    def _selected(self) -> int | None:
        select = self.device.state.queue_select
        return select if select < len(self.device.queues) else None

    def _value(self, name: str) -> int:
        state = self.device.state
        q = self._selected()
        queue = state.queues[q] if q is not None else None
        if name == "device_feature":
            select = state.device_feature_select
            return self.offered >> (32 * select) & 0xFFFFFFFF if select < 2 else 0
        if name == "driver_feature":
            select = state.driver_feature_select
            return state.driver_features >> (32 * select) & 0xFFFFFFFF if select < 2 else 0
        if name == "num_queues":
            return len(self.device.queues)
        if name == "device_status":
            return state.status
        if name in ("device_feature_select", "driver_feature_select", "config_msix_vector",
                    "config_generation", "queue_select"):
            return int(getattr(state, name))
        if queue is None:
            return 0
        assert q is not None
        return {
            "queue_size": queue.size,
            "queue_msix_vector": state.queues_msix[q],
            "queue_enable": int(queue.ready),
            "queue_notify_off": q,
            "queue_desc": queue.desc_addr,
            "queue_driver": queue.avail_addr,
            "queue_device": queue.used_addr,
        }[name]

    def image(self) -> bytearray:
        data = bytearray(LENGTH)
        for offset, size, name in FIELDS:
            data[offset : offset + size] = self._value(name).to_bytes(size, "little")
        return data

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.image()[offset : offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        data = self.image()
        end = min(offset + size, LENGTH)
        data[offset:end] = value.to_bytes(size, "little")[: end - offset]
        for field_offset, field_size, name in FIELDS:
            if field_offset < end and offset < field_offset + field_size:
                new = int.from_bytes(data[field_offset : field_offset + field_size], "little")
                self._write_field(name, new)

    def _write_field(self, name: str, value: int) -> None:
        device = self.device
        state = device.state
        if name in ("device_feature_select", "driver_feature_select", "queue_select"):
            setattr(state, name, value)
        elif name == "driver_feature":
            select = state.driver_feature_select
            if select < 2 and not state.status & FEATURES_OK:
                mask = 0xFFFFFFFF << (32 * select)
                state.driver_features = (state.driver_features & ~mask) | (value << (32 * select))
        elif name == "config_msix_vector":
            state.config_msix_vector = self._vector(value)
        elif name == "device_status":
            self._write_status(value)
        else:
            self._write_queue_field(name, value)

    def _vector(self, value: int) -> int:
        """A vector the device can use, or NO_VECTOR (which the driver then reads)."""
        return value if value < self.device.msix.count else NO_VECTOR

    def _write_status(self, value: int) -> None:
        device = self.device
        state = device.state
        if value == 0:
            device.reset()
            return
        old = state.status
        new = value | (old & DEVICE_NEEDS_RESET)  # DEVICE_NEEDS_RESET stays until reset
        if new & FEATURES_OK and not old & FEATURES_OK:
            features = state.driver_features
            if features & ~self.offered or not features & F_VERSION_1:
                new &= ~FEATURES_OK  # the driver reads it back and gives up
        state.status = new & 0xFF
        device.status_written(old, state.status)

    def _write_queue_field(self, name: str, value: int) -> None:
        device = self.device
        q = self._selected()
        if q is None:
            return
        state = device.state
        queue = state.queues[q]
        if name == "queue_msix_vector":
            state.queues_msix[q] = self._vector(value)
            device.interrupt_routes_changed()
        elif name == "queue_enable":
            if value == 1 and not queue.ready:
                queue.ready = True
                device.queue_enabled(q)
        elif queue.ready:
            return  # a live queue's size and addresses are fixed
        elif name == "queue_size":
            if 0 < value <= min(device.queue_max_sizes[q], MAX_QUEUE_SIZE) and not value & (value - 1):
                queue.size = value
        elif name == "queue_desc":
            queue.desc_addr = value
        elif name == "queue_driver":
            queue.avail_addr = value
        elif name == "queue_device":
            queue.used_addr = value
