# SPDX-License-Identifier: BSD-2-Clause
"""Interrupts as objects a device is handed: lines, their sources, and MSI vectors.

A device never drives the machine's interrupt controller itself. It is given a
:class:`LineSource` (its own input on a shared :class:`Line`) or an :class:`MsiVector`
(cloud-hypervisor's interrupt source groups work the same way):

- A :class:`Line` is one GSI. It knows its trigger mode, and it is high while *any* of
  its sources is high (wired-OR): the ACPI SCI and a PCI INTx routed to IRQ 9 no longer
  lower each other's level.
- An :class:`MsiVector` is one MSI message. It owns an eventfd bound to a KVM GSI
  route with ``KVM_IRQFD``, so a back-end thread raises it with one ``write`` to the
  eventfd, inside the kernel, without a call into the vCPU loop or the device model.
  While masked, the eventfd is unbound and its count is the pending bit.

:class:`InterruptController` owns the KVM side (``KVM_IRQ_LINE``, the ELCR, the GSI
routing table, irqfds) and is the only object that touches it.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from hvf._kvm import lib
from hvf.errors import DeviceError
from hvf.iowait import readable

#: The first GSI above the IOAPIC's 24 pins; MSI routes are allocated from here.
FIRST_MSI_GSI = 24
ISA_IRQS = 16
IOAPIC_PINS = 24


class IrqChipBackend(Protocol):
    """What :class:`InterruptController` needs from KVM (``hvf.kvm.VmFd``)."""

    def irq_line(self, irq: int, level: int) -> None: ...
    def set_level_triggered(self, irq: int, level: bool = True) -> None: ...
    def set_gsi_routing(self, routes: list[tuple[int, int, int, int, int]]) -> None: ...
    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None,
              deassign: bool = False) -> None: ...
    def signal_msi(self, address: int, data: int) -> int: ...


def default_routes() -> list[tuple[int, int, int, int, int]]:
    """KVM's own default routing: ISA IRQs to the 8259 pair and the IOAPIC, 16-23 to
    the IOAPIC alone (kept whenever hvf replaces the table to add MSI routes)."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        if gsi < ISA_IRQS:
            chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, lib.KVM_IRQ_ROUTING_IRQCHIP, chip, gsi & 7, 0))
        routes.append((gsi, lib.KVM_IRQ_ROUTING_IRQCHIP, lib.KVM_IRQCHIP_IOAPIC, gsi, 0))
    return routes


class Line:
    """One interrupt line (GSI), wired-OR over its sources."""

    def __init__(self, controller: InterruptController, gsi: int, level_triggered: bool) -> None:
        self.gsi = gsi
        self.level_triggered = level_triggered
        self._controller = controller
        self._high: set[str] = set()
        self._lock = threading.Lock()

    def source(self, name: str) -> LineSource:
        """A new input of this line, for one device (or one function of it)."""
        return LineSource(self, name)

    @property
    def level(self) -> bool:
        return bool(self._high)

    def _set(self, name: str, level: bool) -> None:
        with self._lock:
            was_high = bool(self._high)
            if level:
                self._high.add(name)
            else:
                self._high.discard(name)
            if bool(self._high) != was_high:
                self._controller.drive(self.gsi, not was_high)

    def _pulse(self) -> None:
        with self._lock:
            if not self._high:  # an edge on a line some source holds high is lost
                self._controller.drive(self.gsi, True)
                self._controller.drive(self.gsi, False)


class LineSource:
    """One device's input on a :class:`Line`."""

    __slots__ = ("line", "name")

    def __init__(self, line: Line, name: str) -> None:
        self.line = line
        self.name = name

    def set(self, level: bool) -> None:
        """Assert (True) or release (False) this source's level."""
        self.line._set(self.name, bool(level))

    def pulse(self) -> None:
        """An edge: raise and lower at once (edge-triggered devices)."""
        self.line._pulse()

    @property
    def level(self) -> bool:
        return self.name in self.line._high


