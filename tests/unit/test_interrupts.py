# SPDX-License-Identifier: BSD-2-Clause
"""Interrupt lines (wired-OR, trigger modes), MSI vectors and their GSI routes."""

from __future__ import annotations

import os

import pytest
from test_lpc import LPC, IntxDev, machine

from fakes import FakeVm, cfg_write, inp, outp
from hvf._kvm import lib
from hvf.errors import DeviceError
from hvf.interrupts import FIRST_MSI_GSI, InterruptController, default_routes
from hvf.plugins.lpc.pm import ACPI_ENABLE, PM1A_EVT, SCI_IRQ, SMI_CMD, STS_PWRBTN
from hvf.plugins.pci.intx import pirq_for


def test_sci_and_pci_intx_share_irq9_until_both_drop() -> None:
    dev = IntxDev("nic")
    vm, bus, _lpc = machine(((0, 3, 0), dev))
    pirq = pirq_for(3, 1)
    cfg_write(vm, LPC, 0x60 + pirq if pirq < 4 else 0x64 + pirq, 1, SCI_IRQ)
    assert bus.intx.isa_irq(pirq) == SCI_IRQ
    pm = vm.device("pm")
    outp(vm, SMI_CMD, 1, ACPI_ENABLE)
    outp(vm, PM1A_EVT + 2, 2, STS_PWRBTN)  # enable the power-button event
    vm.irqs.clear()

    dev.set_intx(True)
    assert pm.press_power_button()
    dev.set_intx(False)  # the SCI still holds IRQ 9
    assert [e for e in vm.irqs if e[0] == SCI_IRQ] == [(SCI_IRQ, True)]
    assert vm.interrupts.line(SCI_IRQ).level
    outp(vm, PM1A_EVT, 2, STS_PWRBTN)  # the guest acknowledges the event
    assert [e for e in vm.irqs if e[0] == SCI_IRQ] == [(SCI_IRQ, True), (SCI_IRQ, False)]
    assert inp(vm, PM1A_EVT, 2) & STS_PWRBTN == 0

    pm.press_power_button()
    dev.set_intx(True)
    outp(vm, PM1A_EVT, 2, STS_PWRBTN)  # now the INTx holds it
    assert [e for e in vm.irqs if e[0] == SCI_IRQ][-1] == (SCI_IRQ, True)
    assert vm.interrupts.line(SCI_IRQ).level
    dev.set_intx(False)
    assert vm.irqs[-1] == (SCI_IRQ, False)


def test_level_triggered_isa_line_sets_elcr_once() -> None:
    vm = FakeVm()
    a = vm.interrupts.line(5, level_triggered=True).source("a")
    b = vm.interrupts.line(5, level_triggered=True).source("b")
    assert vm.vmfd.level_triggered == [(5, True)]
    a.set(True)
    b.set(True)
    a.set(False)
    assert vm.irqs == [(5, True)]
    b.set(False)
    assert vm.irqs == [(5, True), (5, False)]
    vm.interrupts.line(20, level_triggered=True)  # IOAPIC pins have no ELCR
    assert vm.vmfd.level_triggered == [(5, True)]


def test_edge_pulse_is_lost_while_a_source_holds_the_line() -> None:
    vm = FakeVm()
    line = vm.interrupts.line(1)
    held, edge = line.source("held"), line.source("edge")
    edge.pulse()
    assert vm.irqs == [(1, True), (1, False)]
    held.set(True)
    edge.pulse()
    assert vm.irqs == [(1, True), (1, False), (1, True)]


def test_line_outside_the_ioapic_is_refused() -> None:
    with pytest.raises(DeviceError, match="24"):
        FakeVm().interrupts.line(24)


def test_msi_vector_routes_and_irqfd() -> None:
    vm = FakeVm()
    vector = vm.interrupts.msi_vector()
    assert vector.gsi == FIRST_MSI_GSI and vector.masked
    vector.program(0xFEE0_1000, 0x4051)
    msi = [r for r in vm.vmfd.routes if r[1] == lib.KVM_IRQ_ROUTING_MSI]
    assert msi == [(FIRST_MSI_GSI, lib.KVM_IRQ_ROUTING_MSI, 0xFEE0_1000, 0, 0x4051)]
    assert vm.vmfd.routes[: len(default_routes())] == default_routes()
    vector.trigger()  # masked: pending, nothing bound
    assert vector.pending and vm.vmfd.irqfds == {}
    vector.unmask()
    assert vm.vmfd.irqfds == {vector.fd: vector.gsi}
    # the pending trigger was re-raised into the (now bound) eventfd
    assert os.eventfd_read(vector.fd) == 1
    assert not vector.pending
    vector.mask()
    assert vm.vmfd.irqfds == {}
    other = vm.interrupts.msi_vector()
    vector.close()
    again = vm.interrupts.msi_vector()
    assert again.gsi == FIRST_MSI_GSI and other.gsi == FIRST_MSI_GSI + 1


def test_default_routes_match_kvm() -> None:
    routes = default_routes()
    assert (0, lib.KVM_IRQ_ROUTING_IRQCHIP, lib.KVM_IRQCHIP_PIC_MASTER, 0, 0) in routes
    assert (9, lib.KVM_IRQ_ROUTING_IRQCHIP, lib.KVM_IRQCHIP_PIC_SLAVE, 1, 0) in routes
    assert (23, lib.KVM_IRQ_ROUTING_IRQCHIP, lib.KVM_IRQCHIP_IOAPIC, 23, 0) in routes
    assert len(routes) == 16 + 24


def test_gsi_exhaustion_is_an_error() -> None:
    controller = InterruptController(FakeVm().vmfd, max_gsi=FIRST_MSI_GSI + 1)
    controller.msi_vector()
    with pytest.raises(DeviceError, match="no GSI left"):
        controller.msi_vector()
