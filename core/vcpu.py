# SPDX-License-Identifier: BSD-2-Clause
"""vCPUs: one thread each, ``KVM_RUN`` with the GIL released, exits dispatched inline.

The loop in :meth:`Vcpu._run_loop` is the hot path: an I/O exit costs a table lookup
and one call of the device's handler, nothing else. Everything rare (unhandled ports,
string I/O, errors, kicks) lives in separate methods.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from hvf import emulate, exitcodes
from hvf._kvm import ffi, lib
from hvf.errors import HvfError, KvmError
from hvf.kvm import VcpuFd
from hvf.preflight import host_cpuset

if TYPE_CHECKING:
    from hvf.vm import Machine

log = logging.getLogger("hvf.vcpu")

#: The signal that kicks a vCPU thread out of KVM_RUN.
KICK_SIGNAL = signal.SIGUSR1
_SIZE_SUFFIX = {1: "b", 2: "w", 4: "l"}


def install_kick_handler() -> None:
    """Install a no-op handler for the kick signal (main thread only)."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class RateLimitedLog:
    """Logs at most ``burst`` lines per ``period`` seconds and counts the rest."""

    def __init__(self, burst: int = 10, period: float = 1.0) -> None:
        self.burst = burst
        self.period = period
        self.window_start = 0.0
        self.count = 0
        self.suppressed = 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self.window_start >= self.period:
            if self.suppressed:
                log.warning("(%d similar messages suppressed)", self.suppressed)
            self.window_start, self.count, self.suppressed = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            log.warning("%s", message)
        else:
            self.suppressed += 1


