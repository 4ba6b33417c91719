# SPDX-License-Identifier: BSD-2-Clause
"""Initial x86 vCPU states that boot protocols ask for."""

from __future__ import annotations

from typing import Any

from hvf.kvm import VcpuFd
from hvf.memory import GuestMemory

#: Where the boot GDT is written (conventional memory, below any boot-info area).
BOOT_GDT_ADDR = 0x500
CR0_PE = 1 << 0
CR0_ET = 1 << 4

# A flat GDT: null, null, 32-bit code (0x10), 32-bit data (0x18).
_BOOT_GDT = (0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)


def _flat_segment(seg: Any, selector: int, type_: int) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = type_
    seg.present = 1
    seg.dpl = 0
    seg.db = 1
    seg.s = 1
    seg.l = 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def enter_protected_mode(
    vcpu: VcpuFd, memory: GuestMemory, entry: int, *, eax: int = 0, ebx: int = 0
) -> None:
    """Start ``vcpu`` at ``entry`` in flat 32-bit protected mode, paging off, IF clear."""
    memory.write(BOOT_GDT_ADDR, b"".join(d.to_bytes(8, "little") for d in _BOOT_GDT))
    sregs = vcpu.get_sregs()
    _flat_segment(sregs.cs, 0x10, 0xB)  # execute/read, accessed
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat_segment(seg, 0x18, 0x3)  # read/write, accessed
    sregs.gdt.base = BOOT_GDT_ADDR
    sregs.gdt.limit = len(_BOOT_GDT) * 8 - 1
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"):
        setattr(regs, name, 0)
    regs.rax = eax
    regs.rbx = ebx
    regs.rip = entry
    regs.rflags = 0x2
    vcpu.set_regs(regs)
