# SPDX-License-Identifier: BSD-2-Clause
"""Typed wrappers for KVM's system, VM and vCPU file descriptors.

Every ioctl goes through :func:`ioctl`, which raises :class:`~hvf.errors.KvmError`
naming the ioctl and the errno. Struct layouts and ioctl numbers come from the C
compiler (see ``_kvm_build.py``).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hvf._kvm import ffi, lib
from hvf.errors import CapabilityError, KvmError

KVM_PATH = "/dev/kvm"

#: Capabilities hvf cannot run without, with what each is for.
REQUIRED_CAPS: dict[str, str] = {
    "KVM_CAP_USER_MEMORY": "guest RAM mapped from host memory",
    "KVM_CAP_IRQCHIP": "in-kernel PIC, IOAPIC and LAPIC",
    "KVM_CAP_PIT2": "in-kernel PIT",
    "KVM_CAP_SET_TSS_ADDR": "real-mode and protected-mode entry on Intel",
    "KVM_CAP_IMMEDIATE_EXIT": "kicking vCPUs out of KVM_RUN to pause the VM",
    "KVM_CAP_EXT_CPUID": "setting the guest's CPUID",
    "KVM_CAP_MP_STATE": "INIT/SIPI start of secondary vCPUs",
}

_IOCTL_NAMES: dict[int, str] = {}


def ioctl_name(request: int) -> str:
    """The symbolic name of a KVM ioctl number (for messages)."""
    if not _IOCTL_NAMES:
        for name in dir(lib):
            if name.startswith("KVM_") and not name.startswith(("KVM_CAP_", "KVM_EXIT_")):
                _IOCTL_NAMES.setdefault(getattr(lib, name), name)
    return _IOCTL_NAMES.get(request, hex(request))


def ioctl(fd: int, request: int, arg: Any = ffi.NULL) -> int:
    """Run a pointer-argument ioctl; raise KvmError on failure."""
    r = lib.hvf_ioctl(fd, request, arg)
    if r < 0:
        raise KvmError(ioctl_name(request), -r)
    return r


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """Run an integer-argument ioctl; raise KvmError on failure."""
    r = lib.hvf_ioctl_int(fd, request, arg)
    if r < 0:
        raise KvmError(ioctl_name(request), -r)
    return r


def is_pvm() -> bool:
    """True when /dev/kvm is provided by kvm_pvm (KVM without hardware virtualization)."""
    return Path("/sys/module/kvm_pvm").exists()


def kvm_unavailable_reason(path: str = KVM_PATH) -> str | None:
    """Why /dev/kvm cannot be used here, or None when it can."""
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM on this host)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {path}: {e.strerror}"
    os.close(fd)
    return None


class Kvm:
    """The system file descriptor, /dev/kvm."""

    def __init__(self, path: str = KVM_PATH) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise CapabilityError(f"cannot open {path}: {e.strerror}") from e
        version = ioctl_int(self.fd, lib.KVM_GET_API_VERSION)
        if version != lib.KVM_API_VERSION:
            raise CapabilityError(f"KVM API version {version}, hvf needs {lib.KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific value."""
        return ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap)

    def require_capabilities(self) -> None:
        """Raise CapabilityError listing every required capability that is missing."""
        missing = [
            f"{name} ({why})"
            for name, why in REQUIRED_CAPS.items()
            if not self.check_extension(getattr(lib, name))
        ]
        if missing:
            raise CapabilityError("the host's KVM lacks: " + "; ".join(missing))

    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(
            lib.KVM_CAP_NR_VCPUS
        ) or 4

    def supported_cpuid(self) -> Any:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits."""
        n = 64
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            r = lib.hvf_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid)
            if r == -errno.E2BIG:
                n *= 2
                continue
            if r < 0:
                raise KvmError("KVM_GET_SUPPORTED_CPUID", -r)
            return cpuid

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST)."""
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 1})
        r = lib.hvf_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, probe)
        if r < 0 and r != -errno.E2BIG:
            raise KvmError("KVM_GET_MSR_INDEX_LIST", -r)
        n = probe.nmsrs
        full = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, full)
        return [full.indices[i] for i in range(full.nmsrs)]

    def create_vm(self) -> VmFd:
        return VmFd(self, ioctl_int(self.fd, lib.KVM_CREATE_VM, 0))

    def close(self) -> None:
        os.close(self.fd)


