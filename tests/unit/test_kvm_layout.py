# SPDX-License-Identifier: BSD-2-Clause
"""The compiled KVM binding: struct sizes agree with the sizes encoded in ioctl numbers."""

from __future__ import annotations

import pytest

from hvf._kvm import ffi, lib
from hvf._kvm_build import IOCTLS, STRUCT_IOCTLS

# x86-64 sizes of the fixed-size structs (also asserted by rust-vmm's bindings).
X86_64_SIZES = {
    "struct kvm_run": 2352,
    "struct kvm_regs": 144,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_lapic_state": 1024,
    "struct kvm_irqchip": 520,
    "struct kvm_pit_state2": 112,
    "struct kvm_clock_data": 48,
    "struct kvm_vcpu_events": 64,
    "struct kvm_xcrs": 392,
    "struct kvm_debugregs": 128,
    "struct kvm_mp_state": 4,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_segment": 24,
    "struct kvm_cpuid_entry2": 40,
}


def ioctl_size(number: int) -> int:
    return (number >> 16) & 0x3FFF


@pytest.mark.parametrize(("ioctl", "ctype"), STRUCT_IOCTLS, ids=[i for i, _ in STRUCT_IOCTLS])
def test_struct_size_matches_ioctl_encoding(ioctl: str, ctype: str) -> None:
    assert ffi.sizeof(ctype) == ioctl_size(getattr(lib, ioctl))


@pytest.mark.parametrize(("ctype", "size"), X86_64_SIZES.items())
def test_x86_64_struct_sizes(ctype: str, size: int) -> None:
    assert ffi.sizeof(ctype) == size


def test_known_ioctl_numbers() -> None:
    assert lib.KVM_RUN == 0xAE80
    assert lib.KVM_GET_REGS == 0x8090AE81
    assert lib.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    # Same number 0x9f, told apart only by size and direction:
    assert lib.KVM_GET_PIT2 != lib.KVM_GET_VCPU_EVENTS


def test_every_ioctl_is_exported() -> None:
    for name in IOCTLS:
        assert isinstance(getattr(lib, name), int)


def test_kvm_run_layout() -> None:
    assert ffi.offsetof("struct kvm_run", "exit_reason") == 8
    assert ffi.offsetof("struct kvm_run", "apic_base") == 24
    assert lib.HVF_RUN_EXIT_OFFSET == 32
    assert ffi.sizeof("hvf_exit_io") == 16
    assert ffi.offsetof("hvf_exit_mmio", "data") == 8
