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

# Flat GDTs: null, null, code at selector 0x10, data at 0x18 (Linux's __BOOT_CS/DS).
_BOOT_GDT = (0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
_BOOT_GDT_64 = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)

#: Identity-mapping page tables for long-mode entry: PML4, PDPT, then 4 page directories
#: of 2 MiB pages covering the first 4 GiB.
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
_PRESENT_WRITABLE = 0x3
_PAGE_SIZE_2M = 0x80


def _flat_segment(seg: Any, selector: int, type_: int, *, long_mode: bool = False) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = type_
    seg.present = 1
    seg.dpl = 0
    seg.db = 0 if long_mode else 1
    seg.s = 1
    seg.l = 1 if long_mode else 0
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


def _write_identity_map(memory: GuestMemory) -> None:
    memory.write(PML4_ADDR, (PDPT_ADDR | _PRESENT_WRITABLE).to_bytes(8, "little").ljust(4096, b"\0"))
    pdpt = b"".join(((PD_ADDR + 4096 * i) | _PRESENT_WRITABLE).to_bytes(8, "little")
                    for i in range(4))
    memory.write(PDPT_ADDR, pdpt.ljust(4096, b"\0"))
    pds = b"".join(((i << 21) | _PRESENT_WRITABLE | _PAGE_SIZE_2M).to_bytes(8, "little")
                   for i in range(4 * 512))
    memory.write(PD_ADDR, pds)


def enter_long_mode(vcpu: VcpuFd, memory: GuestMemory, entry: int, *, rsi: int = 0) -> None:
    """Start ``vcpu`` at ``entry`` in 64-bit mode, the first 4 GiB identity-mapped."""
    memory.write(BOOT_GDT_ADDR, b"".join(d.to_bytes(8, "little") for d in _BOOT_GDT_64))
    _write_identity_map(memory)
    sregs = vcpu.get_sregs()
    _flat_segment(sregs.cs, 0x10, 0xB, long_mode=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat_segment(seg, 0x18, 0x3)
    sregs.gdt.base = BOOT_GDT_ADDR
    sregs.gdt.limit = len(_BOOT_GDT_64) * 8 - 1
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rdi", "rsp", "rbp"):
        setattr(regs, name, 0)
    regs.rsi = rsi
    regs.rip = entry
    regs.rflags = 0x2
    vcpu.set_regs(regs)
