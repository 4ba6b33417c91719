# SPDX-License-Identifier: BSD-2-Clause
"""The guest as the gdb stub sees it: linear memory, breakpoints and debug registers.

Addresses are linear ones, translated page by page through a vCPU's page tables
(``KVM_TRANSLATE``, which knows every paging mode); only guest RAM is reachable, so a
debugger's address never reaches anything else. Software breakpoints patch ``int3``
into RAM and are hidden from reads; writes under one change the byte it restores.
While the machine is paused (for a snapshot) the ``int3`` bytes are lifted out of RAM
(:meth:`GuestDebug.lift`), so that no snapshot keeps them. Hardware breakpoints and
watchpoints take the four debug registers (DR7 global enables), given to KVM with
``KVM_GUESTDBG_USE_HW_BP``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import attrs

from hvf._kvm import lib
from hvf.gdbstub_protocol import Breakpoint, PacketError

if TYPE_CHECKING:
    from hvf.kvm import VcpuFd
    from hvf.memory import GuestMemory

PAGE = 4096
INT3 = 0xCC
EFAULT, ENOSPC = 0x0E, 0x1C
EXECUTE, WRITE, READ, ACCESS = 1, 2, 3, 4  # Z1..Z4
#: DR7 R/W bits of each kind, and the DR7 LEN code of each watched length.
_DR7_RW = {EXECUTE: 0b00, WRITE: 0b01, ACCESS: 0b11}
_DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_STOP_REASON = {EXECUTE: "hwbreak:", WRITE: "watch:{:x}", ACCESS: "awatch:{:x}"}


@attrs.define
class SoftwareBreakpoint:
    gpa: int
    original: int


@attrs.frozen
class HardwareBreakpoint:
    kind: int
    address: int
    length: int


class GuestDebug:
    """Memory access and breakpoints for one machine's debugger."""

    def __init__(self, memory: GuestMemory, block_irq: bool) -> None:
        self.memory = memory
        self.block_irq = block_irq  # KVM can keep interrupts off while stepping
        #: By linear address.
        self.software: dict[int, SoftwareBreakpoint] = {}
        self.hardware: list[HardwareBreakpoint | None] = [None] * 4
        self._lock = threading.Lock()  # the stub's thread and pause/resume
        self._lifted = False

    # ---- memory ----

    def pieces(self, fd: VcpuFd, address: int, length: int) -> list[tuple[int, int, int]]:
        """(linear, guest-physical, length) per page of the range, through the page
        tables of ``fd``'s vCPU, up to the first page that is not mapped to guest RAM."""
        pieces = []
        length = min(length, (1 << 64) - address)
        while length:
            n = min(length, PAGE - address % PAGE)
            gpa = fd.translate(address)
            if gpa is None or not self.memory.contains(gpa, n):
                break
            pieces.append((address, gpa, n))
            address += n
            length -= n
        return pieces

    def byte_at(self, fd: VcpuFd, linear: int) -> int | None:
        """The byte in RAM at ``linear`` (an ``int3`` of the stub's included)."""
        pieces = self.pieces(fd, linear, 1)
        return self.memory.read(pieces[0][1], 1)[0] if pieces else None

    def read(self, fd: VcpuFd, address: int, length: int) -> bytes:
        """Guest memory as the guest would see it, the stub's ``int3`` bytes hidden; it
        ends early at the first page that is not RAM."""
        data = bytearray()
        for linear, gpa, n in self.pieces(fd, address, length):
            chunk = bytearray(self.memory.read(gpa, n))
            for i in range(n):
                bp = self.software.get(linear + i)
                if bp is not None:
                    chunk[i] = bp.original
            data += chunk
        if length and not data:
            raise PacketError(f"no guest RAM at {address:#x}", EFAULT)
        return bytes(data)

    def write(self, fd: VcpuFd, address: int, data: bytes) -> None:
        pieces = self.pieces(fd, address, len(data))
        if sum(n for _, _, n in pieces) != len(data):
            raise PacketError(f"no guest RAM for all of {address:#x}+{len(data):#x}", EFAULT)
        at = 0
        with self._lock:
            for linear, gpa, n in pieces:
                chunk = bytearray(data[at : at + n])
                for i in range(n):
                    bp = self.software.get(linear + i)
                    if bp is not None:
                        bp.original = chunk[i]
                        chunk[i] = chunk[i] if self._lifted else INT3
                self.memory.write(gpa, chunk)
                at += n

    # ---- breakpoints ----

    def change(self, fd: VcpuFd, cmd: Breakpoint) -> bytes:
        """``Z``/``z``: the reply (empty for a kind x86 cannot do)."""
        if cmd.kind == 0:
            if cmd.insert:
                self._insert_software(fd, cmd.address)
            else:
                self._remove_software(cmd.address)
            return b"OK"
        if cmd.kind == READ:
            return b""  # the debug registers cannot watch reads alone
        length = 1 if cmd.kind == EXECUTE else cmd.length
        if length not in _DR7_LEN or cmd.address % length:
            raise PacketError(f"cannot watch {cmd.length} bytes at {cmd.address:#x}")
        hw = HardwareBreakpoint(cmd.kind, cmd.address, length)
        if cmd.insert and hw not in self.hardware:
            if None not in self.hardware:
                raise PacketError("all four debug registers are in use", ENOSPC)
            self.hardware[self.hardware.index(None)] = hw
        elif not cmd.insert and hw in self.hardware:
            self.hardware[self.hardware.index(hw)] = None
        return b"OK"

    def _insert_software(self, fd: VcpuFd, address: int) -> None:
        pieces = self.pieces(fd, address, 1)
        if not pieces:
            raise PacketError(f"no guest RAM at {address:#x}", EFAULT)
        with self._lock:
            if address not in self.software:
                bp = SoftwareBreakpoint(pieces[0][1], 0)
                self.software[address] = bp
                self._plant(bp)

    def _remove_software(self, address: int) -> None:
        with self._lock:
            bp = self.software.pop(address, None)
            if bp is not None:
                self._unplant(bp)

    def _plant(self, bp: SoftwareBreakpoint) -> None:
        alias = next((o for o in self.software.values() if o is not bp and o.gpa == bp.gpa),
                     None)  # another linear address of the same byte
        bp.original = self.memory.read(bp.gpa, 1)[0] if alias is None else alias.original
        if not self._lifted:
            self.memory.write(bp.gpa, bytes((INT3,)))

    def _unplant(self, bp: SoftwareBreakpoint) -> None:
        if self._lifted or any(o.gpa == bp.gpa for o in self.software.values()):
            return
        if self.memory.read(bp.gpa, 1)[0] == INT3:  # unless the guest wrote it since
            self.memory.write(bp.gpa, bytes((bp.original,)))

    def lift(self) -> None:
        """Take every ``int3`` out of RAM until :meth:`plant` (the machine is paused)."""
        with self._lock:
            for bp in self.software.values():
                if self.memory.read(bp.gpa, 1)[0] == INT3:
                    self.memory.write(bp.gpa, bytes((bp.original,)))
            self._lifted = True

    def plant(self) -> None:
        with self._lock:
            self._lifted = False
            for bp in self.software.values():
                bp.original = self.memory.read(bp.gpa, 1)[0]
                self.memory.write(bp.gpa, bytes((INT3,)))

    def remove_all(self) -> None:
        for address in list(self.software):
            self._remove_software(address)
        self.hardware = [None] * 4

    def stop_reason(self, dr6: int) -> str | None:
        """The stop reason of a #DB exit that a hardware breakpoint caused, else None."""
        for slot, hw in enumerate(self.hardware):
            if hw is not None and dr6 & (1 << slot):
                return _STOP_REASON[hw.kind].format(hw.address)
        return None

    # ---- KVM_SET_GUEST_DEBUG ----

    def control(self, step: bool) -> int:
        """The KVM_GUESTDBG_* flags for a vCPU (stepping or not)."""
        control = lib.KVM_GUESTDBG_ENABLE
        if self.software:
            control |= lib.KVM_GUESTDBG_USE_SW_BP
        if any(self.hardware):
            control |= lib.KVM_GUESTDBG_USE_HW_BP
        if step:
            control |= lib.KVM_GUESTDBG_SINGLESTEP
            if self.block_irq:
                control |= lib.KVM_GUESTDBG_BLOCKIRQ
        return control

    def debugreg(self) -> list[int]:
        """DR0-DR3 and DR7 (at index 7) for the hardware breakpoints."""
        regs = [0] * 8
        for slot, hw in enumerate(self.hardware):
            if hw is not None:
                regs[slot] = hw.address
                regs[7] |= (2 << (2 * slot) | _DR7_RW[hw.kind] << (16 + 4 * slot)
                            | _DR7_LEN[hw.length] << (18 + 4 * slot))
        return regs
