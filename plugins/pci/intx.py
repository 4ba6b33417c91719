# SPDX-License-Identifier: BSD-2-Clause
"""Legacy PCI interrupts: an 8-pin PIRQ router (ICH-style) feeding the PIC and IOAPIC.

Each INTx pin goes to one of eight PIRQs chosen by slot and pin, bhyve's fixed formula
``(4 + slot + pin) % 8``. PIRQ *n* always drives IOAPIC pin 16 + *n*; when its routing
register names a permitted ISA IRQ, the same level also drives that 8259 input, which
is then level-triggered (ELCR). Lines are shared: a PIRQ is high while any function
routed to it asserts.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

from hvf.errors import ConfigError

if TYPE_CHECKING:
    from hvf.interrupts import InterruptController, LineSource
    from hvf.plugins.pci.device import PciDevice

PIRQ_COUNT = 8
PIRQ_DISABLED = 0x80
PIRQ_WRITABLE = 0x8F
#: ISA IRQs a PIRQ may use: 3-7, 9-12, 14, 15.
PERMITTED_IRQS = frozenset(i for i in range(16) if 0xDEF8 >> i & 1)
IOAPIC_FIRST_PCI_PIN = 16


def pirq_for(slot: int, pin: int) -> int:
    """The PIRQ that INTx ``pin`` (1 = INTA) of a function in ``slot`` uses."""
    return (4 + slot + pin) % PIRQ_COUNT


class IntxRouter:
    """The PIRQ routing registers and the per-PIRQ shared line state."""

    def __init__(self, interrupts: InterruptController) -> None:
        self.interrupts = interrupts
        #: PIRQ n's input on IOAPIC pin 16 + n, and on the ISA IRQ it is routed to.
        self.ioapic = [interrupts.line(IOAPIC_FIRST_PCI_PIN + n, level_triggered=True)
                       .source(f"pirq {n}") for n in range(PIRQ_COUNT)]
        self.isa: list[LineSource | None] = [None] * PIRQ_COUNT
        self.pirq = bytearray([PIRQ_DISABLED] * PIRQ_COUNT)
        self.reserved: set[int] = set()
        self.irq_use: Counter[int] = Counter()
        self.active = [0] * PIRQ_COUNT
        self.routes: dict[int, int] = {}  # id(device) -> PIRQ
        self._lock = threading.Lock()

    def reserve(self, irq: int) -> None:
        """Keep ISA ``irq`` out of PCI routing (e.g. a COM port's)."""
        self.reserved.add(irq)

    def use(self, irq: int) -> None:
        """Count ``irq`` as used by a non-PCI device (e.g. the ACPI SCI), so PCI
        routing prefers other IRQs but may still share it."""
        self.irq_use[irq] += 1

    def isa_irq(self, pirq: int) -> int | None:
        """The 8259 IRQ PIRQ ``pirq`` currently drives, or None when disabled."""
        value = self.pirq[pirq]
        irq = value & 0x0F
        return None if value & PIRQ_DISABLED or irq not in PERMITTED_IRQS else irq

    def connect(self, device: PciDevice) -> int:
        """Route ``device``'s pin; programs its PIRQ if unset. Returns the ISA IRQ."""
        pirq = pirq_for(device.address[1], device.interrupt_pin)
        if self.isa_irq(pirq) is None:
            candidates = sorted(PERMITTED_IRQS - self.reserved, key=lambda i: (self.irq_use[i], i))
            if not candidates:
                raise ConfigError(f"{device.name}: no ISA IRQ left for PCI interrupt routing")
            self.write(pirq, candidates[0])
        irq = self.isa_irq(pirq)
        assert irq is not None
        self.irq_use[irq] += 1
        self.routes[id(device)] = pirq
        device.connect_intx(self._drive)
        return irq

    def gsi(self, pirq: int) -> int:
        return IOAPIC_FIRST_PCI_PIN + pirq

    def _drive(self, device: PciDevice, level: bool) -> None:
        pirq = self.routes[id(device)]
        with self._lock:
            was_high = self.active[pirq] > 0
            self.active[pirq] += 1 if level else -1
            high = self.active[pirq] > 0
            if high != was_high:
                self.ioapic[pirq].set(high)
                isa = self.isa[pirq]
                if isa is not None:
                    isa.set(high)

    def read(self, pirq: int) -> int:
        return self.pirq[pirq]

    def write(self, pirq: int, value: int) -> None:
        """A guest (or firmware) write of a PIRQ routing register."""
        with self._lock:
            old = self.isa_irq(pirq)
            self.pirq[pirq] = value & PIRQ_WRITABLE
            new = self.isa_irq(pirq)
            if new == old:
                return
            isa = self.isa[pirq]
            if isa is not None:
                isa.set(False)
            self.isa[pirq] = None
            if new is not None:
                isa = self.interrupts.line(new, level_triggered=True).source(f"pirq {pirq}")
                self.isa[pirq] = isa
                if self.active[pirq]:
                    isa.set(True)
