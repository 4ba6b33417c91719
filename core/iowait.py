# SPDX-License-Identifier: BSD-2-Clause
"""Waiting for descriptors with poll(2).

``select(2)`` cannot take a descriptor above 1023, which a VM with many devices (or a
process that builds many machines, as a test run does) soon has; these helpers take any.
"""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Protocol, TypeVar, Union


class HasFileno(Protocol):
    def fileno(self) -> int: ...


F = TypeVar("F", bound=Union[int, HasFileno])

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR


def _fileno(f: int | HasFileno) -> int:
    return f if isinstance(f, int) else f.fileno()


def readable(fds: Sequence[F], timeout: float | None = None) -> list[F]:
    """Those of ``fds`` that are readable (or hung up) within ``timeout`` seconds
    (None: wait for one); empty when the time ran out."""
    poller = select.poll()
    for f in fds:
        poller.register(_fileno(f), _READ)
    ready = {fd for fd, _ in poller.poll(None if timeout is None else max(0, timeout) * 1000)}
    return [f for f in fds if _fileno(f) in ready]


def writable(fd: int | HasFileno, timeout: float | None = None) -> bool:
    """Whether ``fd`` can be written (or is hung up) within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(_fileno(fd), _WRITE)
    return bool(poller.poll(None if timeout is None else max(0, timeout) * 1000))