class MsiVector:
    """One MSI(-X) message, raised from any thread through an irqfd.

    :meth:`program` sets the message (address, data) and :meth:`unmask` /
    :meth:`mask` bind and unbind the irqfd. A trigger while masked stays in the
    eventfd's counter: that is the pending bit, delivered on unmask.
    """

    def __init__(self, controller: InterruptController, gsi: int) -> None:
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.address = 0
        self.data = 0
        self.masked = True
        self._controller = controller

    def trigger(self) -> None:
        """Raise the interrupt (or make it pending while masked). Any thread."""
        os.eventfd_write(self.fd, 1)

    def program(self, address: int, data: int) -> None:
        """Set the message; takes effect for the next trigger."""
        if (address, data) != (self.address, self.data):
            self.address, self.data = address, data
            self._controller.set_msi_route(self.gsi, address, data)

    def mask(self) -> None:
        if not self.masked:
            self.masked = True
            self._controller.backend.irqfd(self.fd, self.gsi, deassign=True)

    def unmask(self) -> None:
        """Bind the irqfd; a pending trigger is delivered now."""
        if self.masked:
            self.masked = False
            self._controller.backend.irqfd(self.fd, self.gsi)
            if self.take_pending():
                self.trigger()

    @property
    def pending(self) -> bool:
        """Whether a trigger waits while masked (the PBA bit)."""
        if not self.masked:
            return False
        return bool(readable([self.fd], 0))

    def take_pending(self) -> bool:
        """Clear the pending trigger; True when there was one."""
        try:
            return os.eventfd_read(self.fd) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self.fd < 0:
            return
        self.mask()
        os.close(self.fd)
        self.fd = -1
        self._controller.release_msi_route(self.gsi)


class InterruptController:
    """The machine's interrupt routing: lines by GSI, MSI routes, irqfds."""

    def __init__(self, backend: IrqChipBackend, max_gsi: int = 1024) -> None:
        self.backend = backend
        self.max_gsi = max_gsi
        self._lines: dict[int, Line] = {}
        self._msi_routes: dict[int, tuple[int, int]] = {}
        self._free_gsis: list[int] = []
        self._next_gsi = FIRST_MSI_GSI
        self._lock = threading.Lock()

    def line(self, gsi: int, *, level_triggered: bool = False) -> Line:
        """The line for ``gsi``; a level-triggered ISA IRQ gets its ELCR bit set."""
        if not 0 <= gsi < IOAPIC_PINS:
            raise DeviceError(f"interrupt line {gsi} is not an IOAPIC pin (0-23)")
        with self._lock:
            line = self._lines.get(gsi)
            if line is None:
                line = self._lines[gsi] = Line(self, gsi, level_triggered)
                if level_triggered and gsi < ISA_IRQS:
                    self.backend.set_level_triggered(gsi)
            elif level_triggered and not line.level_triggered:
                line.level_triggered = True
                if gsi < ISA_IRQS:
                    self.backend.set_level_triggered(gsi)
        return line

    def drive(self, gsi: int, level: bool) -> None:
        """Set the level KVM sees on ``gsi`` (lines call this, under their lock)."""
        self.backend.irq_line(gsi, 1 if level else 0)

    def msi_vector(self) -> MsiVector:
        """A new MSI vector with its own GSI route, masked until programmed."""
        with self._lock:
            if self._free_gsis:
                gsi = self._free_gsis.pop()
            elif self._next_gsi < self.max_gsi:
                gsi = self._next_gsi
                self._next_gsi += 1
            else:
                raise DeviceError(f"no GSI left for another MSI vector ({self.max_gsi} in use)")
            self._msi_routes[gsi] = (0xFEE0_0000, 0)
            self._commit()
        return MsiVector(self, gsi)

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        with self._lock:
            self._msi_routes[gsi] = (address, data)
            self._commit()

    def release_msi_route(self, gsi: int) -> None:
        with self._lock:
            if self._msi_routes.pop(gsi, None) is not None:
                self._free_gsis.append(gsi)
                self._commit()

    def signal_msi(self, address: int, data: int) -> None:
        """Deliver one MSI message now, from the calling thread (no irqfd)."""
        self.backend.signal_msi(address, data)

    def _commit(self) -> None:
        routes = default_routes()
        for gsi, (address, data) in sorted(self._msi_routes.items()):
            routes.append((gsi, lib.KVM_IRQ_ROUTING_MSI, address & 0xFFFFFFFF, address >> 32, data))
        self.backend.set_gsi_routing(routes)
