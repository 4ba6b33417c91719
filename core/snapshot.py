# SPDX-License-Identifier: BSD-2-Clause
"""Checkpoint and restore of a whole machine, and the core's control commands.

Saving: every vCPU is stopped outside ``KVM_RUN`` (pending port or MMIO accesses
completed), the I/O thread is suspended so no backend touches a device, then the core
saves KVM's VM and vCPU state and every attached device's fields (one chunk per
device, at its state version), and the snapshot backend writes RAM and state.
Restoring rebuilds the machine from the snapshot's own configuration, maps its RAM
copy-on-write and loads every chunk, each device's upgraded from the version it was
written with; a chunk nobody takes makes the restore fail.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvf
from hvf import cpumodel, vmstate
from hvf.config import Config
from hvf.errors import SnapshotError
from hvf.incremental import base_of as incremental_base
from hvf.incremental import track as track_checkpoint
from hvf.memory import PAGE_SHIFT
from hvf.snapshot_api import Chunk, StateReader, StateWriter, upgrade

if TYPE_CHECKING:
    from hvf.cpumodel import CpuProfile
    from hvf.device import Device
    from hvf.vm import Machine

log = logging.getLogger("hvf.snapshot")

CORE_OWNER = "hvf"
Progress = Callable[[int, int], None]

#: Configuration a restore may change: where consoles go, network back ends, vhost-user
#: sockets, the VM's name.
OVERRIDABLE = ("name", "config.dump", "lpc.debugcon.path", "control.")


def overridable(key: str) -> bool:
    if key.startswith(OVERRIDABLE):
        return True
    parts = key.split(".")
    if parts[0] == "pci" and parts[-1] in ("backend", "socket"):
        return True  # pci.B.S.F.backend: a network card's tap; .socket: a vhost-user daemon
    # lpc.comN.path, pci.B.S.F.path: console backends
    return parts[-1] == "path" and (parts[0] == "pci" or (parts[0] == "lpc" and parts[1].startswith("com")))


def config_differences(saved: Config, given: Config) -> list[str]:
    """Settings given with ``-r`` that contradict the snapshot (console paths excepted)."""
    saved_values = saved.as_dict()
    return [
        f"{key}={value} (the snapshot has {saved_values[key] if key in saved_values else 'no ' + key})"
        for key, value in given.items()
        if not overridable(key) and saved_values.get(key) != value
    ]


_snapshot_lock = threading.Lock()


def save(vm: Machine, path: Path, *, leave_paused: bool, incremental: bool = False,
         progress: Progress | None = None) -> dict[str, Any]:
    """Write a snapshot of ``vm`` to ``path``; returns a summary. ``incremental`` writes
    only the pages dirtied since the VM's last checkpoint (:mod:`hvf.incremental`)."""
    backend = vm.plugins.snapshot_backends.get("directory")
    if backend is None:
        raise SnapshotError("no snapshot backend is installed (the 'snapshot' plugin)")
    if not _snapshot_lock.acquire(blocking=False):
        raise SnapshotError("another checkpoint of this VM is in progress")
    try:
        base = incremental_base(vm) if incremental else None
        was_paused = vm.paused
        started = time.monotonic()
        if not was_paused:
            vm.pause()
        try:
            writer = StateWriter()
            vm.hook.hvf_state_save(vm=vm, state=writer)
            machine = {
                "memory_size": vm.memory.size,
                "cpus": vm.ncpus,
                "config": vm.config.as_dict(),
            }
            store = backend.factory(path)
            chunks = list(writer.chunks.values())
            if base is None:
                ram = store.save(memory=vm.memory, machine=machine, chunks=chunks,
                                 progress=progress, background_cleanup=True)
                written = int(ram.get("data_bytes", 0))
            else:
                dirty = base.dirty()
                ram = store.save_incremental(
                    memory=vm.memory, machine=machine, chunks=chunks, base=base.path,
                    base_ram=base.ram, dirty=dirty, progress=progress,
                    background_cleanup=True)
                written = sum(count for _, count in dirty) << PAGE_SHIFT
            track_checkpoint(vm, path, ram)
        finally:
            if not was_paused and not leave_paused:
                vm.resume()
        return {"path": str(path), "chunks": len(writer.chunks), "incremental": incremental,
                "ram_bytes_written": written, "seconds": round(time.monotonic() - started, 3)}
    finally:
        _snapshot_lock.release()


