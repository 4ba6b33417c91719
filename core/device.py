# SPDX-License-Identifier: BSD-2-Clause
"""The base class of everything that attaches to a machine.

A device never holds the machine. When the machine attaches it, the device is handed
its :class:`~hvf.context.DeviceContext` (``attach(ctx)``): the port and MMIO buses, the
interrupt controller its lines and MSI vectors come from, guest memory and DMA, the I/O
thread's loop, its own configuration subtree (``ctx.config``, relative to ``pci.B.S.F``
or ``lpc.NAME``; ``ctx.machine_config`` for the whole tree), the guest-error log,
doorbells (``ctx.ioevent``), console backends (``ctx.open_console``),
``ctx.request_exit``, lookups of other devices and, for buses, ``ctx.attach`` of
children. A device keeps the context (or just what it uses) for later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from hvf.bootorder import BootEntry
    from hvf.context import DeviceContext
    from hvf.snapshot_api import Upgrade


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
    #: False when the device's back end writes guest RAM from outside hvf (another
    #: process: a vhost-user back end) and cannot log those writes (:meth:`log_writes`):
    #: a migration that copies RAM and an incremental checkpoint then refuse the machine.
    dirty_tracked: bool = True

    def __init__(self, name: str) -> None:
        self.name = name

    def attach(self, ctx: DeviceContext) -> None:
        """Register I/O ranges and take interrupt lines through ``ctx``."""

    def save_state(self) -> dict[str, Any]:
        """The device's state as named plain values (empty for stateless devices)."""
        return {}

    def restore_state(self, fields: dict[str, Any], version: int) -> None:
        """Load fields of :attr:`state_version` into a device attached but not running.

        ``version`` is always :attr:`state_version`: older chunks arrive upgraded.
        Raise ``ValueError`` naming the field for anything :meth:`save_state` could not
        have written; the core reports it as malformed state of this device's chunk.
        """

    def log_writes(self, on: bool) -> None:
        """Start (with the machine paused) or stop logging the guest-RAM writes the
        device's back end makes outside hvf; nothing for a device whose writes go through
        hvf (its DMA views are marked already)."""

    def logged_writes(self) -> list[tuple[int, int]]:
        """The pages the back end wrote outside hvf since logging started or the last
        call: sorted ``(first page, count)`` runs in the RAM file's layout."""
        return []

    def boot_entries(self) -> Sequence[BootEntry]:
        """What the firmware may boot from this device, with the ``bootindex`` it was
        given (none by default): see :mod:`hvf.bootorder` for the device paths."""
        return ()

    def stats(self) -> dict[str, Any]:
        """Counters for ``hvf ctl status`` (none unless the device keeps some)."""
        return {}

    def close(self) -> None:
        """Release host resources; called once when the VM stops."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
