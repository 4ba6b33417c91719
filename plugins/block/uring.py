# SPDX-License-Identifier: BSD-2-Clause
"""The io_uring engine of the block back end: :class:`UringBackend` is a
:class:`~hvf.plugins.block.backend.BlockBackend` whose reads, writes and flushes go
through an io_uring (:mod:`hvf.plugins.block._uring`, raw system calls) instead of the
worker threads, with the same contract: the same checks, counters and logged errors,
``done`` exactly once and never inside the submitting call.

The submitting thread (any thread: the I/O thread, a front end's own, or a completion
callback) queues the request on the ring and submits it in one C call. One reaper thread
waits for completions, calls ``done`` and counts them. A transfer the kernel cut short
is finished there synchronously (``preadv``/``pwritev``, as the workers would), so a
read past the end of a shrunken image still ends as ``-EIO``; a negative result is
``IO_ERROR`` with that ``errno``. What the ring does not take goes to one worker thread
of the base class: refused requests (out of range, read-only), empty ones, direct I/O
that needs a bounce buffer, lists longer than ``IOV_MAX``, discard, write-zeroes, and
any request while :data:`RING_ENTRIES` are already on the ring.

Each request's ``struct iovec`` array and the guest's buffers (the views) stay referenced
until its completion has been handled; the views pin the memory the kernel writes.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from hvf.plugins.block._uring import ffi as _ffi
from hvf.plugins.block._uring import lib as _lib
from hvf.plugins.block.backend import (
    IOV_MAX,
    BlockBackend,
    Done,
    Status,
    _advance,
    _Result,
    _transfer,
)
from hvf.plugins.block.image import Image

#: Submission-ring entries, and the most requests a back end keeps on its ring (the
#: completion ring has twice as many entries, so it never overflows).
RING_ENTRIES = 256
#: Completions the reaper takes per wait.
REAP_BATCH = 64
#: Worker threads for what the ring does not take (see above).
POOL_THREADS = 1
#: The tag of the no-op that stops the reaper.
_STOP = 2**64 - 1

#: A request on the ring: kind, done, views, iovec array, offset, length.
_Request = tuple[str, Done, list[memoryview], Any, int, int]


class Ring:
    """One io_uring: queue-and-submit from any thread, reap from one."""

    def __init__(self, entries: int = RING_ENTRIES) -> None:
        error = _ffi.new("int *")
        ring = _lib.hvf_uring_open(entries, error)
        if ring == _ffi.NULL:
            raise OSError(error[0], f"io_uring_setup: {os.strerror(error[0])}")
        self._ring = ring
        #: The submission ring's entries (``entries`` rounded up to a power of two).
        self.entries: int = _lib.hvf_uring_entries(ring)
        self._tags = _ffi.new("uint64_t[]", REAP_BATCH)
        self._results = _ffi.new("int32_t[]", REAP_BATCH)

    @staticmethod
    def _queued(ret: int) -> bool:
        if ret == -errno.EBUSY:
            return False
        if ret < 0:
            raise OSError(-ret, f"io_uring_enter: {os.strerror(-ret)}")
        return True

    def rw(self, write: bool, fd: int, iov: Any, count: int, offset: int, tag: int) -> bool:
        """Queue and submit a ``readv``/``writev``; False (nothing queued) if full."""
        return self._queued(_lib.hvf_uring_rw(self._ring, write, fd, iov, count, offset, tag))

    def fsync(self, fd: int, tag: int) -> bool:
        """Queue and submit an ``fdatasync``; False (nothing queued) if full."""
        return self._queued(_lib.hvf_uring_fsync(self._ring, fd, tag))

    def nop(self, tag: int) -> bool:
        """Queue and submit a request that completes at once with result 0."""
        return self._queued(_lib.hvf_uring_nop(self._ring, tag))

    def reap(self) -> Iterable[tuple[int, int]]:
        """Wait for one completion or more: (tag, result) pairs. One thread only."""
        n = _lib.hvf_uring_reap(self._ring, self._tags, self._results, REAP_BATCH)
        if n < 0:
            raise OSError(-n, f"io_uring_enter: {os.strerror(-n)}")
        return zip(_ffi.unpack(self._tags, n), _ffi.unpack(self._results, n))

    def close(self) -> None:
        """Unmap and close the ring (nothing may be in flight)."""
        _lib.hvf_uring_close(self._ring)
        self._ring = _ffi.NULL


class UringBackend(BlockBackend):
    """:class:`BlockBackend` with reads, writes and flushes on ``ring`` (which it owns)."""

    def __init__(self, image: Image, ring: Ring, *, name: str = "") -> None:
        super().__init__(image, threads=POOL_THREADS, name=name)
        self._ring: Ring | None = ring
        self._depth = ring.entries
        self._requests: dict[int, _Request] = {}
        self._next_tag = itertools.count(1)
        self._reaper = threading.Thread(target=self._reap, args=(ring,), daemon=True,
                                        name=f"hvf block ring {self.name}")
        self._reaper.start()

    def _submit(self, kind: str, run: Callable[..., _Result], args: tuple[Any, ...],
                done: Done, *, offset: int, length: int, modifies: bool) -> None:
        ring = self._ring
        views = self._ring_views(kind, args, offset, length)
        if ring is None or views is None:
            super()._submit(kind, run, args, done, offset=offset, length=length,
                            modifies=modifies)
            return
        self._admit()
        tag = next(self._next_tag)
        if kind == "flush":
            self._requests[tag] = (kind, done, views, None, offset, length)
            queued = ring.fsync(self._fd, tag)
        else:
            iov = _ffi.new("struct iovec[]", [(_ffi.from_buffer(v), len(v)) for v in views])
            # Recorded before the kernel can complete it (possibly before ``rw`` returns).
            self._requests[tag] = (kind, done, views, iov, offset, length)
            queued = ring.rw(kind == "write", self._fd, iov, len(views), offset, tag)
        if not queued:  # the ring is full: a worker takes it (already counted in flight)
            del self._requests[tag]
            self._jobs.put((kind, run, args, done))

    def _ring_views(self, kind: str, args: tuple[Any, ...], offset: int,
                    length: int) -> list[memoryview] | None:
        """The buffers of a request for the ring (none for a flush), or None where the
        request is for a worker."""
        if len(self._requests) >= self._depth:
            return None
        if kind == "flush":
            return None if self.image.readonly else []
        if kind == "read" or (kind == "write" and not self.image.readonly):
            views: list[memoryview] = args[1]
            if (offset >= 0 and length and offset + length <= self._size
                    and len(views) <= IOV_MAX and (self._dio is None or self._aligned(views))):
                return views
        return None

    # ---- the reaper ----

    def _reap(self, ring: Ring) -> None:
        while True:
            for tag, result in ring.reap():
                if tag == _STOP:
                    return
                kind, done, views, _, offset, length = self._requests.pop(tag)
                status, nbytes = self._result(kind, views, offset, length, result)
                self._complete(kind, done, status, nbytes)
                # Let go of the guest's buffers before counting it done (drain returns).
                del done, views
                self._finished(kind, status, nbytes)

    def _result(self, kind: str, views: list[memoryview], offset: int, length: int,
                result: int) -> _Result:
        if result < 0:
            return Status.IO_ERROR, result
        if result == length:
            return Status.OK, result
        call = os.pwritev if kind == "write" else os.preadv
        status, rest = self._attempt(kind, lambda: (Status.OK, _transfer(
            call, self._fd, _advance(views, result), offset + result, length - result)))
        return (status, result + rest) if status is Status.OK else (status, rest)

    # ---- the front end's controls ----

    def close(self) -> None:
        """As :meth:`BlockBackend.close`, and stop the reaper and close the ring."""
        super().close()
        with self._idle:
            ring, self._ring = self._ring, None
        if ring is not None:
            ring.nop(_STOP)
            self._reaper.join()
            ring.close()
