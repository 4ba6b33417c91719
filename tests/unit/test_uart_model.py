# SPDX-License-Identifier: BSD-2-Clause
"""Tests for the bus-independent 16550A register model."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hvf.plugins.uart.model import (
    FCR_ENABLE,
    FCR_RX_RESET,
    IER,
    IER_EDSSI,
    IER_ELSI,
    IER_ERBFI,
    IER_ETBEI,
    IIR_FCR,
    LCR,
    LCR_DLAB,
    LSR,
    LSR_DR,
    LSR_OE,
    LSR_TEMT,
    LSR_THRE,
    MCR,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT1,
    MCR_OUT2,
    MCR_RTS,
    MSR,
    RBR_THR,
    SCR,
    Uart16550,
    UartState,
)

TRIGGERS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}
IER_VALUES = st.integers(0, 0x0F)
RARELY = st.sampled_from([False, False, False, True])


class Wires:
    """Records what a UART drives: its INTR level changes and transmitted bytes."""

    def __init__(self) -> None:
        self.level = False
        self.irq_calls = 0
        self.tx: list[int] = []

    def irq(self, level: bool) -> None:
        assert level != self.level, "irq called without a level change"
        self.level = level
        self.irq_calls += 1


def make_uart(state: UartState | None = None) -> tuple[Uart16550, Wires]:
    wires = Wires()
    uart = Uart16550(wires.irq, wires.tx.append, state)
    wires.level = uart.irq_pending
    return uart, wires


def modem_inputs(mcr: int) -> int:
    """MSR bits 7:4 expected for ``mcr``: the loopback wiring, else DCD|DSR (bhyve)."""
    if not mcr & MCR_LOOP:
        return 0xA0
    wiring = {MCR_RTS: 0x10, MCR_DTR: 0x20, MCR_OUT1: 0x40, MCR_OUT2: 0x80}
    return sum(msr_bit for mcr_bit, msr_bit in wiring.items() if mcr & mcr_bit)


class Shadow:
    """The registers as the guest should see them, tracked from the traffic alone."""

    def __init__(self) -> None:
        self.lcr = self.ier = self.mcr = self.scr = self.dlh = self.deltas = 0
        self.dll = 1
        self.fifo_enabled = False
        self.trigger = 1
        self.fifo: deque[int] = deque()
        self.thre = self.timeout = self.overrun = False

    def capacity(self) -> int:
        return 16 if self.fifo_enabled else 1

    def room(self) -> int:
        return 0 if self.mcr & MCR_LOOP else self.capacity() - len(self.fifo)

    def interrupt_id(self) -> int:
        """IIR bits 3:0, in the 16550A's priority order."""
        if self.ier & IER_ELSI and self.overrun:
            return 0x06
        if self.ier & IER_ERBFI and self.fifo:
            if not self.fifo_enabled or len(self.fifo) >= self.trigger:
                return 0x04
            if self.timeout:
                return 0x0C
        if self.ier & IER_ETBEI and self.thre:
            return 0x02
        if self.ier & IER_EDSSI and self.deltas:
            return 0x00
        return 0x01

    def write(self, offset: int, value: int) -> list[int]:
        """Apply a register write; return the bytes it should transmit."""
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR and dlab:
            self.dll = value
        elif offset == IER and dlab:
            self.dlh = value
        elif offset == RBR_THR:
            self.thre = bool(self.ier & IER_ETBEI)
            if not self.mcr & MCR_LOOP:
                return [value]
            if len(self.fifo) < self.capacity():
                self.fifo.append(value)
            else:
                self.overrun = True
                if not self.fifo_enabled:
                    self.fifo[0] = value  # 16450 mode overwrites the unread byte
            self.timeout = self.fifo_enabled
        elif offset == IER:
            if (self.ier ^ value) & IER_ETBEI:
                self.thre = bool(value & IER_ETBEI)
            self.ier = value & 0x0F
        elif offset == IIR_FCR:
            enable = bool(value & FCR_ENABLE)
            if enable != self.fifo_enabled or (enable and value & FCR_RX_RESET):
                self.fifo.clear()
                self.timeout = False
            self.fifo_enabled = enable
            if enable:
                self.trigger = TRIGGERS[value & 0xC0]
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            old, new = modem_inputs(self.mcr), modem_inputs(value)
            changed = (old ^ new) & 0xB0 | old & ~new & 0x40
            self.deltas |= changed >> 4
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        return []

    def read(self, offset: int) -> int:
        """Apply a register read; return the value it should give."""
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR and dlab:
            return self.dll
        if offset == IER and dlab:
            return self.dlh
        if offset == RBR_THR:
            if not self.fifo:
                return 0
            value = self.fifo.popleft()
            self.timeout = self.timeout and bool(self.fifo)
            return value
        if offset == IIR_FCR:
            interrupt_id = self.interrupt_id()
            if interrupt_id == 0x02:
                self.thre = False
            return (0xC0 if self.fifo_enabled else 0x00) | interrupt_id
        if offset == LSR:
            value = 0x60 | bool(self.fifo) * LSR_DR | self.overrun * LSR_OE
            self.overrun = False
            return value
        if offset == MSR:
            value = modem_inputs(self.mcr) | self.deltas
            self.deltas = 0
            return value
        return {IER: self.ier, LCR: self.lcr, MCR: self.mcr, SCR: self.scr}[offset]