def restore(vm: Machine, chunks: StateReader) -> None:
    """Load every chunk into a machine built from the snapshot's configuration."""
    vm.hook.hvf_state_restore(vm=vm, state=chunks)
    left = chunks.untaken()
    if left:
        names = ", ".join(f"{c.name} (from {c.owner})" for c in left)
        raise SnapshotError(f"the snapshot holds state that no installed plugin restores: {names}")


def saved_cpu(chunks: Iterable[Chunk]) -> CpuProfile | None:
    """The CPU a snapshot's guest was given (its ``cpu`` chunk), to build the machine
    with; None for a snapshot from before hvf kept it, whose guest gets what its
    configuration describes on this host."""
    chunk = next((c for c in chunks if c.name == cpumodel.CHUNK), None)
    if chunk is None:
        return None
    try:
        return cpumodel.CpuProfile.from_fields(upgrade(chunk, cpumodel.CHUNK_VERSION, {}))
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{chunk.name}: malformed saved state ({e})") from None


def chunk_name(device: Device) -> str:
    """The name of ``device``'s chunk (owned by the module of its class)."""
    return f"device.{device.name}"


def restore_device(device: Device, chunk: Chunk) -> None:
    """Load ``chunk``, written with any state version ``device`` knows, into it.

    Fields of an older version go through the device's ``state_upgrades`` first; a
    chunk newer than the device's ``state_version`` and fields the device refuses are
    errors naming the chunk.
    """
    try:
        fields = upgrade(chunk, device.state_version, device.state_upgrades)
        device.restore_state(fields, device.state_version)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise SnapshotError(f"{chunk.name}: malformed saved state ({e})") from None


class CorePlugin:
    """The core's snapshot hooks: KVM's VM and vCPU state, and every device's fields."""

    @hvf.hookimpl
    def hvf_state_save(self, vm: Machine, state: StateWriter) -> None:
        xsave_size = vmstate.xsave_size(vm)
        msrs = vm.kvm.msr_index_list()
        state.add(name=cpumodel.CHUNK, owner=CORE_OWNER, version=cpumodel.CHUNK_VERSION,
                  fields=vm.cpu.to_fields())
        state.add(name="vm", owner=CORE_OWNER, version=vmstate.VM_STATE_VERSION,
                  fields=vmstate.save_vm(vm))
        for vcpu in vm.vcpus:
            state.add(name=f"vcpu.{vcpu.index}", owner=CORE_OWNER,
                      version=vmstate.VCPU_STATE_VERSION,
                      fields=vmstate.save_vcpu(vcpu, msrs, xsave_size))
        for device in vm.devices:
            state.add(name=chunk_name(device), owner=type(device).__module__,
                      version=device.state_version, fields=device.save_state())

    @hvf.hookimpl
    def hvf_state_restore(self, vm: Machine, state: StateReader) -> None:
        cpu = saved_cpu([state.take(cpumodel.CHUNK)]) if state.has(cpumodel.CHUNK) else None
        if cpu is not None and cpu != vm.cpu:  # a machine not built with it (saved_cpu)
            vm.cpu = cpumodel.apply(vm, cpu)  # before any vCPU state: KVM checks it
        vmstate.restore_vm(vm, upgrade(state.take("vm"), vmstate.VM_STATE_VERSION, {}))
        for device in vm.devices:
            name = chunk_name(device)
            if not state.has(name):
                # A device that did not exist when the snapshot was made (added by a
                # later hvf): it starts from its reset state.
                log.warning("the snapshot has no state for %s; it starts from reset", device.name)
                continue
            restore_device(device, state.take(name))
        xsave_size = vmstate.xsave_size(vm)
        for vcpu in vm.vcpus:
            fields = upgrade(state.take(f"vcpu.{vcpu.index}"), vmstate.VCPU_STATE_VERSION, {})
            vmstate.restore_vcpu(vcpu, fields, xsave_size)
