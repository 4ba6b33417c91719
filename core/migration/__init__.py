# SPDX-License-Identifier: BSD-2-Clause
"""Live migration: ``hvf ctl migrate URI`` moves a running VM to ``hvf --incoming URI``.

The stream, version 2 (:data:`hvf.migration.handshake.PROTOCOL`)
--------------------------------------------------------------------

Frames (:mod:`.stream`): ``b"HVFM"``, u16 type, u16 flags (0), u32 payload length, u32
checksum of the header's first 12 bytes and the payload, then the payload. The checksum
is CRC-32C, except in HELLO, READY and REFUSE, which keep version 1's CRC-32 so that
two versions can tell each other apart. The conversation, source (S) and destination
(D)::

    S → D  HELLO    JSON: hvf's version, protocol 2, the state format, the page size,
                    the RAM mode, the machine (RAM size, CPUs, configuration) and each
                    vCPU's CPUID (:mod:`.handshake`); with --local, guest RAM's
                    descriptor rides along (SCM_RIGHTS)
    D → S  READY    JSON {"hvf_version", "protocol"}: D checked the offer (versions,
                    sizes, the CPU against its KVM, the VM's name free) and built the
                    machine; or REFUSE {"reason"} and D exits
    S → D  PAGES    ×N, pre-copy while the guest runs: a run table and the pages
                    (:mod:`.pages`), each inside guest RAM
    (S pauses the guest)
    S → D  PAGES    ×N, the pages written since they were sent
    S → D  STATE    the snapshot chunks of KVM, vCPU and device state (:mod:`.chunks`)
    D → S  LOADED   {}: D restored every chunk (or REFUSE; S resumes its guest)
    S → D  GO       {}: S gave up the VM's name; D may run the guest
    D → S  RUNNING  {}: D took the name and runs the guest; S exits with status 0

Either side may send REFUSE {"reason"} instead of its next message; the other then
stops. D validates everything before S pauses the guest, except the state, which
exists only then: a refusal of it still leaves S running. D never runs the guest
without GO, and S never runs it again after GO unless D refuses; if D's answer to GO
is lost, S stays paused and says so (only one of them may run the guest).

Exit statuses: after a successful migration the source exits with 0, as after
``hvf ctl suspend --exit`` (bhyve has no migration; 0 is its status for a VM that
stopped cleanly); ``hvf ctl migrate`` exits 0 and prints the figures. A failed
migration leaves the source running and ``hvf ctl migrate`` exits 1 saying why; the
destination discards what it received and exits with 4.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

import hvf
from hvf.errors import MigrationError

if TYPE_CHECKING:
    from hvf.migration.source import Migration
    from hvf.registry import CtlCommands
    from hvf.vm import Machine

#: The longest downtime one may ask for (QEMU's limit: 2000 s).
MAX_DOWNTIME_MS = 2_000_000

_lock = threading.Lock()
_current: Migration | None = None


@hvf.hookimpl
def hvf_register_ctl_commands(commands: CtlCommands) -> None:
    commands.add("migrate", migrate_command,
                 help="move the running VM to 'hvf --incoming URI' (cancel=true: stop the "
                      "migration in progress; query=true: its figures)")


def _number(args: dict[str, Any], key: str, default: float | None, low: float,
            high: float) -> float | None:
    value = args.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise MigrationError(f"migrate: {key} must be a number from {low:g} to {high:g}, "
                             f"not {value!r}")
    return float(value)


def migrate_command(*, vm: Machine, args: dict[str, Any]) -> dict[str, Any]:
    """The ``migrate`` control command (``hvf ctl migrate``)."""
    global _current
    from hvf import incremental, snapshot
    from hvf.migration.source import DEFAULT_DOWNTIME_MS, Migration
    from hvf.migration.stream import parse_uri

    current = _current
    if args.get("cancel"):
        if current is None:
            raise MigrationError("no migration is in progress")
        current.cancelled.set()
        return {"state": "cancelling"}
    if args.get("query"):
        return current.figures() if current is not None else {"state": "none"}
    uri = args.get("uri")
    if not isinstance(uri, str):
        raise MigrationError("migrate needs a destination: tcp:HOST:PORT or unix:PATH")
    downtime = _number(args, "downtime_ms", DEFAULT_DOWNTIME_MS, 1, MAX_DOWNTIME_MS)
    bandwidth = _number(args, "bandwidth", 0, 0, 1e9)  # MB/s
    timeout = _number(args, "timeout", None, 0, 1e9)
    if vm.paused:
        raise MigrationError("the VM is paused: resume it before migrating it")
    assert downtime is not None and bandwidth is not None
    migration = Migration(vm, parse_uri(uri), downtime_ms=downtime, bandwidth=bandwidth * 1e6,
                          timeout=timeout or None, local=bool(args.get("local")),
                          progress=args.get("_progress"))
    if not _lock.acquire(blocking=False):
        raise MigrationError("a migration of this VM is already in progress")
    # A checkpoint pauses and resumes the VM: none may run while this one migrates.
    checkpoints = snapshot._snapshot_lock
    if not checkpoints.acquire(blocking=False):
        _lock.release()
        raise MigrationError("a checkpoint of this VM is in progress; migrate it afterwards")
    try:
        _current = migration
        incremental.forget(vm)  # the migration's dirty log replaces the checkpoints' one
        try:
            return migration.run()
        except MigrationError as e:
            raise MigrationError(f"migration to {uri} failed: {e}; the VM runs on here"
                                 if migration.phase != "unknown" else str(e)) from None
    finally:
        _current = None
        checkpoints.release()
        _lock.release()
