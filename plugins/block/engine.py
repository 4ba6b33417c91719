# SPDX-License-Identifier: BSD-2-Clause
"""The choice of block engine, in one place: :func:`new_backend` gives a front end its
back end, on worker threads (:class:`~hvf.plugins.block.backend.BlockBackend`) or on an
io_uring (:class:`~hvf.plugins.block.uring.UringBackend`), as the disk's ``aio=`` option
says (QEMU's name). Threads are the default; the backend module's docstring has the
measurements behind that."""

from __future__ import annotations

import errno

from hvf.plugins.block.backend import DEFAULT_THREADS, BlockBackend, log
from hvf.plugins.block.image import Image

#: The errors io_uring_setup has failed with in this process (each logged once).
_refused: set[int] = set()


def new_backend(image: Image, *, threads: int = DEFAULT_THREADS, name: str = "") -> BlockBackend:
    """The back end for ``image`` on the engine its ``aio=`` option names: ``io_uring``
    where the host sets a ring up (not where io_uring is disabled, filtered or missing:
    then threads, with a warning once), or ``threads`` worker threads. The ring engine
    has one worker of its own."""
    if image.aio == "io_uring":
        from hvf.plugins.block import uring

        try:
            ring = uring.Ring()
        except OSError as e:
            if e.errno not in _refused:
                _refused.add(e.errno)
                log.warning("aio=io_uring: this host sets up no io_uring (%s, %s): disks "
                            "use worker threads", e.strerror,
                            errno.errorcode.get(e.errno or 0, e.errno))
        else:
            return uring.UringBackend(image, ring, name=name)
    return BlockBackend(image, threads=threads, name=name)
