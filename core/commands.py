# SPDX-License-Identifier: BSD-2-Clause
"""The core's ``hvf ctl`` commands: status, pause/resume, power-off, checkpoints, and
the ``registers`` and ``iomap`` views for debugging a guest."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvf
from hvf import exitcodes, snapshot
from hvf.errors import SnapshotError

if TYPE_CHECKING:
    from hvf.registry import CtlCommands
    from hvf.vm import Machine


class CommandsPlugin:
    """Registers the built-in control commands."""

    @hvf.hookimpl
    def hvf_register_ctl_commands(self, commands: CtlCommands) -> None:
        commands.add("status", _status, help="show the VM's state")
        commands.add("pause", _pause, help="stop the vCPUs")
        commands.add("resume", _resume, help="let the vCPUs run again")
        commands.add("poweroff", _poweroff, help="stop the VM (exit status 1)")
        commands.add("registers", _registers, help="the vCPUs' registers (paused briefly)")
        commands.add("iomap", _iomap, help="the registered I/O port and MMIO ranges")
        commands.add("checkpoint", _checkpoint, help="write a snapshot; the VM runs on")
        commands.add("suspend", _suspend,
                     help="write a snapshot and stay paused (--exit: then stop)")



def _status(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": vm.name,
        "state": "paused" if vm.paused else "running",
        "cpus": vm.ncpus,
        "memory": vm.memory.size,
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - vm.started_at, 3) if vm.started_at else 0,
        "emulated": dict(vm.emulated),
        "devices": {d.name: stats for d in vm.devices if (stats := d.stats())},
    }


def _pause(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    if not vm.paused:
        vm.pause()
    return {"state": "paused"}


def _resume(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    if vm.paused:
        vm.resume()
    return {"state": "running"}


def _registers(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    was_paused = vm.paused
    if not was_paused:
        vm.pause()
    try:
        return {f"vcpu{v.index}": v.register_dump() for v in vm.vcpus}
    finally:
        if not was_paused:
            vm.resume()


def _iomap(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    def describe(ranges: Any) -> list[dict[str, Any]]:
        return [{"base": r.base, "length": r.length, "owner": r.owner} for r in ranges]

    return {"ports": describe(vm.pio.ranges()), "mmio": describe(vm.mmio.ranges())}


def _poweroff(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    vm.request_exit(exitcodes.POWEROFF, "powered off by hvf ctl")
    return {"state": "stopping"}


def _snapshot_path(args: dict[str, Any]) -> Path:
    path = args.get("path")
    if not isinstance(path, str) or not path:
        raise SnapshotError("a snapshot path is needed")
    return Path(path)


def _checkpoint(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    return snapshot.save(vm, _snapshot_path(args), leave_paused=False,
                         incremental=args.get("incremental") is True,
                         progress=args.get("_progress"))


def _suspend(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    result = snapshot.save(vm, _snapshot_path(args), leave_paused=True,
                           incremental=args.get("incremental") is True,
                           progress=args.get("_progress"))
    if args.get("exit"):
        vm.request_exit(exitcodes.REBOOT, f"suspended to {result['path']}")
        result["state"] = "stopping"
    else:
        result["state"] = "paused"
    return result