def ignore(_: object) -> None:
    """A wire nobody listens to."""


class UartMachine(RuleBasedStateMachine):
    """Random guest register traffic and host input, checked against a shadow.

    The shadow predicts every value read and byte sent. A save/restore clone runs
    in lockstep with the original and must answer every access identically.
    """

    def __init__(self) -> None:
        super().__init__()
        self.uart, self.wires = make_uart()
        self.clone: tuple[Uart16550, Wires] | None = None
        self.shadow = Shadow()

    def devices(self) -> list[tuple[Uart16550, Wires]]:
        pairs = [(self.uart, self.wires)]
        if self.clone is not None:
            pairs.append(self.clone)
        return pairs

    def on_all(self, method: str, *args: object) -> tuple[Any, list[int]]:
        """Call ``method`` on every device; all must return and drive the same.

        Returns the result and the bytes transmitted during the call.
        """
        results = []
        for uart, wires in self.devices():
            sent, calls = len(wires.tx), wires.irq_calls
            value = getattr(uart, method)(*args)
            results.append((value, wires.tx[sent:], wires.level, wires.irq_calls - calls))
        assert all(result == results[0] for result in results)
        return results[0][0], results[0][1]

    def write_register(self, offset: int, value: int) -> None:
        _, sent = self.on_all("write", offset, value)
        assert sent == self.shadow.write(offset, value)

    @initialize(fifo=st.booleans(), trigger=st.sampled_from(sorted(TRIGGERS)), ier=IER_VALUES)
    def driver_setup(self, fifo: bool, trigger: int, ier: int) -> None:
        """Start where a guest driver would usually leave the chip, then go random."""
        self.write_register(LCR, 0x03)
        self.write_register(IIR_FCR, fifo * (FCR_ENABLE | FCR_RX_RESET) | trigger)
        self.write_register(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
        self.write_register(IER, ier)

    @rule(offset=st.integers(0, 7), value=st.integers(0, 255))
    def write(self, offset: int, value: int) -> None:
        self.write_register(offset, value)

    @rule(enable=st.booleans(), rx_reset=st.booleans(), trigger=st.sampled_from(sorted(TRIGGERS)))
    def program_fifo(self, enable: bool, rx_reset: bool, trigger: int) -> None:
        self.write_register(IIR_FCR, enable * FCR_ENABLE | rx_reset * FCR_RX_RESET | trigger)

    @rule(dlab=RARELY)
    def program_lcr(self, dlab: bool) -> None:
        self.write_register(LCR, dlab * LCR_DLAB | 0x03)

    @rule(value=IER_VALUES)
    def program_ier(self, value: int) -> None:
        self.write_register(IER, value)

    @rule(loop=RARELY, lines=st.integers(0, 0x0F))
    def program_mcr(self, loop: bool, lines: int) -> None:
        self.write_register(MCR, loop * MCR_LOOP | lines)

    @rule(value=st.integers(0, 255))
    def transmit(self, value: int) -> None:
        self.write_register(RBR_THR, value)

    @rule(lines=st.integers(0, 0x0F), data=st.binary(max_size=18))
    def loopback_session(self, lines: int, data: bytes) -> None:
        """Loop bytes back with some modem lines set, then leave loopback."""
        self.write_register(MCR, MCR_LOOP | lines)
        for value in data:
            self.write_register(RBR_THR, value)
        self.write_register(MCR, lines)

    def read_register(self, offset: int) -> int:
        value, _ = self.on_all("read", offset)
        assert value == self.shadow.read(offset)
        return int(value)

    @rule(offset=st.integers(0, 7))
    def read(self, offset: int) -> None:
        self.read_register(offset)

    @rule(count=st.integers(1, 17))
    def read_received(self, count: int) -> None:
        """Read RBR repeatedly, as a driver draining the FIFO does."""
        for _ in range(count):
            self.read_register(RBR_THR)

    @rule(reply=st.binary(max_size=3))
    def service_interrupt(self, reply: bytes) -> None:
        """Handle the source IIR reports, as an interrupt handler would."""
        source = self.read_register(IIR_FCR) & 0x0F
        if self.shadow.lcr & LCR_DLAB:
            return  # the data registers are hidden behind the divisor latch
        if source == 0x06:
            self.read_register(LSR)
        elif source in (0x04, 0x0C):
            while self.read_register(LSR) & LSR_DR:
                self.read_register(RBR_THR)
        elif source == 0x02:
            for value in reply:
                self.write_register(RBR_THR, value)
        elif source == 0x00:
            self.read_register(MSR)

    @rule(data=st.binary(max_size=20))
    def receive(self, data: bytes) -> None:
        room = self.shadow.room()
        assert self.uart.rx_room() == room
        accepted, _ = self.on_all("receive", data)
        assert accepted == min(room, len(data))
        self.shadow.fifo.extend(data[:accepted])
        self.shadow.timeout = self.shadow.timeout and not accepted

    @rule()
    def rx_idle(self) -> None:
        self.on_all("rx_idle")
        self.shadow.timeout = self.shadow.fifo_enabled and bool(self.shadow.fifo)

    @rule()
    def save_and_restore(self) -> None:
        fields = self.uart.state.to_fields()
        self.clone = make_uart(UartState.from_fields(fields))
        assert self.clone[0].state.to_fields() == fields
        assert self.clone[0].irq_pending == self.uart.irq_pending

    @rule()
    def continue_with_clone(self) -> None:
        if self.clone is not None:
            self.uart, self.wires = self.clone
            self.clone = None

    @rule()
    def reset(self) -> None:
        self.on_all("reset")
        self.shadow = Shadow()

    @invariant()
    def consistent(self) -> None:
        shadow = self.shadow
        for uart, wires in self.devices():
            state = uart.state
            assert len(state.rx_fifo) <= shadow.capacity()
            assert list(state.rx_fifo) == list(shadow.fifo)
            assert bool(state.lsr & LSR_DR) == bool(state.rx_fifo)
            assert state.lsr & LSR_THRE and state.lsr & LSR_TEMT
            assert wires.level == uart.irq_pending == (shadow.interrupt_id() != 0x01)
            # Peek at IIR through a copy, since reading it has side effects.
            peek = Uart16550(ignore, ignore, UartState.from_fields(state.to_fields()))
            assert peek.read(IIR_FCR) & 0x0F == shadow.interrupt_id()


TestUartMachine = UartMachine.TestCase
TestUartMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


# Example tests


def test_reset_values() -> None:
    uart, wires = make_uart()
    assert [uart.read(offset) for offset in range(8)] == [0, 0, 0x01, 0, 0, 0x60, 0xA0, 0]
    uart.write(LCR, LCR_DLAB)
    assert (uart.read(0), uart.read(1)) == (1, 0)
    assert not uart.irq_pending and wires.irq_calls == 0
    assert uart.rx_room() == 1


def test_reset_restores_power_on_state_and_drops_irq() -> None:
    uart, wires = make_uart()
    uart.write(IIR_FCR, FCR_ENABLE)
    uart.receive(b"abc")
    uart.write(IER, 0x0F)
    uart.write(SCR, 0x5A)
    assert wires.level
    uart.reset()
    assert uart.state == UartState()
    assert not wires.level


def test_divisor_latch() -> None:
    uart, wires = make_uart()
    uart.write(LCR, LCR_DLAB | 0x03)
    uart.write(0, 0x0C)
    uart.write(1, 0x00)
    assert (uart.read(0), uart.read(1), uart.read(LCR)) == (0x0C, 0x00, 0x83)
    assert wires.tx == [] and uart.state.ier == 0
    uart.write(LCR, 0x03)
    uart.write(IER, IER_ERBFI)
    assert uart.read(IER) == IER_ERBFI
    assert (uart.state.dll, uart.state.dlh) == (0x0C, 0x00)


def test_transmit_calls_tx() -> None:
    uart, wires = make_uart()
    for byte in b"hi\n":
        uart.write(RBR_THR, byte)
    assert wires.tx == list(b"hi\n")
    assert uart.read(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_loopback_echo_and_msr_mapping() -> None:
    uart, wires = make_uart()
    uart.write(MCR, MCR_LOOP)
    # Leaving the DSR|DCD of the non-loopback default sets their delta bits.
    assert uart.read(MSR) == 0x0A
    assert uart.read(MSR) == 0x00
    uart.write(MCR, MCR_LOOP | MCR_RTS | MCR_OUT2)
    assert uart.read(MSR) == 0x90 | 0x01 | 0x08  # CTS, DCD + DCTS, DDCD
    uart.write(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert uart.read(MSR) == 0x60 | 0x01 | 0x02 | 0x08  # DSR, RI; RI rose: no TERI
    uart.write(MCR, MCR_LOOP)
    assert uart.read(MSR) == 0x00 | 0x02 | 0x04  # DDSR, TERI (RI fell)
    assert uart.rx_room() == 0
    assert uart.receive(b"host") == 0
    uart.write(RBR_THR, 0x41)
    assert wires.tx == []
    assert uart.read(LSR) & LSR_DR
    assert uart.read(RBR_THR) == 0x41
    assert not uart.read(LSR) & LSR_DR
    uart.write(MCR, 0)
    assert uart.read(MSR) == 0xA0 | 0x02 | 0x08


def test_modem_status_interrupt() -> None:
    uart, wires = make_uart()
    uart.write(IER, IER_EDSSI)
    assert not wires.level
    uart.write(MCR, MCR_LOOP | MCR_RTS)
    assert wires.level and uart.read(IIR_FCR) == 0x00
    uart.read(MSR)
    assert not wires.level and uart.read(IIR_FCR) == 0x01


def test_out2_pin() -> None:
    uart, _ = make_uart()
    assert not uart.out2
    uart.write(MCR, MCR_OUT2)
    assert uart.out2
    uart.write(MCR, MCR_OUT2 | MCR_LOOP)
    assert not uart.out2  # output pins are forced inactive in loopback


def test_interrupt_line_ignores_out2() -> None:
    uart, wires = make_uart()
    uart.write(IER, IER_ETBEI)
    assert wires.level and not uart.out2


def test_loopback_overrun_in_16450_mode() -> None:
    uart, wires = make_uart()
    uart.write(MCR, MCR_LOOP)
    uart.write(IER, IER_ELSI | IER_ERBFI)
    uart.write(RBR_THR, 1)
    assert uart.read(IIR_FCR) == 0x04
    uart.write(RBR_THR, 2)
    assert wires.level and uart.read(IIR_FCR) == 0x06
    assert uart.read(LSR) & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert not uart.read(LSR) & LSR_OE
    assert uart.read(IIR_FCR) == 0x04
    assert uart.read(RBR_THR) == 2  # the unread byte was overwritten
    assert not wires.level


def test_loopback_overrun_with_fifo() -> None:
    uart, _ = make_uart()
    uart.write(IIR_FCR, FCR_ENABLE)
    uart.write(MCR, MCR_LOOP)
    for byte in range(17):
        uart.write(RBR_THR, byte)
    assert uart.read(LSR) & LSR_OE
    assert [uart.read(RBR_THR) for _ in range(16)] == list(range(16))
    assert not uart.read(LSR) & (LSR_OE | LSR_DR)


def test_thre_interrupt_on_enable_cleared_by_iir_read() -> None:
    uart, wires = make_uart()
    uart.write(IER, IER_ETBEI)
    assert wires.level and wires.irq_calls == 1
    assert uart.read(IIR_FCR) == 0x02
    assert not wires.level
    assert uart.read(IIR_FCR) == 0x01
    uart.write(RBR_THR, ord("x"))  # the byte leaves at once: THR is empty again
    assert wires.level and uart.read(IIR_FCR) == 0x02
    assert not wires.level
    uart.write(IER, 0)
    uart.write(IER, IER_ETBEI)  # a fresh 0->1 edge raises it again
    assert wires.level


def test_thre_reasserts_on_ier_toggle_as_linux_probes() -> None:
    uart, _ = make_uart()
    uart.write(IER, IER_ETBEI)
    assert uart.read(IIR_FCR) == 0x02
    uart.write(IER, IER_ETBEI)  # no 0->1 edge: stays cleared
    assert uart.read(IIR_FCR) == 0x01
    uart.write(IER, 0)
    uart.write(IER, IER_ETBEI)
    assert uart.read(LSR) & LSR_TEMT and uart.read(IIR_FCR) == 0x02  # not UART_BUG_THRE


def test_thre_stays_pending_across_thr_writes() -> None:
    uart, wires = make_uart()
    uart.write(IER, IER_ETBEI)
    calls = wires.irq_calls
    for byte in b"burst":
        uart.write(RBR_THR, byte)
    assert wires.level and wires.irq_calls == calls


def test_thre_not_lost_behind_higher_priority_source() -> None:
    uart, wires = make_uart()
    uart.write(IER, IER_ERBFI | IER_ETBEI)
    uart.receive(b"a")
    assert uart.read(IIR_FCR) == 0x04  # RX outranks THRE; THRE stays latched
    uart.read(RBR_THR)
    assert wires.level and uart.read(IIR_FCR) == 0x02
    assert not wires.level


@pytest.mark.parametrize("trigger_bits,level", sorted(TRIGGERS.items()))
def test_fifo_trigger_levels(trigger_bits: int, level: int) -> None:
    uart, wires = make_uart()
    uart.write(IIR_FCR, FCR_ENABLE | trigger_bits)
    uart.write(IER, IER_ERBFI)
    below = bytes(level - 1)
    assert uart.receive(below) == len(below)
    assert not wires.level and uart.read(IIR_FCR) == 0xC1
    uart.rx_idle()
    if below:  # idle input with data under the trigger: character timeout
        assert wires.level and uart.read(IIR_FCR) == 0xCC
    assert uart.receive(b"\x01") == 1  # reaching the trigger level: data available
    assert wires.level and uart.read(IIR_FCR) == 0xC4
    uart.read(RBR_THR)
    assert not wires.level and uart.read(IIR_FCR) == 0xC1
    uart.rx_idle()
    if below:
        assert wires.level and uart.read(IIR_FCR) == 0xCC
    for _ in below:
        uart.read(RBR_THR)
    assert not wires.level and uart.read(IIR_FCR) == 0xC1
    assert not uart.read(LSR) & LSR_DR


def test_timeout_cleared_by_new_data_and_by_emptying_fifo() -> None:
    uart, wires = make_uart()
    uart.write(IIR_FCR, FCR_ENABLE | 0x80)  # trigger at 8
    uart.write(IER, IER_ERBFI)
    uart.receive(b"abc")
    uart.rx_idle()
    assert uart.read(IIR_FCR) == 0xCC
    uart.receive(b"d")  # new input restarts the character timer
    assert not wires.level
    uart.rx_idle()
    assert uart.read(RBR_THR) == ord("a")
    # The timer restarts on the read but, with no input, expires again at once.
    assert wires.level and uart.read(IIR_FCR) == 0xCC
    assert [uart.read(RBR_THR) for _ in range(3)] == list(b"bcd")
    assert not wires.level and not uart.state.timeout_pending


def test_rx_idle_without_fifo_or_data_does_nothing() -> None:
    uart, wires = make_uart()
    uart.write(IER, IER_ERBFI)
    uart.rx_idle()
    assert not uart.state.timeout_pending
    uart.receive(b"z")
    uart.rx_idle()  # 16450 mode has no timeout: data available is already 0x04
    assert not uart.state.timeout_pending and uart.read(IIR_FCR) == 0x04
    assert wires.level


def test_rx_room_respects_capacity() -> None:
    uart, _ = make_uart()
    assert uart.receive(b"xy") == 1
    assert uart.rx_room() == 0
    uart.write(IIR_FCR, FCR_ENABLE)  # switching mode clears the FIFO
    assert uart.rx_room() == 16
    assert uart.receive(bytes(range(20))) == 16
    assert uart.rx_room() == 0
    assert uart.read(RBR_THR) == 0
    assert uart.rx_room() == 1


def test_fifo_enable_and_reset() -> None:
    uart, _ = make_uart()
    assert uart.read(IIR_FCR) & 0xC0 == 0
    uart.write(IIR_FCR, FCR_ENABLE | 0xC0)
    assert uart.read(IIR_FCR) == 0xC1
    uart.receive(b"0123456789")
    uart.write(IIR_FCR, FCR_ENABLE | 0xC0)  # no reset bit, same mode: kept
    assert len(uart.state.rx_fifo) == 10
    uart.write(IIR_FCR, FCR_ENABLE | FCR_RX_RESET)
    assert not uart.state.rx_fifo and not uart.read(LSR) & LSR_DR
    uart.receive(b"ab")
    uart.write(IIR_FCR, FCR_RX_RESET)  # clearing ENABLE leaves FIFO mode and clears it
    assert uart.read(IIR_FCR) == 0x01
    assert not uart.state.rx_fifo and uart.state.fcr == 0


def test_reading_empty_rbr_returns_zero() -> None:
    uart, wires = make_uart()
    assert uart.read(RBR_THR) == 0
    assert wires.irq_calls == 0


def test_scratch_register() -> None:
    uart, _ = make_uart()
    for value in (0x00, 0x55, 0xAA, 0xFF):
        uart.write(SCR, value)
        assert uart.read(SCR) == value


def test_lsr_and_msr_writes_are_ignored() -> None:
    uart, _ = make_uart()
    uart.write(LSR, 0xFF)
    uart.write(MSR, 0xFF)
    assert (uart.read(LSR), uart.read(MSR)) == (0x60, 0xA0)


def test_restore_keeps_fifo_and_pending_interrupts() -> None:
    uart, _ = make_uart()
    uart.write(IIR_FCR, FCR_ENABLE | 0x40)
    uart.write(IER, IER_ERBFI | IER_ETBEI)
    uart.receive(b"xyz")
    uart.rx_idle()
    restored, wires = make_uart(UartState.from_fields(uart.state.to_fields()))
    assert wires.irq_calls == 0 and restored.irq_pending
    assert restored.read(IIR_FCR) == 0xCC
    assert [restored.read(RBR_THR) for _ in range(3)] == list(b"xyz")
    assert restored.read(IIR_FCR) == 0xC2
    assert not wires.level


def test_restore_with_dlab_set_maps_divisor_latch() -> None:
    uart, _ = make_uart()
    uart.write(LCR, LCR_DLAB)
    uart.write(0, 0x30)
    restored, _ = make_uart(UartState.from_fields(uart.state.to_fields()))
    assert restored.read(0) == 0x30


def test_to_fields_is_a_copy() -> None:
    uart, _ = make_uart()
    uart.receive(b"q")
    fields = uart.state.to_fields()
    uart.read(RBR_THR)
    assert fields["rx_fifo"] == b"q"


@pytest.mark.parametrize(
    "field,value",
    [
        ("ier", 0x10),
        ("ier", -1),
        ("lcr", 256),
        ("scr", True),
        ("dll", 1.0),
        ("mcr", 0x20),
        ("fcr", 0x02),
        ("fcr", 0x40),
        ("lsr", 0x00),
        ("lsr", 0x61),
        ("lsr", 0x70),
        ("msr", 0x00),
        ("thre_pending", 1),
        ("timeout_pending", True),
        ("rx_fifo", b"ab"),
        ("rx_fifo", "a"),
    ],
)
def test_from_fields_rejects_bad_values(field: str, value: object) -> None:
    fields: dict[str, Any] = UartState().to_fields()
    fields[field] = value
    with pytest.raises(ValueError, match=repr(field)):
        UartState.from_fields(fields)


def test_from_fields_rejects_missing_and_unknown_fields() -> None:
    fields = UartState().to_fields()
    del fields["scr"]
    with pytest.raises(ValueError, match="'scr'"):
        UartState.from_fields(fields)
    fields = UartState().to_fields() | {"rbr": 0}
    with pytest.raises(ValueError, match="'rbr'"):
        UartState.from_fields(fields)


def test_from_fields_accepts_a_full_fifo() -> None:
    fields = UartState().to_fields() | {
        "fcr": FCR_ENABLE,
        "lsr": 0x61,
        "rx_fifo": bytes(16),
        "timeout_pending": True,
    }
    assert UartState.from_fields(fields).to_fields() == fields
