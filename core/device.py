# SPDX-License-Identifier: BSD-2-Clause
"""The base class of everything that attaches to a machine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from hvf.snapshot_api import Upgrade
    from hvf.vm import Machine


class Device:
    """A device model: attaches once, answers I/O through handlers it registers.

    A subclass keeps its guest-visible state in a plain record (an attrs class with
    ``to_fields()`` and a validating ``from_fields()``, as
    :class:`hvf.plugins.uart.model.UartState`) and its behaviour around it. The core
    snapshots every attached device itself: it saves :meth:`save_state` as one chunk,
    ``device.NAME``, tagged with :attr:`state_version`; on restore it brings that
    chunk's fields from the version they were written with to :attr:`state_version`
    through :attr:`state_upgrades` (refusing a newer chunk) and hands them to
    :meth:`restore_state`. A device needs no snapshot hook of its own.
    """

    #: Version of the fields returned by :meth:`save_state`; bump on incompatible change.
    state_version: ClassVar[int] = 1
    #: ``{v: f}``: ``f(fields)`` turns version-v fields into version v+1 fields, so that
    #: snapshots made by earlier versions of the device still restore. The fields are
    #: untrusted: ``f`` raises ``ValueError`` naming a field it cannot convert.
    state_upgrades: ClassVar[Mapping[int, Upgrade]] = {}

    def __init__(self, name: str) -> None:
        self.name = name

    def attach(self, vm: Machine) -> None:
        """Register I/O ranges and interrupt lines on ``vm``."""

    def save_state(self) -> dict[str, Any]:
        """The device's state as named plain values (empty for stateless devices)."""
        return {}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        """Load fields of :attr:`state_version` into a device attached but not running.

        ``version`` is always :attr:`state_version`: older chunks arrive upgraded.
        Raise ``ValueError`` naming the field for anything :meth:`save_state` could not
        have written; the core reports it as malformed state of this device's chunk.
        """

    def close(self) -> None:
        """Release host resources; called once when the VM stops."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
