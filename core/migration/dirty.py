# SPDX-License-Identifier: BSD-2-Clause
"""Which pages of guest RAM changed since they were sent: KVM's dirty log for the
guest's own writes, and hvf's marks for what hvf writes (device back ends' DMA, the
emulator, rings).

KVM's dirty bitmap (``KVM_MEM_LOG_DIRTY_PAGES``, ``KVM_GET_DIRTY_LOG``) is chosen over
its dirty ring (``KVM_CAP_DIRTY_LOG_RING``): the ring must be enabled before any vCPU
exists, so every VM would pay for it on every write whether it ever migrates or not,
and a full ring stops the vCPU with an exit of its own. With
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (and ``KVM_DIRTY_LOG_INITIALLY_SET``) reading the
log and write-protecting the pages again are separate (``KVM_CLEAR_DIRTY_LOG``), and
turning logging on does not write-protect all of guest RAM at once.

hvf's own writes cannot be seen by KVM. Every page a device is handed a view of while
tracking is on (:attr:`hvf.memory.GuestMemory.written`) may be written until the VM
stops, so those pages, and every registered ring, are sent once more when it has
stopped; :meth:`DirtyLog.start` runs with the VM paused, when no request is in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvf._kvm import ffi, lib
from hvf.extents import PAGE
from hvf.migration.pages import Run, bitmap_runs, mark_runs, union

if TYPE_CHECKING:
    from hvf.vm import Machine


def unseen_writers(vm: Machine) -> str | None:
    """Why the dirty log of ``vm`` cannot be complete (None: it can): devices whose back
    ends write guest RAM from another process (:attr:`hvf.device.Device.dirty_tracked`)."""
    unseen = [d.name for d in vm.devices if not d.dirty_tracked]
    if not unseen:
        return None
    return (f"the back end of {', '.join(unseen)} writes guest RAM from another process "
            f"and cannot log those writes for hvf's dirty log")


class DirtyLog:
    """Dirty tracking of one machine's RAM, for the length of one migration."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.memory = vm.memory
        protect = vm.vmfd.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        self.manual = bool(protect & lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self._protect = protect & (lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                                   | lib.KVM_DIRTY_LOG_INITIALLY_SET)
        self._bitmaps: list[Any] = [ffi.new("uint64_t[]", -(-r.size // (64 * PAGE)))
                                    for r in self.memory.regions]
        self.active = False

    def start(self) -> None:
        """Log from now on (call it with the VM paused); what was written before is the
        caller's to send."""
        if self.manual:
            self.vm.vmfd.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, self._protect)
        self.reset_written()
        self.vm.log_dirty_pages(True)
        for device in self.vm.devices:  # back ends writing from another process
            device.log_writes(True)
        self.active = True
        self.harvest()  # with INITIALLY_SET every bit starts set: protect every page

    def harvest(self) -> list[Run]:
        """The pages the guest wrote since the last harvest (since :meth:`start`)."""
        runs: list[Run] = []
        vmfd = self.vm.vmfd
        for slot, (region, bitmap) in enumerate(zip(self.memory.regions, self._bitmaps)):
            pages = region.size // PAGE
            vmfd.get_dirty_log(slot, bitmap)
            words = memoryview(ffi.buffer(bitmap)).cast("Q")
            found = bitmap_runs(words, region.file_offset // PAGE)
            if found and self.manual:
                vmfd.clear_dirty_log(slot, 0, pages, bitmap)
            runs += found
        outside = [device.logged_writes() for device in self.vm.devices]
        return union(runs, *outside) if any(outside) else runs

    def hvf_written(self) -> list[Run]:
        """Every page hvf handed out or wrote since :meth:`start`, and every ring's (call
        it with the VM paused: they are final only then)."""
        written = self.memory.written
        marked = mark_runs(written) if written is not None else []
        rings = [(offset // PAGE, (offset + length - 1) // PAGE - offset // PAGE + 1)
                 for offset, length in self.memory.rings.values() if length > 0]
        return union(marked, rings)

    def reset_written(self) -> None:
        """Forget hvf's marks so far (they are saved: call it with the VM paused)."""
        self.memory.written = bytearray(self.memory.size // PAGE)

    def stop(self) -> None:
        """Stop logging (the VM runs on as before)."""
        if self.active:
            self.active = False
            self.vm.log_dirty_pages(False)
            for device in self.vm.devices:
                device.log_writes(False)
            self.memory.written = None