class VmFd:
    """A VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (some answers depend on the VM)."""
        return ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_phys_addr,
                "memory_size": size,
                "userspace_addr": host_addr,
            },
        )
        ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, bitmap: Any) -> None:
        """KVM_GET_DIRTY_LOG: the pages of ``slot`` written since the last call (or
        since the last clear, with manual protection) into ``bitmap`` (one bit per
        page, a cffi buffer of 64-bit words)."""
        r = lib.hvf_get_dirty_log(self.fd, slot, bitmap)
        if r < 0:
            raise KvmError("KVM_GET_DIRTY_LOG", -r)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Any) -> None:
        """KVM_CLEAR_DIRTY_LOG: write-protect again the pages of ``slot`` whose bits
        are set in ``bitmap`` (from ``first_page``, a multiple of 64), so that their
        next write is logged."""
        r = lib.hvf_clear_dirty_log(self.fd, slot, first_page, num_pages, bitmap)
        if r < 0:
            raise KvmError("KVM_CLEAR_DIRTY_LOG", -r)

    def set_tss_addr(self, addr: int) -> None:
        ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, lib.KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        ioctl(self.fd, lib.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *"))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, lib.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", (irq, level)))

    def get_irqchip(self, chip_id: int) -> bytes:
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(self.fd, lib.KVM_GET_IRQCHIP, chip)
        return bytes(ffi.buffer(chip))

    def set_irqchip(self, data: bytes) -> None:
        chip = ffi.new("struct kvm_irqchip *")
        ffi.buffer(chip)[:] = fit(data, ffi.sizeof(chip[0]))
        ioctl(self.fd, lib.KVM_SET_IRQCHIP, chip)

    def set_level_triggered(self, irq: int, level: bool = True) -> None:
        """Set ISA ``irq``'s ELCR bit in the in-kernel PIC (level- or edge-triggered)."""
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = lib.KVM_IRQCHIP_PIC_MASTER if irq < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
        ioctl(self.fd, lib.KVM_GET_IRQCHIP, chip)
        pic = ffi.cast("struct kvm_pic_state *", ffi.cast("char *", chip) + lib.HVF_IRQCHIP_CHIP_OFFSET)
        bit = 1 << (irq & 7)
        pic.elcr = (pic.elcr | bit) if level else (pic.elcr & ~bit)
        ioctl(self.fd, lib.KVM_SET_IRQCHIP, chip)

    def set_gsi_routing(self, routes: list[tuple[int, int, int, int, int]]) -> None:
        """KVM_SET_GSI_ROUTING: the whole table, each route ``(gsi, type, a, b, c)``
        (irqchip: chip, pin; MSI: address low, address high, data)."""
        table = ffi.new("hvf_route[]", max(len(routes), 1))
        for i, route in enumerate(routes):
            table[i] = route
        r = lib.hvf_set_gsi_routing(self.fd, table, len(routes))
        if r < 0:
            raise KvmError("KVM_SET_GSI_ROUTING", -r)

    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None,
              deassign: bool = False) -> None:
        """KVM_IRQFD: writes to eventfd ``fd`` raise ``gsi`` in the kernel; with
        ``resample_fd`` the line stays asserted until the guest's EOI, which KVM then
        reports on ``resample_fd`` (level-triggered interrupts)."""
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None and not deassign:
            flags |= lib.KVM_IRQFD_FLAG_RESAMPLE
        arg = ffi.new("struct kvm_irqfd *", {
            "fd": fd, "gsi": gsi, "flags": flags,
            "resamplefd": resample_fd if resample_fd is not None else 0,
        })
        ioctl(self.fd, lib.KVM_IRQFD, arg)

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes at ``addr`` (MMIO, or a
        port with ``pio``), equal to ``datamatch`` when given, signals eventfd ``fd``
        inside the kernel instead of exiting to user space."""
        flags = (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd,
            "flags": flags,
        })
        ioctl(self.fd, lib.KVM_IOEVENTFD, arg)

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: deliver one MSI message now; >0 delivered, 0 blocked."""
        msi = ffi.new("struct kvm_msi *", {
            "address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data,
        })
        return ioctl(self.fd, lib.KVM_SIGNAL_MSI, msi)

    def get_pit2(self) -> bytes:
        return _get_struct(self.fd, lib.KVM_GET_PIT2, "struct kvm_pit_state2")

    def set_pit2(self, data: bytes) -> None:
        _set_struct(self.fd, lib.KVM_SET_PIT2, "struct kvm_pit_state2", data)

    def get_clock(self) -> bytes:
        return _get_struct(self.fd, lib.KVM_GET_CLOCK, "struct kvm_clock_data")

    def set_clock(self, data: bytes) -> None:
        clock = ffi.new("struct kvm_clock_data *")
        ffi.buffer(clock)[:] = fit(data, ffi.sizeof(clock[0]))
        clock.flags = 0  # only the clock value is restored (as Firecracker does)
        ioctl(self.fd, lib.KVM_SET_CLOCK, clock)

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM with up to four arguments."""
        arg = ffi.new("struct kvm_enable_cap *", {"cap": cap, "args": list(args)})
        ioctl(self.fd, lib.KVM_ENABLE_CAP, arg)

    def exit_on_unknown_msrs(self) -> None:
        """Guest accesses to MSRs KVM does not know exit to user space
        (KVM_EXIT_X86_RDMSR/WRMSR) instead of raising #GP in the guest."""
        if not self.check_extension(lib.KVM_CAP_X86_USER_SPACE_MSR):
            raise CapabilityError("-w (x86.strictmsr=false) needs KVM_CAP_X86_USER_SPACE_MSR, "
                                  "which this KVM lacks")
        self.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, lib.KVM_MSR_EXIT_REASON_UNKNOWN)

    def create_vcpu(self, index: int) -> VcpuFd:
        return VcpuFd(self, index, ioctl_int(self.fd, lib.KVM_CREATE_VCPU, index))

    def close(self) -> None:
        os.close(self.fd)


