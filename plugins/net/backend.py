# SPDX-License-Identifier: BSD-2-Clause
"""What a virtio-net device needs of its host side, and the registry of back-end types.

A :class:`NetBackend` carries Ethernet frames for one or more queue pairs. The device
calls it on the I/O thread only: it waits for :meth:`~NetBackend.fileno` to be
readable, then takes frames with :meth:`~NetBackend.receive` straight into guest
buffers, and hands guest frames to :meth:`~NetBackend.send` as views of guest RAM.
A back end with :attr:`~NetBackend.vnet_header` moves each frame behind a 12-byte
``virtio_net_hdr`` both ways (checksum and segmentation offloads pass through); one
without moves bare frames, and the device adds and strips the header itself.

A back end type registers a factory under its name (:func:`register_backend`); the
configuration's ``backend`` value picks one by prefix as bhyve does (``slirp`` →
slirp, a ``netgraph``/``netmap:``/``vale`` name → those, anything else a tap name),
or ``type`` names it outright.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hvf.errors import ConfigError
from hvf.plugins.net.spec import HEADER_SIZE

Views = Sequence[memoryview]


class NetBackend:
    """A host side of a virtio-net device (subclassed by each back-end type)."""

    #: Frames carry a virtio_net_hdr (12 bytes) in both directions.
    vnet_header = False
    #: F_GUEST_* offload bits this back end can deliver to the guest.
    guest_offloads = 0
    #: F_CSUM / F_HOST_* offload bits it accepts from the guest.
    host_offloads = 0
    #: :meth:`fileno` itself moves one whole frame, vnet header first, per ``writev``
    #: and per ``readv`` (returning its whole length), as :meth:`send` and
    #: :meth:`receive` do: the device may move frames on it in C.
    frame_fd = False

    def __init__(self, name: str, pairs: int) -> None:
        #: For messages and stats: "tap tap0", "slirp".
        self.name = name
        #: Queue pairs it serves (each with its own descriptor).
        self.pairs = pairs

    def fileno(self, pair: int) -> int:
        """The descriptor that is readable while a frame waits for queue pair ``pair``."""
        raise NotImplementedError

    def receive(self, pair: int, views: Views) -> int:
        """Read one frame into ``views`` and return its length (the header counted).
        Raises BlockingIOError when none waits; bytes past the views are lost, so a
        length above their room means the frame did not fit."""
        raise NotImplementedError

    def send(self, pair: int, views: Views) -> None:
        """Send one frame (after its header when :attr:`vnet_header`); OSError when the
        host refuses it, BlockingIOError when it cannot take it now."""
        raise NotImplementedError

    def set_offloads(self, guest_features: int) -> None:
        """The F_GUEST_* bits the driver negotiated: what frames may now carry to it."""

    def set_active_pairs(self, count: int) -> None:
        """Only the first ``count`` pairs are used by the driver now (VQ_PAIRS_SET)."""

    def announce(self, frame: bytes) -> None:
        """Send a frame of the device's own (a gratuitous ARP after a restore)."""
        self.send(0, [memoryview(bytes(HEADER_SIZE) + frame if self.vnet_header else frame)])

    def stats(self) -> dict[str, Any]:
        """Counters the host keeps for this back end (drops, say)."""
        return {}

    def close(self) -> None:
        """Release the host side (a tap hvf created goes away)."""


#: Makes a back end: (the ``backend`` value, the device's configuration values, queue
#: pairs, the device's name for messages).
BackendFactory = Callable[[str, dict[str, str], int, str], NetBackend]

_TYPES: dict[str, BackendFactory] = {}
#: bhyve's back-end types by the prefix of their name, the first match wins.
_PREFIXES = (("slirp", "slirp"), ("netgraph", "netgraph"), ("netmap:", "netmap"),
             ("vale", "netmap"))


def register_backend(kind: str, factory: BackendFactory) -> None:
    """Make back-end type ``kind`` available (a plugin's ``slirp``, say)."""
    _TYPES[kind] = factory


def backend_kind(name: str, explicit: str | None) -> str:
    """The back-end type for ``backend`` value ``name``: ``type`` when given, else by
    prefix, else ``tap``."""
    if explicit:
        return explicit
    return next((kind for prefix, kind in _PREFIXES if name.startswith(prefix)), "tap")


def open_backend(values: dict[str, str], pairs: int, where: str) -> NetBackend:
    """The back end the device's configuration names (``backend``, ``type``)."""
    name = values.get("backend", "")
    if not name:
        raise ConfigError(f"{where}: no network back end given (e.g. tap0)")
    kind = backend_kind(name, values.get("type"))
    factory = _TYPES.get(kind)
    if factory is None:
        known = ", ".join(sorted(_TYPES)) or "none"
        raise ConfigError(f"{where}: unknown network back end '{name}' (type '{kind}'; "
                          f"this hvf has: {known})")
    return factory(name, values, pairs, where)
