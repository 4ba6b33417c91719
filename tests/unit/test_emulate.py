# SPDX-License-Identifier: BSD-2-Clause
"""The user-space instruction finisher's decoder and page walk (no KVM needed)."""

from __future__ import annotations

import types

import pytest

from hvf import emulate
from hvf.memory import GuestMemory, MiB


def regs(**values: int) -> types.SimpleNamespace:
    names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
    return types.SimpleNamespace(**{n: values.get(n, 0) for n in names})


@pytest.mark.parametrize(("insn", "rex", "r", "address", "length"), [
    # lock cmpxchg16b 0x20(%rbp) — the instruction the Debian kernel stops at on kvm_pvm
    (bytes.fromhex("4d20"), 0x48, regs(rbp=0x1000), 0x1020, 2),
    (bytes.fromhex("0e"), 0x48, regs(rsi=0x5000), 0x5000, 1),  # (%rsi)
    (bytes.fromhex("0c8b"), 0x48, regs(rbx=0x100, rcx=0x10), 0x140, 2),  # (%rbx,%rcx,4)
    (bytes.fromhex("8c24 78563412"), 0x48, regs(rsp=0x1000), 0x1000 + 0x12345678, 6),
    (bytes.fromhex("0d 10000000"), 0x48, regs(rip=0x4000), 0x4000 + 5 + 0x10, 5),  # rip-relative
    (bytes.fromhex("49f8"), 0x49, regs(r9=0x2000), 0x2000 - 8, 2),  # -8(%r9) via REX.B
])
def test_effective_address(insn: bytes, rex: int, r: object, address: int, length: int) -> None:
    # _effective_address measures RIP-relative from the instruction start + its ModRM offset
    assert emulate._effective_address(insn, 0, rex, r) == (address, length)


def test_long_mode_page_walk_with_4k_and_2m_pages() -> None:
    mem = GuestMemory(16 * MiB)
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    mem.write(pml4 + 8 * 1, (pdpt | 3).to_bytes(8, "little"))  # 512 GiB slot 1
    mem.write(pdpt + 8 * 0, (pd | 3).to_bytes(8, "little"))
    mem.write(pd + 8 * 0, (pt | 3).to_bytes(8, "little"))
    mem.write(pd + 8 * 1, (0x600000 | 0x83).to_bytes(8, "little"))  # a 2 MiB page
    mem.write(pt + 8 * 5, (0x7000 | 3).to_bytes(8, "little"))
    vcpu = types.SimpleNamespace(vm=types.SimpleNamespace(memory=mem))
    sregs = types.SimpleNamespace(cr0=emulate.CR0_PG, cr4=0, cr3=pml4)
    base = 1 << 39
    assert emulate.translate(vcpu, sregs, base + 5 * 4096 + 0x123) == 0x7123  # type: ignore[arg-type]
    assert emulate.translate(vcpu, sregs, base + (1 << 21) + 0x4567) == 0x604567  # type: ignore[arg-type]
    with pytest.raises(emulate.Unsupported, match="not mapped"):
        emulate.translate(vcpu, sregs, base + 6 * 4096)  # type: ignore[arg-type]


def test_other_instructions_are_left_alone() -> None:
    vcpu = types.SimpleNamespace()
    assert emulate.try_emulate(vcpu, bytes.fromhex("0f01d0")) is None  # type: ignore[arg-type]
    assert emulate.try_emulate(vcpu, bytes.fromhex("660fc70e")) is None  # type: ignore[arg-type]
