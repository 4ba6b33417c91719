# SPDX-License-Identifier: BSD-2-Clause
"""The machine's I/O thread (bhyve's mevent): host file descriptors for device backends.

Backends never block a vCPU: a vCPU hands work to this thread (:meth:`EventLoop.call_soon`)
and the thread waits on host descriptors with ``selectors``. Callbacks run on the loop
thread, one at a time.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("hvf.eventloop")

Callback = Callable[[], None]


class EventLoop:
    """A selector loop on its own thread, with a thread-safe wake-up."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: deque[Callback] = deque()
        self._woken = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._watched: dict[tuple[int, int], Callback] = {}

    # ---- any thread ----

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` on the loop thread as soon as possible."""
        with self._lock:
            self._pending.append(callback)
            wake = not self._woken
            self._woken = True
        if wake:
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hvf io", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop thread after the callbacks already queued have run."""
        if self._thread is None:
            return

        def halt() -> None:
            self._stopping = True

        self.call_soon(halt)
        self._thread.join(5)
        self._thread = None

    def suspend(self, timeout: float = 10.0) -> None:
        """Hold the loop thread still (no backend runs) until :meth:`unsuspend`."""
        if self._thread is None:
            return
        parked = threading.Event()
        self._release = threading.Event()
        release = self._release

        def hold() -> None:
            parked.set()
            release.wait()

        self.call_soon(hold)
        if not parked.wait(timeout):
            raise RuntimeError("the I/O thread did not stop")

    def unsuspend(self) -> None:
        release = getattr(self, "_release", None)
        if release is not None:
            release.set()
            self._release = None

    # ---- loop thread (or before start) ----

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._watch(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        self._unwatch(fd, selectors.EVENT_READ)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._watch(fd, selectors.EVENT_WRITE, callback)

    def remove_writer(self, fd: int) -> None:
        self._unwatch(fd, selectors.EVENT_WRITE)

    def _watch(self, fd: int, event: int, callback: Callback) -> None:
        self._watched[(fd, event)] = callback
        self._update(fd)

    def _unwatch(self, fd: int, event: int) -> None:
        if self._watched.pop((fd, event), None) is not None:
            self._update(fd)

    def _update(self, fd: int) -> None:
        events = sum(e for (f, e) in self._watched if f == fd)
        try:
            self._selector.unregister(fd)
        except KeyError:
            pass
        if events:
            self._selector.register(fd, events, None)

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self._selector.select():
                fd = key.fd
                if fd == self._wake_r:
                    self._drain_wakeups()
                    continue
                for event in (selectors.EVENT_READ, selectors.EVENT_WRITE):
                    callback = self._watched.get((fd, event))
                    if mask & event and callback is not None:
                        self._safely(callback)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            pending, self._pending = self._pending, deque()
            self._woken = False
        for callback in pending:
            self._safely(callback)

    @staticmethod
    def _safely(callback: Callback) -> None:
        try:
            callback()
        except Exception:  # a backend bug must not take the I/O thread down
            log.exception("I/O callback %r failed", callback)

    def close(self) -> None:
        self.stop()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
