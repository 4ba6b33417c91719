# SPDX-License-Identifier: BSD-2-Clause
"""The block back end the disk front ends share: asynchronous requests on an open
:class:`~hvf.plugins.block.image.Image`, run by a small pool of worker threads, or on
an io_uring (:mod:`hvf.plugins.block.uring`); :mod:`hvf.plugins.block.engine` picks.

A front end submits from its own thread (the I/O thread; never a vCPU) and gets each
completion as ``done(status, nbytes)`` on a worker thread (or the ring's reaper),
where it posts the result and signals the guest (an irqfd write). ``nbytes`` is the byte
count of a successful request; with :attr:`Status.IO_ERROR` it is the negated ``errno``,
as in io_uring. ``done`` is always called exactly once, never from inside the submitting call.

Every request is checked against the image before anything moves: a range that is not
inside [0, size) completes with :attr:`Status.OUT_OF_RANGE`, a write, discard or
write-zeroes on a read-only image with ``IO_ERROR``/``-EROFS``. Data moves with
``preadv``/``pwritev`` straight between the image and the guest's buffers (views of
guest RAM, a scatter/gather list); the one copy is the bounce buffer that direct I/O
(``nocache``) needs for a guest buffer whose address or length is not aligned, and a
direct-I/O request whose offset or length is not aligned fails with ``-EINVAL``
(requests in whole logical sectors always are). Discard punches a hole
(``FALLOC_FL_PUNCH_HOLE``), so a sparse image stays sparse; write-zeroes uses
``FALLOC_FL_ZERO_RANGE`` (or a hole with ``unmap``) and falls back to writing zeros
where the file system has neither. Flush is ``fdatasync``: it covers every write that
completed before the flush was submitted.

Threads by default, io_uring on request. Measured on the development host (2 shared
vCPUs, ext4 on virtio-blk, Linux 6.18, Python 3.11; a 256 MiB file; each figure the
range of two 4-second runs, the 4 KiB ones the median of five alternating rounds;
requests kept in flight by one submitting thread, as a front end's I/O thread would;
fio 3.33 with ``--thread --invalidate=0 --direct=0|1 --ioengine=psync|io_uring``):

=========================  ==============  ==============  ==============  ==============
                           4 KiB random    4 KiB random    1 MiB seq.      1 MiB seq.
                           read, cached    read, O_DIRECT  read, O_DIRECT  write, O_DIRECT
                           QD 32, IOPS     QD 32, IOPS     QD 8, MiB/s     QD 8, MiB/s
=========================  ==============  ==============  ==============  ==============
fio psync, 1 job           674-933k        14k             1360-1590       2430-3100
fio psync, 4 jobs          1.4-1.7M        32k             810-1070        2610-2720
fio io_uring               534-576k        67-69k          875-1760        2020-2170
Python loop, synchronous   481-514k        14k             890-1525        2310-2920
this module, 2 threads     57k             14k             910-1180        1520-1930
this module, 4 threads     52k             19k             850-1190        1370-1990
this module, 8 threads     47k             20k             820-1100        1760-2140
io_uring from Python       88k             43k
=========================  ==============  ==============  ==============  ==============

Large requests run at the device's speed whatever the engine. Small ones are bound by
the interpreter: 8-22 µs of CPU per request here (submit, hand-off to a worker and the
GIL, completion) against 2 µs for a synchronous loop. Four workers by default: on 2
CPUs more help O_DIRECT (a device with queue depth), fewer help cached reads.

The io_uring engine (a disk's ``aio=io_uring``) is not the default: it is not faster
where it was meant to be. ``bench/disk`` (O_DIRECT, hvf/QEMU by the guest's clock, runs
of 3-5 rounds in one hour, the host shared with other work): virtio-blk 4 KiB random
reads at depth 16 ran 0.67-0.83 on the ring (seven runs), 0.78-1.03 on threads (six),
though the ring took less CPU (73-94 against 84-117 µs per request, the device side
32-55 against 38-57): the guest waits on latency, not on hvf's CPU, and each ring
completion likely costs a hop (the kernel completes it in the submitting thread, which
wakes the reaper). ``IOSQE_ASYNC`` (io-wq) ran 0.75-0.77. NVMe random reads (a polled
guest) gained, 1.29-1.40 against 0.95-1.35; sequential rows alike. A back end alone
(one thread keeping 16 O_DIRECT 4 KiB reads in flight) did 26-30k requests/s on the
ring (40k with ``IOSQE_ASYNC``) against 18-22k on threads.

``drain`` waits for every submitted request (pause, snapshot; the front end has
stopped submitting); ``close`` drains, stops the workers and closes the image.
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from hvf.dma import Buffer, read_views_into, write_views
from hvf.plugins.block._libc import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    address,
    fallocate,
)
from hvf.plugins.block.image import Image

log = logging.getLogger("hvf.block")

#: Worker threads per back end unless the front end asks for another number (see above).
DEFAULT_THREADS = 4
IOV_MAX = os.sysconf("SC_IOV_MAX")
#: Bytes of zeros written per call where the file system cannot zero a range.
ZERO_CHUNK = 1 << 20
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS}


class Status(enum.IntEnum):
    """How a request ended."""

    OK = 0
    #: The host's I/O failed; ``nbytes`` is ``-errno``.
    IO_ERROR = 1
    #: The image cannot do this (discard where holes cannot be punched, or ``nodelete``).
    UNSUPPORTED = 2
    #: The range is not inside the image; nothing was accessed.
    OUT_OF_RANGE = 3


Done = Callable[[Status, int], None]
_Result = tuple[Status, int]

#: The counter of each kind of request.
_KIND_COUNTER = {"read": "reads", "write": "writes", "flush": "flushes",
                 "discard": "discards", "write-zeroes": "write_zeroes"}
_BYTES_COUNTER = {"read": "bytes_read", "write": "bytes_written"}
_STATUS_COUNTER = {Status.IO_ERROR: "io_errors", Status.UNSUPPORTED: "unsupported",
                   Status.OUT_OF_RANGE: "out_of_range"}
_COUNTERS = (*_KIND_COUNTER.values(), *_BYTES_COUNTER.values(), *_STATUS_COUNTER.values())

_ZEROS = mmap.mmap(-1, ZERO_CHUNK, prot=mmap.PROT_READ)


def _out_of_range() -> _Result:
    return Status.OUT_OF_RANGE, 0


def _read_only() -> _Result:
    return Status.IO_ERROR, -errno.EROFS


def _misaligned() -> _Result:
    return Status.IO_ERROR, -errno.EINVAL


def _byte_views(buffers: Sequence[Buffer], *, writable: bool) -> list[memoryview]:
    views = []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        if writable and view.readonly:
            raise TypeError("a read needs writable buffers")
        if len(view):
            views.append(view)
    return views


def _advance(views: list[memoryview], count: int) -> list[memoryview]:
    """``views`` less their first ``count`` bytes."""
    i = 0
    while count >= len(views[i]):
        count -= len(views[i])
        i += 1
        if i == len(views):
            return []
    rest = views[i:]
    rest[0] = rest[0][count:]
    return rest


def _transfer(call: Callable[[int, list[memoryview], int], int], fd: int,
              views: list[memoryview], offset: int, length: int) -> int:
    """Move ``length`` bytes with ``preadv``/``pwritev``, resuming short transfers and
    splitting lists longer than ``IOV_MAX``."""
    done = 0
    while done < length:
        count = call(fd, views[:IOV_MAX], offset + done)
        if count <= 0:
            raise OSError(errno.EIO, "the image ended early")
        done += count
        if done < length:
            views = _advance(views, count)
    return done


class BlockBackend:
    """Asynchronous I/O on ``image`` by ``threads`` workers; owns the image."""

    def __init__(self, image: Image, *, threads: int = DEFAULT_THREADS, name: str = "") -> None:
        if threads < 1:
            raise ValueError("a block back end needs at least one worker thread")
        self.image = image
        self.name = name or image.path
        self._fd = image.fd
        self._size = image.size
        self._dio = image.dio
        self._jobs: queue.SimpleQueue[tuple[str, Callable[..., _Result], tuple[Any, ...], Done]
                                      | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._logged_errnos: set[int] = set()
        #: Learned on the first EOPNOTSUPP: the file system cannot punch holes / zero ranges.
        self._can_punch = image.discard
        self._can_zero_range = True
        self._local = threading.local()
        self._workers = [threading.Thread(target=self._run, name=f"hvf block {i} {self.name}",
                                          daemon=True) for i in range(threads)]
        for worker in self._workers:
            worker.start()

    # ---- requests ----

    def read(self, offset: int, buffers: Sequence[Buffer], done: Done) -> None:
        """Read from ``offset`` into ``buffers`` in order (writable, e.g. guest RAM)."""
        views = _byte_views(buffers, writable=True)
        length = sum(map(len, views))
        self._submit("read", self._read, (offset, views, length), done,
                     offset=offset, length=length, modifies=False)

    def write(self, offset: int, buffers: Sequence[Buffer], done: Done) -> None:
        """Write ``buffers``, in order, at ``offset``."""
        views = _byte_views(buffers, writable=False)
        length = sum(map(len, views))
        self._submit("write", self._write, (offset, views, length), done,
                     offset=offset, length=length, modifies=True)

    def flush(self, done: Done) -> None:
        """Make every write completed so far durable (``fdatasync``)."""
        self._submit("flush", self._flush, (), done, offset=0, length=0, modifies=False)

    def discard(self, offset: int, length: int, done: Done) -> None:
        """Deallocate [offset, offset+length) (it then reads as zeros), or complete with
        ``UNSUPPORTED`` where the image cannot."""
        self._submit("discard", self._discard, (offset, length), done,
                     offset=offset, length=length, modifies=True)

    def write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        """Make [offset, offset+length) read as zeros; with ``unmap`` it may also be
        deallocated (unless the image is ``nodelete``)."""
        self._submit("write-zeroes", self._write_zeroes, (offset, length, unmap), done,
                     offset=offset, length=length, modifies=True)

    def _submit(self, kind: str, run: Callable[..., _Result], args: tuple[Any, ...],
                done: Done, *, offset: int, length: int, modifies: bool) -> None:
        if not (offset >= 0 and length >= 0 and offset + length <= self._size):
            run, args = _out_of_range, ()
        elif modifies and self.image.readonly:
            run, args = _read_only, ()
        self._admit()
        self._jobs.put((kind, run, args, done))

    def _admit(self) -> None:
        """Count a request in flight (until :meth:`_finished`); none once closed."""
        with self._idle:
            if self._closed:
                raise RuntimeError(f"{self.name}: the block back end is closed")
            self._in_flight += 1

    # ---- the workers ----

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            kind, run, args, done = job
            del job
            status, nbytes = self._attempt(kind, run, *args)
            self._complete(kind, done, status, nbytes)
            # Let go of the guest's buffers before waiting for the next request.
            del args, done
            self._finished(kind, status, nbytes)

    def _attempt(self, kind: str, run: Callable[..., _Result], *args: Any) -> _Result:
        """``run(*args)``; what it raises ends the request as ``IO_ERROR``."""
        try:
            return run(*args)
        except OSError as e:
            return Status.IO_ERROR, -(e.errno or errno.EIO)
        except Exception:
            log.exception("%s: a %s request failed", self.name, kind)
            return Status.IO_ERROR, -errno.EIO

    def _complete(self, kind: str, done: Done, status: Status, nbytes: int) -> None:
        """Tell the front end; a completion that raises is logged, not fatal."""
        try:
            done(status, nbytes)
        except Exception:
            log.exception("%s: the completion of a %s request failed", self.name, kind)

    def _finished(self, kind: str, status: Status, nbytes: int) -> None:
        with self._idle:
            counts = self._counts
            counts[_KIND_COUNTER[kind]] += 1
            if status is Status.OK:
                if kind in _BYTES_COUNTER:
                    counts[_BYTES_COUNTER[kind]] += nbytes
            else:
                counts[_STATUS_COUNTER[status]] += 1
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()
            first = status is Status.IO_ERROR and -nbytes not in self._logged_errnos
            if first:
                self._logged_errnos.add(-nbytes)
        if first:
            log.warning("%s: %s failed: %s (later failures with this error are only "
                        "counted)", self.name, kind, os.strerror(-nbytes))

    def _aligned(self, views: list[memoryview]) -> bool:
        assert self._dio is not None
        memory, offset = self._dio.memory, self._dio.offset
        return all(not (address(v) % memory or len(v) % offset) for v in views)

    def _bounce(self, length: int) -> memoryview:
        """This worker's aligned scratch buffer, at least ``length`` bytes."""
        buffer = getattr(self._local, "bounce", None)
        if buffer is None or len(buffer) < length:
            buffer = mmap.mmap(-1, max(length, ZERO_CHUNK))
            self._local.bounce = buffer
        return memoryview(buffer)[:length]

    def _read(self, offset: int, views: list[memoryview], length: int) -> _Result:
        if self._dio is None or self._aligned(views):
            return Status.OK, _transfer(os.preadv, self._fd, views, offset, length)
        if (offset | length) % self._dio.offset:
            return _misaligned()
        bounce = self._bounce(length)
        count = _transfer(os.preadv, self._fd, [bounce], offset, length)
        write_views(views, bounce[:count])
        return Status.OK, count

    def _write(self, offset: int, views: list[memoryview], length: int) -> _Result:
        if self._dio is None or self._aligned(views):
            return Status.OK, _transfer(os.pwritev, self._fd, views, offset, length)
        if (offset | length) % self._dio.offset:
            return _misaligned()
        bounce = self._bounce(length)
        read_views_into(views, bounce)
        return Status.OK, _transfer(os.pwritev, self._fd, [bounce], offset, length)

    def _flush(self) -> _Result:
        if not self.image.readonly:
            os.fdatasync(self._fd)
        return Status.OK, 0

    def _punch(self, offset: int, length: int) -> bool:
        """Punch a hole; False where the file system cannot."""
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            self._can_punch = False
            return False
        return True

    def _discard(self, offset: int, length: int) -> _Result:
        if length and not (self._can_punch and self._punch(offset, length)):
            return Status.UNSUPPORTED, 0
        return Status.OK, length

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> _Result:
        if not length or (unmap and self._can_punch and self._punch(offset, length)):
            return Status.OK, length
        if self._can_zero_range:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return Status.OK, length
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._can_zero_range = False
        if self._dio is not None and (offset | length) % self._dio.offset:
            return _misaligned()
        end = offset + length
        zeros = memoryview(_ZEROS)
        while offset < end:
            count = min(ZERO_CHUNK, end - offset)
            offset += _transfer(os.pwritev, self._fd, [zeros[:count]], offset, count)
        return Status.OK, length

    # ---- the front end's controls ----

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted request has completed (its ``done`` returned);
        False if ``timeout`` seconds passed first. Not from a completion callback."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    def stats(self) -> dict[str, int]:
        """Counters for ``hvf ctl status``: requests of each kind, bytes moved, requests
        that failed by status, and the requests in flight."""
        with self._idle:
            return {**self._counts, "in_flight": self._in_flight}

    def close(self) -> None:
        """Wait for the requests in flight, stop the workers and close the image; later
        submissions raise :class:`RuntimeError`. A second call does nothing."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
            self._idle.wait_for(lambda: not self._in_flight)
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join()
        self.image.close()
