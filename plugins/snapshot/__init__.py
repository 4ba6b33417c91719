# SPDX-License-Identifier: BSD-2-Clause
"""The snapshot plugin: where checkpoints go on disk.

A snapshot is a directory (:mod:`.store`) holding a RAM file (:mod:`.ramfile`: sparse,
mapped copy-on-write on restore) and a state file (:mod:`.statefile`: self-describing,
versioned chunks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hvf
from hvf.plugins.snapshot import ramfile, statefile, store

if TYPE_CHECKING:
    from hvf.registry import Registry
    from hvf.vm import Machine


@hvf.hookimpl
def hvf_register_snapshot_backends(registry: Registry) -> None:
    registry.add("directory", store.SnapshotStore,
                 help="a directory with a RAM file and a state file (the default)")
    registry.add("ram-file", ramfile.save_ram, help="guest RAM, sparse, mapped copy-on-write")
    registry.add("state-file", statefile.write_state,
                 help="self-describing, versioned, checksummed device state")


@hvf.hookimpl
def hvf_vm_stop(vm: Machine, status: int) -> None:
    store.wait_for_cleanups()
