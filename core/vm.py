# SPDX-License-Identifier: BSD-2-Clause
"""The machine: KVM VM, guest memory, buses, vCPUs and devices, and how it runs.

Building order (bhyve's, §5.9 of the reference): KVM VM and in-kernel interrupt
controllers, guest RAM, vCPUs, then the plugins' ``hvf_machine_build`` (buses and
devices), ``hvf_machine_ready``, then the boot loader sets the first vCPU's state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from hvf import cpumodel, exitcodes
from hvf._kvm import lib
from hvf.config import Config
from hvf.context import attach_device
from hvf.control import ControlServer
from hvf.device import Device
from hvf.errors import ConfigError, HvfError
from hvf.eventloop import EventLoop
from hvf.iobus import MmioBus, PortBus
from hvf.interrupts import InterruptController
from hvf.kvm import Kvm, is_pvm
from hvf.memory import GuestMemory, parse_size
from hvf.preflight import MAX_VCPUS
from hvf.terminal_log import divert
from hvf.vcpu import RateLimitedLog, Vcpu

if TYPE_CHECKING:
    from hvf.cpumodel import CpuProfile
    from hvf.gdbstub import GdbStub
    from hvf.incremental import CheckpointBase
    from hvf.pluginmanager import Plugins

log = logging.getLogger("hvf")

#: How often the main thread checks for a guest that has halted for good.
HALT_POLL_INTERVAL = 0.5
#: x86 RFLAGS.IF
RFLAGS_IF = 1 << 9

#: Where KVM may put the TSS and identity-map pages it needs (just below the BIOS).
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000


def _ram_shared(config: Config, plugins: Plugins) -> bool:
    """Whether guest RAM must be a memfd other processes can map: ``memory.shared``,
    or a PCI device whose back end maps it (registered with ``shares_ram``)."""
    if config.get_bool("memory.shared"):
        return True
    devices = [value for key, value in config.items()
               if key.startswith("pci.") and key.endswith(".device")]
    if not devices:
        return False
    registry = plugins.pci_devices
    return any((entry := registry.get(name)) is not None and entry.shares_ram
               for name in devices)


class Machine:
    """One virtual machine, built from a configuration tree by the plugins; with
    ``ram_file`` (a snapshot's RAM file, open) its RAM is that file, copy-on-write, and
    with ``adopt_ram`` too it is a guest's memfd handed over by another hvf process."""

    def __init__(
        self, config: Config, plugins: Plugins, *, ram_file: int | None = None,
        adopt_ram: bool = False, cpu: CpuProfile | None = None,
    ) -> None:
        self.config = config
        self.plugins = plugins
        self.hook = plugins.hook
        self.name = config.get("name") or "vm"
        self.pvm = is_pvm()
        self.strict_io = config.get_bool("x86.strictio")
        self.unhandled_log = RateLimitedLog()
        #: Instructions finished in user space after KVM's emulator failed, by kind.
        self.emulated: Counter[str] = Counter()
        self.devices: list[Device] = []
        self.pio = PortBus()
        self.mmio = MmioBus()
        # What is made here is undone if a later step fails (an in-process caller must not
        # leak descriptors); once the machine is whole, close() releases it.
        with contextlib.ExitStack() as undo:
            self.loop = EventLoop()
            undo.callback(self.loop.close)
            self.ncpus = config.get_int("cpus", 1)
            memory_size = parse_size(config.get("memory.size") or "256M")

            self.kvm = Kvm()
            undo.callback(self.kvm.close)
            self.kvm.require_capabilities()
            limit = min(self.kvm.max_vcpus(), MAX_VCPUS)
            if not 1 <= self.ncpus <= limit:
                raise ConfigError(f"{self.ncpus} vCPUs requested but only {limit} available "
                                  f"(cpus: 1 to {limit})")
            self.vmfd = self.kvm.create_vm()
            undo.callback(self.vmfd.close)
            self.vmfd.set_identity_map_addr(IDENTITY_MAP_ADDR)
            self.vmfd.set_tss_addr(TSS_ADDR)
            self.memory = GuestMemory(memory_size, ram_file,
                                      shared=_ram_shared(config, plugins),
                                      wired=config.get_bool("memory.wired"),  # -S
                                      in_core=config.get_bool("memory.guest_in_core"),  # -C
                                      adopt=adopt_ram)
            undo.callback(self.memory.close)
            # RAM's slots before the irqchip: the first slot set after KVM_CREATE_IRQCHIP
            # waits out the grace period that it started (~8 ms asleep here).
            self.log_dirty_pages(False)
            self.vmfd.create_irqchip()
            self.vmfd.create_pit2()
            #: Interrupt lines, MSI vectors and irqfds; devices are handed theirs.
            self.interrupts = InterruptController(
                self.vmfd, max_gsi=self.kvm.check_extension(lib.KVM_CAP_IRQ_ROUTING))
            undo.pop_all()
        self._next_slot = len(self.memory.regions)

        self._cond = threading.Condition()
        self._exit: tuple[int, str] | None = None
        self._exited = threading.Event()
        self._pause_requested = False
        self._holds = 0  # vCPUs holding the others still (see others_stopped)
        self._parked = 0
        self._running = 0
        self._halt_probe: dict[int, str | None] | None = None
        self.started_at = 0.0
        #: True while a machine is built to receive a snapshot's state (RAM included).
        self.restoring = False
        self.control: ControlServer | None = None
        self._restore_log: Callable[[], None] | None = None

        if not config.get_bool("x86.strictmsr", default=True):
            self.vmfd.exit_on_unknown_msrs()  # -w
        self.vcpus = [Vcpu(self, i) for i in range(self.ncpus)]
        self.gdb: GdbStub | None = None
        #: What the next incremental checkpoint builds on (:mod:`hvf.incremental`).
        self.checkpoint_base: CheckpointBase | None = None
        try:
            #: The CPU the guest is given (cpu.model, cpu.features), or ``cpu``, the
            #: one a restored or migrated guest had, once this host is found to give it.
            self.cpu = cpumodel.apply(self, cpu)
            if config.get_int("gdb.port", 0):  # -G
                from hvf.gdbstub import GdbStub

                self.gdb = GdbStub.from_config(self)
        except BaseException:
            self.close()
            raise

    # ---- building ----

    def log_dirty_pages(self, on: bool) -> None:
        """Map guest RAM into KVM's slots (slot i is region i), with
        KVM_MEM_LOG_DIRTY_PAGES when ``on``: KVM then logs the guest's writes (a migration)."""
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        for slot, region in enumerate(self.memory.regions):
            self.vmfd.set_user_memory_region(
                slot, region.guest_base, region.size, self.memory.host_addr + region.file_offset,
                flags)

    def add_memory_slot(self, guest_base: int, size: int, host_addr: int, readonly: bool) -> int:
        """Map host memory (a ROM, say) at ``guest_base``; returns the KVM slot number."""
        slot = self._next_slot
        self._next_slot += 1
        flags = lib.KVM_MEM_READONLY if readonly else 0
        self.vmfd.set_user_memory_region(slot, guest_base, size, host_addr, flags)
        return slot

    def attach(self, device: Device, *, config: str | None = None) -> None:
        """Attach ``device`` with its context (``config``: the key of its configuration
        subtree); it registers its I/O ranges, then plugins are told."""
        attach_device(self, device, config)
        self.hook.hvf_device_attached(vm=self, device=device)

    def device(self, name: str) -> Device | None:
        """The attached device named ``name``, or None."""
        return next((d for d in self.devices if d.name == name), None)

    def build(self, *, restoring: bool = False, control: bool = True) -> None:
        """Let the plugins build buses and devices, then load what the guest boots
        (nothing when the state comes from a snapshot). Without ``control`` the caller
        sets :attr:`control` before :meth:`run` (a migration's destination takes the
        VM's name only once the source gives it up)."""
        self.restoring = restoring
        if control:
            self.control = ControlServer(self)  # refuses a second VM of the same name
        self.hook.hvf_machine_build(vm=self)
        self._restore_log = divert(self.config, self.name)  # consoles are open now
        self.hook.hvf_machine_ready(vm=self)
        self.hook.hvf_firmware_setup(vm=self)
        kernel = self.config.get("boot.kernel")
        if restoring:
            return
        if kernel:
            from hvf.loader import load_kernel

            load_kernel(
                self,
                kernel,
                initrd=self.config.get("boot.initrd"),
                cmdline=self.config.get("boot.append") or "",
            )
        elif not self.config.get("lpc.bootrom"):
            raise ConfigError("virtual machine cannot be booted: give --kernel or -l bootrom,ROM")

    # ---- running ----

    def run(self) -> int:
        """Run the vCPUs until the VM stops; returns bhyve's exit status."""
        self.started_at = time.monotonic()
        assert self.control is not None
        self.control.start()
        self.hook.hvf_vm_start(vm=self)
        self.loop.start()
        with self._cond:
            self._running = len(self.vcpus)
        if self.gdb is not None:
            self.gdb.start()
        for vcpu in self.vcpus:
            vcpu.start()
        while not self._exited.wait(HALT_POLL_INTERVAL):
            if not self._pause_requested and self._halted_for_good():
                self.request_exit(exitcodes.HALT, "every vCPU halted with interrupts disabled")
        for vcpu in self.vcpus:
            vcpu.kick()
        for vcpu in self.vcpus:
            assert vcpu.thread is not None
            vcpu.thread.join()
        status, message = self._exit or (exitcodes.ERROR, "stopped")
        self.hook.hvf_vm_stop(vm=self, status=status)
        self.loop.unsuspend()
        self.loop.stop()
        self.close()
        if status == exitcodes.ERROR:
            log.error("%s", message)
        else:
            log.info("%s", message)
        return status

    def request_exit(self, status: int, message: str = "") -> None:
        """Stop the VM with ``status``; the first request wins. Callable from any thread."""
        with self._cond:
            if self._exit is None:
                self._exit = (status, message)
            self._cond.notify_all()
        for vcpu in self.vcpus:
            vcpu.kick()
        self._exited.set()

    @property
    def exit_status(self) -> int | None:
        return None if self._exit is None else self._exit[0]

    def _halted_for_good(self) -> bool:
        """True when every started vCPU sits in HLT with interrupts disabled.

        The in-kernel LAPIC handles HLT without an exit, so the vCPUs are kicked and each
        reports its MP state and RFLAGS.IF (bhyve's VM_SUSPEND_HALT condition).
        """
        with self._cond:
            self._halt_probe = {v.index: None for v in self.vcpus}
        for vcpu in self.vcpus:
            vcpu.kick()
        with self._cond:
            probe = self._halt_probe
            answered = self._cond.wait_for(
                lambda: self._exit is not None or None not in probe.values(), 1.0
            )
            self._halt_probe = None
        states = set(probe.values())
        return bool(answered) and "halted" in states and states <= {"halted", "waiting"}

    def _answer_halt_probe(self, vcpu: Vcpu) -> None:
        mp_state = vcpu.fd.get_mp_state()
        if mp_state == lib.KVM_MP_STATE_UNINITIALIZED:
            answer = "waiting"  # an AP that was never started
        elif mp_state == lib.KVM_MP_STATE_HALTED and not vcpu.fd.get_regs().rflags & RFLAGS_IF:
            answer = "halted"
        else:
            answer = "running"
        with self._cond:
            if self._halt_probe is not None:
                self._halt_probe[vcpu.index] = answer
                self._cond.notify_all()

    def vcpu_checkpoint(self, vcpu: Vcpu) -> bool:
        """Called by a kicked vCPU: park while paused; True when it must stop."""
        probe = self._halt_probe
        if probe is not None and probe.get(vcpu.index, "") is None:
            self._answer_halt_probe(vcpu)
        with self._cond:
            while True:
                if self._exit is not None:
                    self._running -= 1
                    self._cond.notify_all()
                    return True
                if not self._pause_requested and not self._holds and not vcpu.held:
                    return False
                self._parked += 1
                self._cond.notify_all()
                self._cond.wait()
                self._parked -= 1

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU outside KVM_RUN, then tell the plugins (``hvf_vm_pause``)."""
        with self._cond:
            self._pause_requested = True
        for vcpu in self.vcpus:
            vcpu.kick()
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._exit is not None or self._parked >= self._running, timeout
            ):
                raise HvfError(f"vCPUs did not stop within {timeout} s")
        self.loop.suspend()
        self.hook.hvf_vm_pause(vm=self)

    def resume(self) -> None:
        """Let the vCPUs run again after :meth:`pause`."""
        self.hook.hvf_vm_resume(vm=self)
        self.loop.unsuspend()
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._pause_requested

    def hold(self, vcpus: list[Vcpu]) -> None:
        """Keep ``vcpus`` parked outside KVM_RUN until :meth:`release` (a debugger's
        stop; pause and resume leave them held). :meth:`wait_parked` waits for them."""
        with self._cond:
            for vcpu in vcpus:
                vcpu.held = True
        for vcpu in vcpus:
            vcpu.kick()

    def release(self, vcpus: list[Vcpu]) -> None:
        with self._cond:
            for vcpu in vcpus:
                vcpu.held = False
            self._cond.notify_all()

    def wait_parked(self, timeout: float = 10.0) -> bool:
        """Wait until every running vCPU is parked; False when the machine exits first."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._exit is not None or self._parked >= self._running, timeout
            ):
                raise HvfError(f"vCPUs did not stop within {timeout} s")
            return self._exit is None

    @contextlib.contextmanager
    def others_stopped(self, me: Vcpu, timeout: float = 10.0) -> Iterator[None]:
        """Hold every vCPU but ``me`` (the caller's) outside KVM_RUN for the block."""
        if len(self.vcpus) == 1:
            yield
            return
        with self._cond:
            self._holds += 1
        for vcpu in self.vcpus:
            if vcpu is not me:
                vcpu.kick()
        try:
            with self._cond:
                if not self._cond.wait_for(
                    lambda: self._exit is not None or self._parked >= self._running - 1, timeout
                ):
                    raise HvfError(f"vCPUs did not stop within {timeout} s")
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Release every device's host resources (backends flush what they can), then
        guest RAM and the VM's KVM descriptors."""
        if self.gdb is not None:
            self.gdb.close(self.exit_status)
            self.gdb = None
        if self._restore_log is not None:
            self._restore_log()
            self._restore_log = None
        for device in reversed(self.devices):
            try:
                device.close()
            except Exception:
                log.exception("closing %s", device.name)
        self.devices.clear()
        self.loop.close()
        if self.control is not None:
            self.control.close()
        self.memory.close()
        if self.vmfd.fd >= 0:  # the KVM descriptors, once (a machine in-process must not leak them)
            for vcpu in self.vcpus:
                vcpu.fd.close()
            self.vmfd.close()
            self.kvm.close()
            self.vmfd.fd = -1