def fit(data: bytes, size: int) -> bytes:
    """Pad with zeros or truncate saved struct bytes to the compiled struct size."""
    return data[:size].ljust(size, b"\0")


def _get_struct(fd: int, request: int, ctype: str) -> bytes:
    buf = ffi.new(ctype + " *")
    ioctl(fd, request, buf)
    return bytes(ffi.buffer(buf))


def _set_struct(fd: int, request: int, ctype: str, data: bytes) -> None:
    buf = ffi.new(ctype + " *")
    ffi.buffer(buf)[:] = fit(data, ffi.sizeof(ctype))
    ioctl(fd, request, buf)


class VcpuFd:
    """A vCPU file descriptor and its shared ``kvm_run`` page."""

    def __init__(self, vm: VmFd, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED)
        self.run = ffi.from_buffer("struct kvm_run *", self.run_map)
        exit_area = ffi.cast("char *", self.run) + lib.HVF_RUN_EXIT_OFFSET
        self.exit_io = ffi.cast("hvf_exit_io *", exit_area)
        self.exit_mmio = ffi.cast("hvf_exit_mmio *", exit_area)
        self.exit_internal = ffi.cast("hvf_exit_internal *", exit_area)
        self.exit_fail_entry = ffi.cast("hvf_exit_fail_entry *", exit_area)
        self.exit_system_event = ffi.cast("hvf_exit_system_event *", exit_area)
        self.exit_debug = ffi.cast("hvf_exit_debug *", exit_area)
        self.exit_msr = ffi.cast("hvf_exit_msr *", exit_area)

    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, lib.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: Any) -> None:
        ioctl(self.fd, lib.KVM_SET_REGS, regs)

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, lib.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        ioctl(self.fd, lib.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> Any:
        fpu = ffi.new("struct kvm_fpu *")
        ioctl(self.fd, lib.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: Any) -> None:
        ioctl(self.fd, lib.KVM_SET_FPU, fpu)

    def set_cpuid2(self, cpuid: Any) -> None:
        ioctl(self.fd, lib.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """The CPUID the vCPU was given: (function, index, flags, eax, ebx, ecx, edx)."""
        n = 64
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            r = lib.hvf_ioctl(self.fd, lib.KVM_GET_CPUID2, cpuid)
            if r == -errno.E2BIG:
                n *= 2
                continue
            if r < 0:
                raise KvmError("KVM_GET_CPUID2", -r)
            return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in (cpuid.entries[i] for i in range(cpuid.nent))]

    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` (KVM_GUESTDBG_* flags) and, with
        KVM_GUESTDBG_USE_HW_BP, DR0-DR3 and DR7 in ``debugreg`` (eight values)."""
        arg = ffi.new("struct kvm_guest_debug *", {"control": control})
        for i, value in enumerate(debugreg):
            arg.arch.debugreg[i] = value
        ioctl(self.fd, lib.KVM_SET_GUEST_DEBUG, arg)

    def translate(self, linear: int) -> int | None:
        """KVM_TRANSLATE: the guest-physical address of ``linear`` through the vCPU's
        current page tables, or None where it is not mapped."""
        arg = ffi.new("struct kvm_translation *", {"linear_address": linear})
        ioctl(self.fd, lib.KVM_TRANSLATE, arg)
        return int(arg.physical_address) if arg.valid else None

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, lib.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, lib.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", (mp_state,)))

    def get_state(self, request: int, ctype: str) -> bytes:
        """Read a fixed-size state struct as raw bytes (for snapshots)."""
        return _get_struct(self.fd, request, ctype)

    def set_state(self, request: int, ctype: str, data: bytes) -> None:
        """Write a fixed-size state struct from raw bytes (padded or truncated)."""
        _set_struct(self.fd, request, ctype, data)

    def close(self) -> None:
        os.close(self.fd)
