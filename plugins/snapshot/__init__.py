# SPDX-License-Identifier: BSD-2-Clause
"""The snapshot plugin: where checkpoints go on disk.

A snapshot is a directory (:mod:`.store`) holding a RAM file (:mod:`.ramfile`: sparse,
mapped copy-on-write on restore) and a state file (:mod:`.statefile`: self-describing,
versioned chunks).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import hvf
from hvf.pluginmanager import lazy

if TYPE_CHECKING:
    from hvf.registry import Registry
    from hvf.vm import Machine


@hvf.hookimpl
def hvf_register_snapshot_backends(registry: Registry) -> None:
    registry.add("directory", lazy(f"{__name__}.store:SnapshotStore"),
                 help="a directory with a sparse RAM file (mapped copy-on-write on restore) "
                      "and a self-describing, versioned, checksummed state file")


@hvf.hookimpl
def hvf_vm_stop(vm: Machine, status: int) -> None:
    store = sys.modules.get(f"{__name__}.store")  # nothing to clean up before it is loaded
    if store is not None:
        store.wait_for_cleanups()
