# SPDX-License-Identifier: BSD-2-Clause
"""Doorbells that never reach the vCPU loop: ``KVM_IOEVENTFD``.

An :class:`IoEvent` is an eventfd that KVM signals, inside the kernel, when the guest
writes ``length`` bytes (equal to ``datamatch`` when given) at a guest-physical
address or I/O port; the vCPU goes straight back into the guest. The device's back end
waits on :attr:`IoEvent.fd` on its own thread. A device binds an IoEvent where its
register currently is, and rebinds it when the guest moves the BAR.
"""

from __future__ import annotations

import os
from typing import Protocol


class IoEventBackend(Protocol):
    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None: ...


class IoEvent:
    """One doorbell register backed by an eventfd."""

    def __init__(self, backend: IoEventBackend, length: int, *, datamatch: int | None = None,
                 pio: bool = False) -> None:
        self.backend = backend
        self.length = length
        self.datamatch = datamatch
        self.pio = pio
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: Where the doorbell is bound now (None: not bound, writes exit to user space).
        self.address: int | None = None

    def bind(self, address: int | None) -> None:
        """Move the doorbell to ``address`` (None: unbind)."""
        if address == self.address:
            return
        if self.address is not None:
            self._ioctl(self.address, deassign=True)
            self.address = None
        if address is not None:
            self._ioctl(address, deassign=False)
            self.address = address

    def _ioctl(self, address: int, *, deassign: bool) -> None:
        self.backend.ioeventfd(self.fd, address, self.length, datamatch=self.datamatch,
                               pio=self.pio, deassign=deassign)

    def signal(self) -> None:
        """Ring the doorbell from user space (a write that did reach the vCPU loop)."""
        os.eventfd_write(self.fd, 1)

    def consume(self) -> int:
        """Take the doorbell's count (0 when it was not rung)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            self.bind(None)
            os.close(self.fd)
            self.fd = -1
