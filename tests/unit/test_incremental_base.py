# SPDX-License-Identifier: BSD-2-Clause
"""What an incremental checkpoint builds on, and when there is nothing it may build on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hvf.device import Device
from hvf.errors import SnapshotError
from hvf.incremental import base_of
from hvf.migration.dirty import unseen_writers


class Unlogged(Device):
    """A device whose back end writes guest RAM from elsewhere, without a log."""

    dirty_tracked = False


def machine(*devices: Device) -> SimpleNamespace:
    return SimpleNamespace(devices=list(devices), checkpoint_base=None)


def test_a_machine_never_checkpointed_has_no_base() -> None:
    with pytest.raises(SnapshotError, match="take a full checkpoint first"):
        base_of(machine(Device("rtc")))  # type: ignore[arg-type]


def test_a_back_end_writing_unlogged_refuses_incremental_checkpoints() -> None:
    vm = machine(Device("rtc"), Unlogged("disk@pci.0.3.0"))
    assert unseen_writers(machine(Device("rtc"))) is None  # type: ignore[arg-type]
    reason = unseen_writers(vm)  # type: ignore[arg-type]
    assert reason is not None and "disk@pci.0.3.0" in reason and "rtc" not in reason
    vm.checkpoint_base = object()  # even with a base: its log would miss pages
    with pytest.raises(SnapshotError, match=r"disk@pci\.0\.3\.0 .*take a full checkpoint"):
        base_of(vm)  # type: ignore[arg-type]
