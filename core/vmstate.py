# SPDX-License-Identifier: BSD-2-Clause
"""The state KVM holds for a VM and its vCPUs, as snapshot chunks.

KVM structs are stored as raw bytes under their names (padded or truncated to the
compiled size on load, so a snapshot survives a header that grew a field), in the order
that keeps KVM consistent: ``mp_state`` first on save, ``vcpu_events`` last on restore
(``SET_REGS`` clears pending exceptions, ``SET_LAPIC`` needs the APIC base from
``SET_SREGS``, TSC-deadline MSRs need the LAPIC).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from hvf._kvm import ffi, lib
from hvf.errors import KvmError, SnapshotError
from hvf.kvm import ioctl
from hvf.snapshot_api import field_bytes

if TYPE_CHECKING:
    from hvf.vcpu import Vcpu
    from hvf.vm import Machine

VCPU_STATE_VERSION = 1
VM_STATE_VERSION = 1

# (field, get ioctl, set ioctl, struct), in save order after mp_state.
_VCPU_STRUCTS = (
    ("regs", "KVM_GET_REGS", "KVM_SET_REGS", "struct kvm_regs"),
    ("sregs", "KVM_GET_SREGS", "KVM_SET_SREGS", "struct kvm_sregs"),
    ("xcrs", "KVM_GET_XCRS", "KVM_SET_XCRS", "struct kvm_xcrs"),
    ("debugregs", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "struct kvm_debugregs"),
    ("lapic", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "struct kvm_lapic_state"),
)
_IRQCHIPS = (("pic_master", 0), ("pic_slave", 1), ("ioapic", 2))


def xsave_size(vm: Machine) -> int:
    """Bytes of XSAVE state this VM's vCPUs have (KVM_CAP_XSAVE2, at least 4 KiB)."""
    size = vm.vmfd.check_extension(lib.KVM_CAP_XSAVE2)
    return max(size, ffi.sizeof("struct kvm_xsave"))


def _save_xsave(vcpu: Vcpu, size: int) -> bytes:
    buf = ffi.new("char[]", size)
    request = lib.KVM_GET_XSAVE2 if size > ffi.sizeof("struct kvm_xsave") else lib.KVM_GET_XSAVE
    ioctl(vcpu.fd.fd, request, buf)
    return bytes(ffi.buffer(buf))


def _restore_xsave(vcpu: Vcpu, data: bytes, size: int) -> None:
    buf = ffi.new("char[]", max(size, len(data)))
    ffi.buffer(buf)[: len(data)] = data
    ioctl(vcpu.fd.fd, lib.KVM_SET_XSAVE, buf)


def _get_msrs(vcpu: Vcpu, indices: list[int]) -> list[tuple[int, int]]:
    """Read ``indices``; MSRs the vCPU refuses are left out."""
    wanted = list(indices)
    while wanted:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(wanted), "entries": len(wanted)})
        for i, index in enumerate(wanted):
            msrs.entries[i].index = index
        n = ioctl(vcpu.fd.fd, lib.KVM_GET_MSRS, msrs)
        if n == len(wanted):
            return [(msrs.entries[i].index, msrs.entries[i].data) for i in range(n)]
        del wanted[n]  # KVM stops at the first MSR it cannot read
    return []


def _set_msrs(vcpu: Vcpu, entries: list[tuple[int, int]]) -> None:
    msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(entries), "entries": len(entries)})
    for i, (index, data) in enumerate(entries):
        msrs.entries[i].index = index
        msrs.entries[i].data = data
    n = ioctl(vcpu.fd.fd, lib.KVM_SET_MSRS, msrs)
    if n != len(entries):
        raise SnapshotError(f"vcpu {vcpu.index}: KVM refused MSR {entries[n][0]:#x} on restore")


def save_vcpu(vcpu: Vcpu, msr_indices: list[int], xsave_size: int) -> dict[str, Any]:
    """Every piece of a paused vCPU's KVM state, as named raw structs."""
    fd = vcpu.fd
    fields: dict[str, Any] = {"mp_state": fd.get_mp_state()}
    for name, get, _set, ctype in _VCPU_STRUCTS:
        fields[name] = fd.get_state(getattr(lib, get), ctype)
    fields["xsave"] = _save_xsave(vcpu, xsave_size)
    fields["msrs"] = [[index, data] for index, data in _get_msrs(vcpu, msr_indices)]
    fields["vcpu_events"] = fd.get_state(lib.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events")
    return fields


def restore_vcpu(vcpu: Vcpu, fields: dict[str, Any], xsave_size: int) -> None:
    """Load state saved by :func:`save_vcpu` into a new, not yet running vCPU."""
    fd = vcpu.fd
    try:
        fd.set_mp_state(int(fields["mp_state"]))
        for name, _get, set_, ctype in _VCPU_STRUCTS:
            if name == "lapic":
                continue
            fd.set_state(getattr(lib, set_), ctype, field_bytes(fields, name))
        _restore_xsave(vcpu, field_bytes(fields, "xsave"), xsave_size)
        fd.set_state(lib.KVM_SET_LAPIC, "struct kvm_lapic_state", field_bytes(fields, "lapic"))
        _set_msrs(vcpu, [(int(i), int(d)) for i, d in fields["msrs"]])
        fd.set_state(lib.KVM_SET_VCPU_EVENTS, "struct kvm_vcpu_events",
                     field_bytes(fields, "vcpu_events"))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise SnapshotError(f"vcpu {vcpu.index}: malformed saved state ({e})") from None
    except KvmError as e:
        if e.errno == errno.EINVAL:
            raise SnapshotError(f"vcpu {vcpu.index}: KVM rejected the saved state: {e}") from None
        raise


def save_vm(vm: Machine) -> dict[str, Any]:
    """The in-kernel PIC, IOAPIC and PIT, and the KVM clock."""
    fields: dict[str, Any] = {name: vm.vmfd.get_irqchip(chip) for name, chip in _IRQCHIPS}
    fields["pit2"] = vm.vmfd.get_pit2()
    fields["clock"] = vm.vmfd.get_clock()
    return fields


def restore_vm(vm: Machine, fields: dict[str, Any]) -> None:
    try:
        for name, _chip in _IRQCHIPS:
            vm.vmfd.set_irqchip(field_bytes(fields, name))
        vm.vmfd.set_pit2(field_bytes(fields, "pit2"))
        vm.vmfd.set_clock(field_bytes(fields, "clock"))
    except ValueError as e:
        raise SnapshotError(f"vm: malformed saved state ({e})") from None
    except KvmError as e:
        raise SnapshotError(f"KVM rejected the saved interrupt controller or clock state: {e}") from None
