# SPDX-License-Identifier: BSD-2-Clause
"""What an incremental checkpoint builds on: the VM's last checkpoint, and the pages
dirtied since it was taken.

After every checkpoint (and suspend) the VM keeps KVM's dirty log of guest RAM, with
hvf's own marks for what its devices write (:class:`hvf.migration.dirty.DirtyLog`).
``hvf ctl checkpoint --incremental DIR`` then writes only those pages, as a layer over
that checkpoint (Firecracker's diff snapshots). Between checkpoints this costs the
guest one write fault per page it dirties, and nothing for a VM never checkpointed.

A VM restored with ``-r`` from a RAM file mapped copy-on-write builds on that
snapshot without a dirty log: its private pages are exactly those written since (or
read from the snapshot's layers). A migration takes the dirty log over, so after one
the next incremental checkpoint is refused until a full one is taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvf.errors import SnapshotError
from hvf.extents import PAGE, private_extents

if TYPE_CHECKING:
    from hvf.migration.dirty import DirtyLog
    from hvf.migration.pages import Run
    from hvf.vm import Machine


class CheckpointBase:
    """The snapshot in ``path`` (its ``ram`` section ``ram``) that VM ``vm`` last wrote
    or was restored from, and how to find what its guest changed since."""

    def __init__(self, vm: Machine, path: Path, ram: dict[str, Any],
                 log: DirtyLog | None) -> None:
        self.vm = vm
        self.path = path
        self.ram = ram
        self.log = log
        #: Runs harvested for a save that then failed: still to be written.
        self._pending: list[Run] = []

    def dirty(self) -> list[Run]:
        """Every page written since the base was taken (call with the VM paused)."""
        from hvf.migration.pages import union

        memory = self.vm.memory
        if self.log is None:
            found = [(start // PAGE, (end - start) // PAGE) for start, end in
                     private_extents(memory.host_addr, memory.size, coalesce=0)]
        else:
            found = union(self.log.harvest(), self.log.hvf_written())
        self._pending = union(self._pending, found)
        return self._pending

    def stop(self) -> None:
        """Stop the dirty log (the VM runs on without it)."""
        if self.log is not None:
            self.log.stop()
            self.log = None


def track(vm: Machine, path: Path, ram: dict[str, Any], *, log: bool = True) -> None:
    """Make the snapshot just written to (or restored from) ``path`` the base of the
    next incremental checkpoint of ``vm``, which is paused; with ``log``, dirty
    logging starts (or restarts) now."""
    old = vm.checkpoint_base
    dirty_log = old.log if old is not None else None
    if log:
        if dirty_log is None:
            from hvf.migration.dirty import DirtyLog

            dirty_log = DirtyLog(vm)
            dirty_log.start()
        else:  # what it logged is in the snapshot now: start over
            dirty_log.harvest()
            dirty_log.reset_written()
    vm.checkpoint_base = CheckpointBase(vm, Path(path).absolute(), ram, dirty_log)


def forget(vm: Machine) -> None:
    """Drop the base (a migration takes the dirty log over)."""
    if vm.checkpoint_base is not None:
        vm.checkpoint_base.stop()
        vm.checkpoint_base = None


def base_of(vm: Machine) -> CheckpointBase:
    """The base an incremental checkpoint of ``vm`` builds on, or why there is none."""
    from hvf.migration.dirty import unseen_writers

    unseen = unseen_writers(vm)
    if unseen is not None:
        raise SnapshotError(f"an incremental checkpoint writes only the pages logged as "
                            f"dirty, but {unseen}: take a full checkpoint")
    if vm.checkpoint_base is None:
        raise SnapshotError("an incremental checkpoint writes what changed since this VM's "
                            "last checkpoint (or the snapshot it was restored from), and it "
                            "has none since it started or migrated: take a full checkpoint "
                            "first")
    return vm.checkpoint_base