class Vcpu:
    """One virtual CPU and the host thread that runs it."""

    def __init__(self, vm: Machine, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd: VcpuFd = vm.vmfd.create_vcpu(index)
        self.thread: threading.Thread | None = None
        self._kick_lock = threading.Lock()
        self._signalable = False  # the thread runs and may be sent the kick signal
        #: Kept parked outside KVM_RUN by a debugger (see Machine.hold).
        self.held = False
        #: The host CPUs its thread may run on (-p), or None.
        self.cpuset = host_cpuset(vm.config, index)
        self._unhandled_log = vm.unhandled_log
        view = memoryview(self.fd.run_map)
        self._m8 = view
        self._m16 = view.cast("H")
        self._m32 = view.cast("I")
        self._mmio_data = lib.HVF_RUN_EXIT_OFFSET + ffi.offsetof("hvf_exit_mmio", "data")

    # ---- control from other threads ----

    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu {self.index}")
        self.thread.start()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN soon (immediate_exit, plus a signal if inside)."""
        self.fd.run.immediate_exit = 1
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return
        # Python threads are detached: signalling one that has ended is undefined, so
        # the thread clears _signalable under this lock before it ends.
        with self._kick_lock:
            if self._signalable and thread.ident is not None:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    # ---- the vCPU thread ----

    def _thread_main(self) -> None:
        with self._kick_lock:
            self._signalable = True
        try:
            if self.cpuset:
                os.sched_setaffinity(0, self.cpuset)  # 0: this thread
            self._run_loop()
        except HvfError as e:
            self.vm.request_exit(exitcodes.ERROR, f"vcpu {self.index}: {e}")
        except BaseException as e:  # a bug in a device model must not hang the VM
            log.exception("vcpu %d: unexpected error", self.index)
            self.vm.request_exit(exitcodes.ERROR, f"vcpu {self.index}: {type(e).__name__}: {e}")
        finally:
            with self._kick_lock:
                self._signalable = False

    def _run_loop(self) -> None:
        vm = self.vm
        fd = self.fd.fd
        run = self.fd.run
        port_range = vm.pio.table.get  # a dict: port -> Range
        run_fast = lib.hvf_run_fast
        fast_io = lib.HVF_FAST_IO
        fast_out = lib.HVF_FAST_IO_OUT
        data = lib.HVF_PIO_DATA_OFFSET
        word = data >> 2  # where C leaves an OUT's value, zero-extended
        m8, m16, m32 = self._m8, self._m16, self._m32
        exit_io = lib.KVM_EXIT_IO
        exit_mmio = lib.KVM_EXIT_MMIO
        while True:
            r = run_fast(fd, run)
            if r >= fast_io:  # one port access, decoded in C
                port = r & 0xFFFF
                rng = port_range(port)
                if rng is None:
                    self._unhandled_single(r, port)
                elif r & fast_out:
                    rng.write(port - rng.base, (r >> 16) & 7, m32[word])
                else:
                    size = (r >> 16) & 7
                    value = rng.read(port - rng.base, size)
                    if size == 1:
                        m8[data] = value & 0xFF
                    elif size == 2:
                        m16[data >> 1] = value & 0xFFFF
                    else:
                        m32[data >> 2] = value & 0xFFFFFFFF
            elif r < 0:
                if self._interrupted(r, run):
                    return
            elif r == exit_io:
                io = self.fd.exit_io
                self._string_io(port_range(io.port), io.port, io.size, io.count, io.data_offset,
                                io.direction)
            elif r == exit_mmio:
                self._mmio()
            elif self._other_exit(r):
                return

    def _interrupted(self, rc: int, run: Any) -> bool:
        """KVM_RUN returned early; True when the loop must end.

        EINTR: a kick (or a signal). EAGAIN: a vCPU waiting for INIT/SIPI woke up and
        wants to be run again.
        """
        if rc == -errno.EAGAIN:
            return False
        if rc != -errno.EINTR:
            raise KvmError("KVM_RUN", -rc, f"vcpu {self.index}")
        run.immediate_exit = 0
        return self.vm.vcpu_checkpoint(self)

    # ---- rare paths ----

    def _unhandled_single(self, packed: int, port: int) -> None:
        size = (packed >> 16) & 7
        if packed & lib.HVF_FAST_IO_OUT:
            self._unhandled_port("out", port, size)
        else:
            self._unhandled_port("in", port, size)
            self._m32[lib.HVF_PIO_DATA_OFFSET >> 2] = 0xFFFFFFFF

    def _unhandled_port(self, direction: str, port: int, size: int) -> None:
        if self.vm.strict_io:
            rip = self.fd.get_regs().rip
            raise StrictIoViolation(
                f"Unhandled {direction}{_SIZE_SUFFIX.get(size, '?')} {port:#06x} at {rip:#x}"
            )
        self._unhandled_log(
            f"vcpu {self.index}: unhandled {direction}{_SIZE_SUFFIX.get(size, '?')} "
            f"port {port:#06x}" + (" (reads as all ones)" if direction == "in" else " (dropped)")
        )

    def _string_io(self, r: Any, port: int, size: int, count: int, off: int, out: int) -> None:
        """``rep ins``/``rep outs``: KVM hands over ``count`` elements in the data page."""
        m8 = self._m8
        if r is None:
            self._unhandled_port("out" if out else "in", port, size)
            if not out:
                m8[off : off + size * count] = b"\xff" * (size * count)
            return
        offset = port - r.base
        if out:
            data = m8[off : off + size * count]
            if size == 1:
                for value in data:
                    r.write(offset, 1, value)
            else:
                for i in range(0, size * count, size):
                    r.write(offset, size, int.from_bytes(data[i : i + size], "little"))
        else:
            mask = (1 << (8 * size)) - 1
            for i in range(off, off + size * count, size):
                m8[i : i + size] = (r.read(offset, size) & mask).to_bytes(size, "little")

    def _mmio(self) -> None:
        mmio = self.fd.exit_mmio
        addr = mmio.phys_addr
        length = mmio.len
        data = self._mmio_data
        r = self.vm.mmio.lookup(addr)
        if mmio.is_write:
            value = int.from_bytes(self._m8[data : data + length], "little")
            if r is None:
                self._unhandled_log(f"vcpu {self.index}: unhandled MMIO write {addr:#x} (dropped)")
            else:
                r.write(addr - r.base, length, value)
        else:
            if r is None:
                self._unhandled_log(
                    f"vcpu {self.index}: unhandled MMIO read {addr:#x} (reads as all ones)"
                )
                value = (1 << (8 * length)) - 1
            else:
                value = r.read(addr - r.base, length) & ((1 << (8 * length)) - 1)
            self._m8[data : data + length] = value.to_bytes(length, "little")

    def _other_exit(self, reason: int) -> bool:
        """Exits other than I/O and MMIO; True when the loop must end."""
        vm = self.vm
        if reason == lib.KVM_EXIT_SHUTDOWN:
            vm.request_exit(exitcodes.TRIPLE_FAULT, f"vcpu {self.index}: triple fault")
            return True
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = self.fd.exit_system_event.type
            status = {
                lib.KVM_SYSTEM_EVENT_SHUTDOWN: exitcodes.POWEROFF,
                lib.KVM_SYSTEM_EVENT_RESET: exitcodes.REBOOT,
            }.get(kind, exitcodes.ERROR)
            vm.request_exit(status, f"vcpu {self.index}: system event {kind}")
            return True
        if reason == lib.KVM_EXIT_HLT:
            vm.request_exit(exitcodes.HALT, f"vcpu {self.index}: halted")
            return True
        if reason == lib.KVM_EXIT_INTR:
            return vm.vcpu_checkpoint(self)
        if reason == lib.KVM_EXIT_DEBUG and vm.gdb is not None:
            vm.gdb.debug_exit(self)
            return vm.vcpu_checkpoint(self)
        if reason in (lib.KVM_EXIT_X86_RDMSR, lib.KVM_EXIT_X86_WRMSR):
            self._unknown_msr(reason == lib.KVM_EXIT_X86_RDMSR)
            return False
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            fail = self.fd.exit_fail_entry
            vm.request_exit(
                exitcodes.ERROR,
                f"vcpu {self.index}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason "
                f"{fail.hardware_entry_failure_reason:#x} on host cpu {fail.cpu}\n"
                + self.register_dump(),
            )
            return True
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            if self._debugger_breakpoint():
                return vm.vcpu_checkpoint(self)
            if self._finish_in_user_space():
                return False
            vm.request_exit(exitcodes.ERROR, self._internal_error_report())
            return True
        status = vm.hook.hvf_unhandled_exit(vm=vm, vcpu=self, reason=reason)
        if status == -1:
            return False
        vm.request_exit(
            exitcodes.ERROR if status is None else status,
            f"vcpu {self.index}: unexpected exit reason {reason}\n" + self.register_dump(),
        )
        return True

    def _unknown_msr(self, read: bool) -> None:
        """With ``-w``: an MSR KVM does not know reads as zero, a write to it is dropped
        (bhyve's x86.strictmsr=false)."""
        msr = self.fd.exit_msr
        if read:
            self._unhandled_log(f"rdmsr to register {msr.index:#x} on vcpu {self.index}")
            msr.data = 0
        else:
            self._unhandled_log(
                f"wrmsr to register {msr.index:#x}({msr.data:#x}) on vcpu {self.index}")
        msr.error = 0

    def _debugger_breakpoint(self) -> bool:
        """A debugger's ``int3`` that KVM failed to emulate (kvm_pvm): a breakpoint hit."""
        gdb = self.vm.gdb
        insn = self._failed_instruction()
        if gdb is None or insn is None or insn[:1] != bytes([emulate.INT3]):
            return False
        return gdb.breakpoint_trap(self)

    def _failed_instruction(self) -> bytes | None:
        """The bytes of the instruction KVM failed to emulate, when it reported them."""
        internal = self.fd.exit_internal
        if internal.suberror != lib.KVM_INTERNAL_ERROR_EMULATION or internal.ndata < 3:
            return None
        if not internal.data[0] & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            return None
        raw = b"".join(internal.data[i].to_bytes(8, "little") for i in (1, 2))
        return raw[1 : 1 + min(raw[0], 15)]

    def _finish_in_user_space(self) -> bool:
        """Emulate an instruction KVM could not, where that is sound (see emulate.py)."""
        insn = self._failed_instruction()
        if insn is None or not self.vm.config.get_bool("x86.emulate", default=True):
            return False
        done = emulate.try_emulate(self, insn)
        if done is None:
            return False
        self.vm.emulated[done.split(":")[0].split(" ")[0]] += 1
        log.debug("vcpu %d: finished in user space: %s", self.index, done)
        return True

    def _internal_error_report(self) -> str:
        internal = self.fd.exit_internal
        sub = internal.suberror
        names = {
            lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
            lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
            lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit during event delivery",
            lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit reason",
        }
        lines = [
            f"vcpu {self.index}: KVM_EXIT_INTERNAL_ERROR: {names.get(sub, 'suberror')} ({sub})"
        ]
        ndata = min(internal.ndata, 16)
        data = [internal.data[i] for i in range(ndata)]
        insn = self._failed_instruction()
        if insn is not None:
            lines.append("instruction bytes: " + (insn.hex(" ") or "(none reported)"))
        elif ndata:
            lines.append("data: " + " ".join(f"{d:#x}" for d in data))
        lines.append(self.register_dump())
        if sub == lib.KVM_INTERNAL_ERROR_EMULATION:
            lines.append("hint: " + self._emulation_hint())
        return "\n".join(lines)

    def _emulation_hint(self) -> str:
        try:
            rip = self.fd.get_regs().rip
            fetch = emulate.translate(self, self.fd.get_sregs(), rip)
        except (emulate.Unsupported, HvfError):
            fetch = None
        if fetch is not None and not self.vm.memory.contains(fetch):
            return (f"the guest is executing at {rip:#x}, which is not RAM: it jumped into "
                    "a device or unmapped address")
        if self.vm.pvm:
            return ("KVM could not emulate this instruction; this host's KVM is kvm_pvm, "
                    "which emulates far more guest code than hardware virtualization does")
        return "KVM could not emulate this instruction for the guest"

    def register_dump(self) -> str:
        """The vCPU's general and control registers, formatted for an error report."""
        try:
            r = self.fd.get_regs()
            s = self.fd.get_sregs()
        except KvmError as e:
            return f"(registers unavailable: {e})"
        gprs = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
        out = []
        for i in range(0, len(gprs), 4):
            out.append("  ".join(f"{n:>6}={getattr(r, n):016x}" for n in gprs[i : i + 4]))
        out.append(
            f"   cr0={s.cr0:016x}     cr2={s.cr2:016x}     cr3={s.cr3:016x}     cr4={s.cr4:016x}"
        )
        out.append(f"  efer={s.efer:016x}  cs={s.cs.selector:04x} base={s.cs.base:x} "
                   f"l={s.cs.l} db={s.cs.db}  ss={s.ss.selector:04x}")
        return "\n".join(out)


class StrictIoViolation(HvfError):
    """An access to an unemulated I/O port with ``-e`` (x86.strictio)."""
