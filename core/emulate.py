# SPDX-License-Identifier: BSD-2-Clause
"""Finishing, in user space, instructions KVM's emulator gave up on.

On hosts where KVM emulates much of the guest's kernel code (``kvm_pvm``), its
instruction emulator fails on a few instructions that hardware would simply run. Where
the instruction's effect can be reproduced soundly against guest memory and the vCPU's
registers, hvf does so and the guest carries on:

- ``int3``: the #BP trap is injected, with RIP after the instruction as the CPU would.
- ``lock cmpxchg16b m128`` (and ``cmpxchg8b m64``): compare-and-exchange on guest memory,
  with the other vCPUs held still so that it stays atomic.

Anything else is left alone, and the VM stops with the usual report.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from hvf._kvm import lib
from hvf.errors import GuestMemoryError

if TYPE_CHECKING:
    from hvf.vcpu import Vcpu

INT3 = 0xCC
BP_VECTOR = 3
RFLAGS_ZF = 1 << 6
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
_LEGACY_PREFIXES = {0xF0, 0xF2, 0xF3, 0x66, 0x67, *_SEGMENT_PREFIXES}
# struct kvm_vcpu_events (ABI): exception.injected, .nr, .has_error_code, .pending at 0..3
EVENTS_EXCEPTION_INJECTED = 0
EVENTS_EXCEPTION_NR = 1


class Unsupported(Exception):
    """The instruction is not one hvf can finish soundly."""


def try_emulate(vcpu: Vcpu, insn: bytes) -> str | None:
    """Finish the failed instruction ``insn``; returns what was done, or None."""
    try:
        if insn[:1] == bytes([INT3]):
            return _inject_breakpoint(vcpu)
        return _cmpxchg_wide(vcpu, insn)
    except (Unsupported, GuestMemoryError):
        return None


def _inject_breakpoint(vcpu: Vcpu) -> str:
    regs = vcpu.fd.get_regs()
    regs.rip += 1  # #BP is a trap: it reports the address after int3
    vcpu.fd.set_regs(regs)
    events = bytearray(vcpu.fd.get_state(lib.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events"))
    events[EVENTS_EXCEPTION_INJECTED] = 1
    events[EVENTS_EXCEPTION_NR] = BP_VECTOR
    vcpu.fd.set_state(lib.KVM_SET_VCPU_EVENTS, "struct kvm_vcpu_events", bytes(events))
    return "int3: injected #BP"


def _cmpxchg_wide(vcpu: Vcpu, insn: bytes) -> str:
    i = 0
    segment = None
    while i < len(insn) and insn[i] in _LEGACY_PREFIXES:
        if insn[i] in (0x66, 0x67):
            raise Unsupported("operand or address size override")
        segment = _SEGMENT_PREFIXES.get(insn[i], segment)
        i += 1
    rex = insn[i] if i < len(insn) and 0x40 <= insn[i] <= 0x4F else 0
    i += 1 if rex else 0
    if insn[i : i + 2] != b"\x0f\xc7":
        raise Unsupported("not cmpxchg8b/16b")
    modrm = insn[i + 2]
    if (modrm >> 3) & 7 != 1 or modrm >> 6 == 3:
        raise Unsupported("not a memory cmpxchg8b/16b")
    wide = bool(rex & 0x8)
    regs = vcpu.fd.get_regs()
    sregs = vcpu.fd.get_sregs()
    if not sregs.efer & EFER_LMA:
        raise Unsupported("only long mode is handled")
    address, length = _effective_address(insn, i + 2, rex, regs)
    if segment in ("fs", "gs"):
        address += getattr(sregs, segment).base
    address &= (1 << 64) - 1
    size = 16 if wide else 8
    if wide and address % 16:
        raise Unsupported("misaligned cmpxchg16b (#GP)")
    half = size // 2
    mask = (1 << (8 * half)) - 1
    with vcpu.vm.others_stopped(vcpu):
        gpa = translate(vcpu, sregs, address)
        if gpa // 4096 != (gpa + size - 1) // 4096:
            raise Unsupported("operand crosses a page")
        current = vcpu.vm.memory.read(gpa, size)
        low, high = int.from_bytes(current[:half], "little"), int.from_bytes(current[half:], "little")
        if low == regs.rax & mask and high == regs.rdx & mask:
            new = (regs.rbx & mask).to_bytes(half, "little") + (regs.rcx & mask).to_bytes(half, "little")
            vcpu.vm.memory.write(gpa, new)
            regs.rflags |= RFLAGS_ZF
        else:
            regs.rax, regs.rdx = low, high
            regs.rflags &= ~RFLAGS_ZF
        regs.rip += i + 2 + length
        vcpu.fd.set_regs(regs)
    return f"cmpxchg{16 if wide else 8}b at {address:#x}"


def _effective_address(insn: bytes, at: int, rex: int, regs: Any) -> tuple[int, int]:
    """Address of the ModRM memory operand at ``insn[at]``; returns (address, bytes used)."""
    modrm = insn[at]
    mod, rm = modrm >> 6, modrm & 7
    used = 1
    base_reg: int | None = rm | ((rex & 1) << 3)
    index = 0
    if rm == 4:  # SIB
        sib = insn[at + 1]
        used += 1
        scale, idx, base = sib >> 6, ((sib >> 3) & 7) | ((rex & 2) << 2), sib & 7
        if idx != 4:
            index = getattr(regs, _GPRS[idx]) << scale
        base_reg = base | ((rex & 1) << 3)
        if base == 5 and mod == 0:
            base_reg = None
            disp = struct.unpack_from("<i", insn, at + used)[0]
            return (disp + index) & ((1 << 64) - 1), used + 4
    if mod == 0 and rm == 5:
        disp = struct.unpack_from("<i", insn, at + used)[0]
        # RIP-relative: relative to the end of the instruction
        return (regs.rip + at + used + 4 + disp) & ((1 << 64) - 1), used + 4
    disp = 0
    if mod == 1:
        disp = struct.unpack_from("<b", insn, at + used)[0]
        used += 1
    elif mod == 2:
        disp = struct.unpack_from("<i", insn, at + used)[0]
        used += 4
    base_value = getattr(regs, _GPRS[base_reg]) if base_reg is not None else 0
    return (base_value + index + disp) & ((1 << 64) - 1), used


def translate(vcpu: Vcpu, sregs: Any, address: int) -> int:
    """Walk the guest's page tables (4- or 5-level long mode) for ``address``."""
    if not sregs.cr0 & CR0_PG:
        return address
    memory = vcpu.vm.memory
    levels = 5 if sregs.cr4 & CR4_LA57 else 4
    table = sregs.cr3 & 0x000F_FFFF_FFFF_F000
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        entry = int.from_bytes(memory.read(table + ((address >> shift) & 0x1FF) * 8, 8), "little")
        if not entry & 1:
            raise Unsupported(f"{address:#x} is not mapped (a page fault the guest must see)")
        frame = entry & 0x000F_FFFF_FFFF_F000
        if level == 1 or (level in (2, 3) and entry & 0x80):
            page_mask = (1 << shift) - 1
            return (frame & ~page_mask) | (address & page_mask)
        table = frame
    raise Unsupported("page walk did not end")
