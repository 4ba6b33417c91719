# SPDX-License-Identifier: BSD-2-Clause
"""The base class of everything that attaches to a machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvf.vm import Machine


class Device:
    """A device model: attaches once, answers I/O through handlers it registers.

    Subclasses keep their guest-visible state in a plain record and expose it through
    :meth:`save_state` / :meth:`restore_state` (named fields plus :attr:`state_version`),
    so that a snapshot needs nothing else from them.
    """

    #: Version of the fields returned by :meth:`save_state`; bump on incompatible change.
    state_version = 1
    #: ``{v: f}``: ``f(fields)`` turns version-v fields into version v+1 fields, so that
    #: snapshots made by earlier versions of the device still restore.
    state_upgrades: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}

    def __init__(self, name: str) -> None:
        self.name = name

    def attach(self, vm: Machine) -> None:
        """Register I/O ranges and interrupt lines on ``vm``."""

    def save_state(self) -> dict[str, Any]:
        """The device's state as named plain values (empty for stateless devices)."""
        return {}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        """Load state saved by :meth:`save_state`; older versions arrive upgraded."""

    def close(self) -> None:
        """Release host resources; called once when the VM stops."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
