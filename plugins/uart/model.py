# SPDX-License-Identifier: BSD-2-Clause
"""The 16550A UART register file, independent of any bus, IRQ number or host backend.

The device state is a plain record (:class:`UartState`) that can be saved and restored
exactly; the behaviour lives in :class:`Uart16550`, which talks to the outside through
two callables: ``irq(level)`` for the chip's INTR output and ``tx(byte)`` for each
transmitted byte. Host input enters through :meth:`Uart16550.receive`.

The model follows the real 16550A where bhyve's ``uart_emul.c`` does not:

* IIR reports "received data available" (0x04) at or above the FIFO trigger level and
  the character timeout (0x0C) only below it; bhyve reports 0x0C for any data.
* FCR trigger levels (1/4/8/14) take effect; bhyve stores and ignores them.
* With the FIFO disabled (16450 mode) the receive buffer holds one byte, and a looped
  back byte that arrives before the guest read the previous one overwrites it (and sets
  OE); bhyve drops the new byte instead.
* ``irq`` is called only when INTR changes level; bhyve pulses the ISA IRQ on every
  register access while any source is pending.
* MCR.OUT2 is reported through :attr:`Uart16550.out2` for the bus to gate with; bhyve
  ignores it.

Kept from bhyve: outside loopback MSR reads DCD|DSR (0xA0) and no CTS/RI, so a guest
that opens the tty never waits for carrier; transmission is instantaneous (no TX FIFO,
THR and the shift register are always empty); an RBR read of an empty buffer returns 0
(bhyve returns 0xFF, a real 16450 the stale byte).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

# Register offsets (DLAB=1 turns 0 and 1 into DLL and DLM).
RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_ERBFI = 0x01  # received data available (and character timeout)
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F

IIR_MODEM = 0x00
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_RX_RESET = 0x02
FCR_TX_RESET = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER = 0xC0
FCR_STORED = FCR_ENABLE | FCR_DMA_MODE | FCR_TRIGGER
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # indexed by FCR bits 7:6

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_TX_IDLE = LSR_THRE | LSR_TEMT

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_STATUS = 0xF0

FIFO_SIZE = 16
DEFAULT_DIVISOR = 1  # 1843200 Hz / 16 / 115200 baud; the divisor never affects timing


def modem_status(mcr: int) -> int:
    """MSR status bits (7:4) for a given MCR.

    In loopback the outputs feed the inputs: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
    Otherwise no modem is attached and, as in bhyve, DCD and DSR read as asserted.
    """
    if mcr & MCR_LOOP:
        return (mcr & MCR_RTS) << 3 | (mcr & MCR_DTR) << 5 | (mcr & (MCR_OUT1 | MCR_OUT2)) << 4
    return MSR_DCD | MSR_DSR


_MODEM_STATUS = tuple(modem_status(mcr) for mcr in range(MCR_MASK + 1))

FieldValue = int | bool | bytes
_BYTE_FIELDS = ("ier", "lcr", "mcr", "lsr", "msr", "fcr", "scr", "dll", "dlh")
_FLAG_FIELDS = ("thre_pending", "timeout_pending")
_FIELDS = (*_BYTE_FIELDS, *_FLAG_FIELDS, "rx_fifo")


@attrs.define(slots=True)
class UartState:
    """Everything a 16550A holds, as after a hardware reset by default.

    ``lsr`` keeps DR and OE (THRE and TEMT are always set); ``msr`` keeps the status
    bits derived from ``mcr`` plus the delta bits not yet read. ``fcr`` is the last
    value written with the enable bit set (0 while the FIFO is off); ``thre_pending``
    is the THRE interrupt latch (only meaningful while IER.ETBEI is set);
    ``timeout_pending`` means the receive line has gone idle with data in the FIFO
    (see :meth:`Uart16550.rx_idle`). ``rx_fifo`` holds received bytes, oldest first.
    """

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    lsr: int = LSR_TX_IDLE
    msr: int = _MODEM_STATUS[0]
    fcr: int = 0
    scr: int = 0
    dll: int = DEFAULT_DIVISOR & 0xFF
    dlh: int = DEFAULT_DIVISOR >> 8
    thre_pending: bool = False
    timeout_pending: bool = False
    rx_fifo: bytearray = attrs.field(factory=bytearray)

    def to_fields(self) -> dict[str, FieldValue]:
        """A self-contained copy of the state (the FIFO as ``bytes``)."""
        return {
            "ier": self.ier,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "lsr": self.lsr,
            "msr": self.msr,
            "fcr": self.fcr,
            "scr": self.scr,
            "dll": self.dll,
            "dlh": self.dlh,
            "thre_pending": self.thre_pending,
            "timeout_pending": self.timeout_pending,
            "rx_fifo": bytes(self.rx_fifo),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, FieldValue]) -> UartState:
        """Rebuild a state from :meth:`to_fields` output.

        Raises ``ValueError`` naming the offending field for a missing or unknown
        field, a wrong type, an out-of-range value, or a combination the chip cannot
        reach (so a restored device never starts from an impossible state).
        """
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown UART state field {unknown[0]!r}")
        for name in _FIELDS:
            if name not in fields:
                raise ValueError(f"UART state field {name!r} is missing")
        rx_fifo = fields["rx_fifo"]
        if not isinstance(rx_fifo, bytes | bytearray):
            raise ValueError("UART state field 'rx_fifo' must be bytes")
        state = cls(rx_fifo=bytearray(rx_fifo))
        for name in _BYTE_FIELDS:
            value = fields[name]
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise ValueError(f"UART state field {name!r} must be a byte, got {value!r}")
            setattr(state, name, value)
        for name in _FLAG_FIELDS:
            if type(fields[name]) is not bool:
                raise ValueError(f"UART state field {name!r} must be a bool")
            setattr(state, name, fields[name])
        state._check_consistency()
        return state

    def _check_consistency(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"UART state field {name!r} {why}")

        if self.ier & ~IER_MASK:
            raise bad("ier", "has bits above bit 3 set")
        if self.mcr & ~MCR_MASK:
            raise bad("mcr", "has bits above bit 4 set")
        if self.fcr & ~FCR_STORED or (self.fcr and not self.fcr & FCR_ENABLE):
            raise bad("fcr", f"holds an impossible value {self.fcr:#04x}")
        fifo_enabled = bool(self.fcr & FCR_ENABLE)
        if len(self.rx_fifo) > (FIFO_SIZE if fifo_enabled else 1):
            raise bad("rx_fifo", f"holds {len(self.rx_fifo)} bytes, more than fit")
        if self.lsr & ~(LSR_TX_IDLE | LSR_DR | LSR_OE) or ~self.lsr & LSR_TX_IDLE:
            raise bad("lsr", f"holds an impossible value {self.lsr:#04x}")
        if bool(self.lsr & LSR_DR) != bool(self.rx_fifo):
            raise bad("lsr", "data-ready bit disagrees with the receive FIFO")
        if self.msr & MSR_STATUS != _MODEM_STATUS[self.mcr]:
            raise bad("msr", "status bits disagree with the modem control register")
        if self.timeout_pending and not (fifo_enabled and self.rx_fifo):
            raise bad("timeout_pending", "is set without data in an enabled FIFO")


class Uart16550:
    """A 16550A: byte-wide register reads and writes at offsets 0-7, host receive.

    ``irq(level)`` is called only when the INTR output changes. INTR is the chip's
    "some enabled source pending" and ignores MCR.OUT2: on a PC, OUT2 gates the ISA
    IRQ outside the chip, so a bus that wants that gating drives its line with
    ``irq_pending and out2`` and re-evaluates it on each ``irq`` call and after each
    MCR write (offset 4). A PCI UART can use ``irq`` directly. In loopback the
    chip's interrupts keep working (INTR follows its sources as usual); only the
    OUT2 pin is forced off, which is what disconnects a PC's IRQ then.

    ``tx(byte)`` is called for each byte the guest transmits outside loopback.
    Transmission is instantaneous, so THR is empty again straight after a write: the
    THRE interrupt is cleared by the write and re-raised at once, which INTR shows as
    staying pending (no pulse). Drivers that read IIR until "none pending" see the
    same sequence as on hardware.

    Constructing from a restored ``state`` does not call ``irq``: the interrupt
    controller's own restored state already holds the line level; :attr:`irq_pending`
    gives it if needed.
    """

    __slots__ = ("_banks", "_irq", "_irq_level", "_reads", "_state", "_tx", "_writes")

    def __init__(
        self,
        irq: Callable[[bool], None],
        tx: Callable[[int], None],
        state: UartState | None = None,
    ) -> None:
        self._state = state if state is not None else UartState()
        self._irq = irq
        self._tx = tx
        reads = (
            self._read_rbr,
            self._read_ier,
            self._read_iir,
            self._read_lcr,
            self._read_mcr,
            self._read_lsr,
            self._read_msr,
            self._read_scr,
        )
        writes = (
            self._write_thr,
            self._write_ier,
            self._write_fcr,
            self._write_lcr,
            self._write_mcr,
            self._ignore_write,  # LSR: factory test only
            self._ignore_write,  # MSR: read-only
            self._write_scr,
        )
        dlab_reads = (self._read_dll, self._read_dlh, *reads[2:])
        dlab_writes = (self._write_dll, self._write_dlh, *writes[2:])
        self._banks = ((reads, writes), (dlab_reads, dlab_writes))
        self._reads, self._writes = self._banks[self._state.lcr >> 7]
        self._irq_level = self._interrupt_id() != IIR_NONE

    @property
    def state(self) -> UartState:
        """The live state record (save it with ``state.to_fields()``)."""
        return self._state

    @property
    def irq_pending(self) -> bool:
        """The INTR output: some enabled interrupt source is pending."""
        return self._irq_level

    @property
    def out2(self) -> bool:
        """The OUT2 output pin, which PC serial ports use to gate the IRQ.

        In loopback the chip forces its modem-control output pins inactive, so OUT2
        is off then; a PC-style bus thereby disconnects the IRQ during loopback.
        """
        mcr = self._state.mcr
        return bool(mcr & MCR_OUT2) and not mcr & MCR_LOOP

    def read(self, offset: int) -> int:
        """Read the register at ``offset`` (0-7)."""
        return self._reads[offset]()

    def write(self, offset: int, value: int) -> None:
        """Write the byte ``value`` (0-255) to the register at ``offset`` (0-7)."""
        self._writes[offset](value)

    def reset(self) -> None:
        """Return to the power-on state (the FIFO contents are lost)."""
        self._state = UartState()
        self._reads, self._writes = self._banks[0]
        self._update_irq()

    def rx_room(self) -> int:
        """How many host bytes :meth:`receive` accepts now (0 in loopback)."""
        state = self._state
        if state.mcr & MCR_LOOP:
            return 0
        capacity = FIFO_SIZE if state.fcr & FCR_ENABLE else 1
        return capacity - len(state.rx_fifo)

    def receive(self, data: bytes) -> int:
        """Queue as many of the host bytes ``data`` as fit; return how many did.

        A backend that never offers more than :meth:`rx_room` loses nothing. New data
        restarts the character timer, so the timeout indication is cleared until the
        backend calls :meth:`rx_idle` again.
        """
        count = min(self.rx_room(), len(data))
        if count:
            state = self._state
            state.rx_fifo += data[:count]
            state.lsr |= LSR_DR
            state.timeout_pending = False
            self._update_irq()
        return count

    def rx_idle(self) -> None:
        """Tell the chip that no more host input is immediately pending.

        A real 16550A raises the character timeout when the FIFO holds data and for
        4 character times nothing arrived and nothing was read. This model keeps no
        clock and its character time is zero (transmission is instantaneous), so the
        4 character times have passed as soon as the input goes idle: the backend
        says so by calling this after draining host input. From then on, while the
        FIFO is enabled and holds data below the trigger level, IIR shows 0x0C (with
        IER.ERBFI set; at or above the trigger it shows 0x04 as usual). An
        RBR read restarts the chip's timer, which with no new input expires again at
        once, so the indication lasts until the FIFO is empty or new input arrives;
        a guest that reads fewer bytes than are queued is interrupted again rather
        than left with stranded data.
        """
        state = self._state
        if state.fcr & FCR_ENABLE and state.rx_fifo and not state.timeout_pending:
            state.timeout_pending = True
            self._update_irq()

    # Interrupts

    def _interrupt_id(self) -> int:
        """IIR bits 3:0 for the highest-priority enabled pending source."""
        state = self._state
        ier = state.ier
        if ier & IER_ELSI and state.lsr & LSR_OE:
            return IIR_RLS
        if ier & IER_ERBFI and state.rx_fifo:
            fcr = state.fcr
            if not fcr & FCR_ENABLE or len(state.rx_fifo) >= RX_TRIGGER_LEVELS[fcr >> 6]:
                return IIR_RDA
            if state.timeout_pending:
                return IIR_TIMEOUT
        if ier & IER_ETBEI and state.thre_pending:
            return IIR_THRE
        if ier & IER_EDSSI and state.msr & MSR_DELTAS:
            return IIR_MODEM
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NONE
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    # Register reads

    def _read_rbr(self) -> int:
        state = self._state
        fifo = state.rx_fifo
        if not fifo:
            return 0
        value = fifo.pop(0)
        if not fifo:
            state.lsr &= ~LSR_DR
            state.timeout_pending = False
        self._update_irq()
        return value

    def _read_ier(self) -> int:
        return self._state.ier

    def _read_iir(self) -> int:
        state = self._state
        interrupt_id = self._interrupt_id()
        if interrupt_id == IIR_THRE:
            state.thre_pending = False
            self._update_irq()
        if state.fcr & FCR_ENABLE:
            return IIR_FIFO_ENABLED | interrupt_id
        return interrupt_id

    def _read_lcr(self) -> int:
        return self._state.lcr

    def _read_mcr(self) -> int:
        return self._state.mcr

    def _read_lsr(self) -> int:
        state = self._state
        value = state.lsr
        if value & LSR_OE:
            state.lsr = value & ~LSR_OE
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        state = self._state
        value = state.msr
        if value & MSR_DELTAS:
            state.msr = value & MSR_STATUS
            self._update_irq()
        return value

    def _read_scr(self) -> int:
        return self._state.scr

    def _read_dll(self) -> int:
        return self._state.dll

    def _read_dlh(self) -> int:
        return self._state.dlh

    # Register writes

    def _write_thr(self, value: int) -> None:
        state = self._state
        if state.mcr & MCR_LOOP:
            self._loop_back(value)
        else:
            self._tx(value)
        if state.ier & IER_ETBEI:
            state.thre_pending = True
        self._update_irq()

    def _loop_back(self, value: int) -> None:
        """Receive a transmitted byte through the internal loopback path.

        With no other input source in loopback, the line is idle straight after the
        byte, so the character timeout is armed at once (see :meth:`rx_idle`).
        """
        state = self._state
        fifo = state.rx_fifo
        if state.fcr & FCR_ENABLE:
            if len(fifo) < FIFO_SIZE:
                fifo.append(value)
            else:  # overrun: the new byte never leaves the shift register
                state.lsr |= LSR_OE
            state.timeout_pending = True
        elif fifo:  # 16450 mode: the unread byte in RBR is overwritten
            fifo[0] = value
            state.lsr |= LSR_OE
        else:
            fifo.append(value)
        state.lsr |= LSR_DR

    def _write_ier(self, value: int) -> None:
        state = self._state
        value &= IER_MASK
        if (state.ier ^ value) & IER_ETBEI:
            # Enabling ETBEI while THR is empty (always, here) raises THRE at once;
            # disabling it drops the latch, which re-enabling would set anyway.
            state.thre_pending = bool(value & IER_ETBEI)
        state.ier = value
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        state = self._state
        enable = value & FCR_ENABLE
        if enable != state.fcr & FCR_ENABLE or (enable and value & FCR_RX_RESET):
            # Switching between FIFO and 16450 mode clears the FIFOs, as does RX reset.
            # There is no TX FIFO to reset.
            state.rx_fifo.clear()
            state.lsr &= ~LSR_DR
            state.timeout_pending = False
        # The other bits are only programmed together with the enable bit.
        state.fcr = value & FCR_STORED if enable else 0
        self._update_irq()

    def _write_lcr(self, value: int) -> None:
        self._state.lcr = value
        self._reads, self._writes = self._banks[value >> 7]

    def _write_mcr(self, value: int) -> None:
        state = self._state
        value &= MCR_MASK
        state.mcr = value
        old = state.msr
        status = _MODEM_STATUS[value]
        changed = (old ^ status) & (MSR_CTS | MSR_DSR | MSR_DCD)
        ri_trailing_edge = old & ~status & MSR_RI
        state.msr = status | old & MSR_DELTAS | (changed | ri_trailing_edge) >> 4
        self._update_irq()

    def _write_scr(self, value: int) -> None:
        self._state.scr = value

    def _write_dll(self, value: int) -> None:
        self._state.dll = value

    def _write_dlh(self, value: int) -> None:
        self._state.dlh = value

    def _ignore_write(self, value: int) -> None:
        pass
