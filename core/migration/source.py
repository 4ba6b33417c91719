# SPDX-License-Identifier: BSD-2-Clause
"""The sending side: ``hvf ctl migrate URI`` runs :class:`Migration` in the VM process.

Pre-copy: dirty logging starts (the VM paused for a moment, so that no request is in
flight), every page holding data is sent while the guest runs, then the pages it wrote
meanwhile, round after round, until what is left would go in the downtime limit at the
bandwidth measured so far. Then the VM pauses, the last pages and the device and vCPU
state go, and once the destination has loaded them the source tells it to run and
exits with status 0 (bhyve's status for a VM stopped cleanly, as ``suspend --exit``).

Auto-converge: when in two rounds the guest dirtied more than half of what was sent
meanwhile, the vCPUs are throttled: 20 %, then 10 % more each time, up to 99 % (not
while a debugger is attached: ``-G`` holds vCPUs the same way). As QEMU's auto-converge
does, they run a :data:`THROTTLE_SLICE` at a time and are then held outside KVM_RUN for
p/(100 - p) times as long as they ran, so that at 99 % they run 1 % of the time however
late the host wakes the throttle (a wait of a fraction of a millisecond can take
several).

Whatever fails before the destination is told to run (the connection, a refusal, the
timeout, a cancel) leaves the VM running here as before; the destination is told why
if it can still hear it.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cffi import FFI

from hvf import exitcodes
from hvf.errors import HvfError, MigrationError
from hvf.extents import PAGE, private_extents
from hvf.memory import MAP_NORESERVE
from hvf.migration import handshake
from hvf.migration.chunks import encode_state
from hvf.migration.dirty import DirtyLog, unseen_writers
from hvf.migration.pages import (
    MAX_PAGES,
    Run,
    batches,
    data_runs,
    encode_table,
    extent_runs,
    pages_in,
    union,
)
from hvf.migration.stream import Channel, ConnectionLost, Kind, Uri, connect
from hvf.snapshot_api import StateWriter

if TYPE_CHECKING:
    from hvf.vm import Machine

log = logging.getLogger("hvf")

DEFAULT_DOWNTIME_MS = 300
CONNECT_TIMEOUT = 10.0
#: Longest wait for the destination (a READY comes once it has built the machine).
IO_TIMEOUT = 60.0
THROTTLE_SLICE = 0.01
THROTTLE_FIRST, THROTTLE_STEP, THROTTLE_MAX = 20, 10, 99
#: A paced round sends messages of about this many seconds' worth of the bandwidth.
PACING_SLICE = 0.05
PROGRESS_INTERVAL = 0.25

_libc_ffi = FFI()
_libc_ffi.cdef("void *mmap(void *addr, size_t length, int prot, int flags, int fd, long off);")
_libc: Any = _libc_ffi.dlopen(None)
_MAP_FIXED = 0x10  # <sys/mman.h> on Linux
Progress = Callable[[int, int], None]


class Throttle:
    """Holds the vCPUs outside KVM_RUN for ``percent`` % of the time."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.percent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def raise_(self) -> None:
        self.percent = min(THROTTLE_MAX, self.percent + THROTTLE_STEP if self.percent
                           else THROTTLE_FIRST)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hvf migrate throttle",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        vcpus = self.vm.vcpus
        released = time.monotonic()
        while not self._stop.wait(THROTTLE_SLICE):
            self.vm.hold(vcpus)
            ran = time.monotonic() - released
            self._stop.wait(ran * self.percent / (100 - self.percent))
            self.vm.release(vcpus)
            released = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _ram_mode(vm: Machine, local: bool) -> str:
    """How guest RAM goes over (see :mod:`.handshake`): ``--local`` hands over the
    memfd (``shared``) or the snapshot's RAM file (``private``); anonymous RAM, which
    no other process can map, is copied (``memory.shared=true`` makes it a memfd)."""
    if not local:
        return "copy"
    if vm.memory.private:
        return "private"
    if vm.memory.shareable:
        return "shared"
    log.warning("migrate --local: guest RAM is anonymous memory, so its pages are copied "
                "(memory.shared=true would hand it over)")
    return "copy"


class Migration:
    """One outgoing migration of ``vm`` to ``uri``."""

    def __init__(self, vm: Machine, uri: Uri, *, downtime_ms: float, bandwidth: float,
                 timeout: float | None, local: bool, progress: Progress | None) -> None:
        if local and not uri.unix:
            raise MigrationError(f"--local hands guest memory over a unix: socket, not {uri}")
        self.vm = vm
        self.uri = uri
        self.downtime = downtime_ms / 1000
        self.bandwidth = bandwidth  # bytes/s; 0: as fast as the link goes
        self.timeout = timeout
        self.ram = _ram_mode(vm, local)
        unseen = unseen_writers(vm) if self.ram != "shared" else None
        if unseen is not None:
            raise MigrationError(f"cannot copy guest RAM while it runs: {unseen} (hand the "
                                 f"RAM over with --local, or suspend and restore)")
        self.progress = progress
        self.cancelled = threading.Event()
        self.throttle = Throttle(vm)
        self.dirty: DirtyLog | None = None
        self.phase = "setup"
        self.round = 0
        self.pages = 0
        self.remaining = 0  # bytes dirty, not yet sent
        self.dirty_rate = 0.0  # bytes/s
        self.measured = 0.0  # bytes/s
        self.started = time.monotonic()
        self.paused_at: float | None = None
        self._channel: Channel | None = None
        self._detached = False
        self._sending = 0.0  # seconds spent sending pages
        self._page_bytes = 0
        self._reported = 0.0
        self._buffer = bytearray(MAX_PAGES * PAGE)

    # ---- figures ----

    def figures(self) -> dict[str, Any]:
        now = time.monotonic()
        sent = self._channel.sent if self._channel is not None else 0
        return {"state": self.phase, "uri": str(self.uri), "ram": self.ram,
                "round": self.round, "bytes": sent, "pages": self.pages,
                "remaining": self.remaining, "dirty_rate": round(self.dirty_rate),
                "bandwidth": round(self.measured), "throttle": self.throttle.percent,
                "expected_downtime_ms": round(1000 * self._expected(self.remaining), 1),
                "seconds": round(now - self.started, 3)}

    def _expected(self, remaining: int) -> float:
        return remaining / self.measured if self.measured else 0.0

    # ---- running ----

    def run(self) -> dict[str, Any]:
        """Migrate; returns the final figures, or raises :class:`MigrationError` with
        the VM running here as before."""
        channel = self._channel = Channel(connect(self.uri, CONNECT_TIMEOUT),
                                          timeout=IO_TIMEOUT,
                                          peer=f"the destination at {self.uri}")
        released = None
        try:
            self._handshake(channel)
            pending = self._precopy(channel) if self.ram != "shared" else []
            self._stop_and_copy(channel, pending)
            released = self._release_name()
            if self.ram == "shared":
                self._detach_ram()
            self._check_cancel()
            channel.send(Kind.GO)
        except ConnectionLost as e:
            refusal = self._refusal(channel)
            self._abandon(channel, e, released)
            if refusal:  # the connection failed because the destination gave up: why
                raise MigrationError(f"the destination refused the VM: {refusal}") from None
            raise
        except BaseException as e:
            self._abandon(channel, e, released)
            raise
        return self._finish(channel, released)

    @staticmethod
    def _refusal(channel: Channel) -> str | None:
        """The reason of a REFUSE the destination sent while this side was sending."""
        try:
            channel.sock.settimeout(0.5)
            frame = channel.receive({Kind.REFUSE: 65536})
        except (MigrationError, OSError):
            return None
        return _reason(frame.payload)

    def _handshake(self, channel: Channel) -> None:
        fds = [self.vm.memory.fd] if self.ram != "copy" else []
        channel.send(Kind.HELLO, json.dumps(handshake.hello(self.vm, self.ram)).encode(),
                     fds=fds)
        reply = channel.receive({Kind.READY: 4096, Kind.REFUSE: 65536})
        if reply.kind is Kind.REFUSE:
            raise MigrationError(f"the destination refused the VM: {_reason(reply.payload)}")

    def _precopy(self, channel: Channel) -> list[Run]:
        self.phase = "precopy"
        self.dirty = DirtyLog(self.vm)
        self.vm.pause()
        try:
            self.dirty.start()
        finally:
            self.vm.resume()
        memory = self.vm.memory
        pending = (extent_runs(private_extents(memory.host_addr, memory.size))
                   if self.ram == "private" else data_runs(memory))
        strikes = 0
        harvested_at = time.monotonic()
        while True:
            self.round += 1
            self.remaining = pages_in(pending) * PAGE
            sent_before = self._page_bytes
            self._send(channel, pending, paced=True)
            sent = self._page_bytes - sent_before
            pending = self.dirty.harvest()
            now = time.monotonic()
            dirtied = pages_in(pending) * PAGE
            self.dirty_rate = dirtied / max(now - harvested_at, 1e-6)
            harvested_at = now
            self.remaining = dirtied + pages_in(self.dirty.hvf_written()) * PAGE
            if self._expected(self.remaining) <= self.downtime:
                return pending
            self._check_deadline()
            if self.round > 1 and dirtied > sent / 2 and self.vm.gdb is None:
                strikes += 1
                if strikes >= 2:
                    strikes = 0
                    self.throttle.raise_()

    def _stop_and_copy(self, channel: Channel, pending: list[Run]) -> None:
        self.throttle.stop()
        self.vm.pause()
        self.paused_at = time.monotonic()
        self.phase = "stopped"
        if self.dirty is not None:
            last = union(pending, self.dirty.harvest(), self.dirty.hvf_written())
            self.round += 1
            self._send(channel, last, paced=False)
        writer = StateWriter()
        self.vm.hook.hvf_state_save(vm=self.vm, state=writer)
        channel.send(Kind.STATE, *encode_state(writer.chunks.values()))
        reply = channel.receive({Kind.LOADED: 4096, Kind.REFUSE: 65536})
        if reply.kind is Kind.REFUSE:
            raise MigrationError(f"the destination refused the VM (its memory or state): "
                                 f"{_reason(reply.payload)}")

    def _send(self, channel: Channel, runs: list[Run], *, paced: bool) -> None:
        """Send the pages of ``runs``, at no more than the bandwidth when ``paced``."""
        per_message = MAX_PAGES
        if paced and self.bandwidth:
            per_message = max(1, min(MAX_PAGES, int(self.bandwidth * PACING_SLICE) // PAGE))
        view = self.vm.memory.view
        out = memoryview(self._buffer)
        for batch in batches(runs, per_message):
            self._check_cancel()
            if paced:
                self._check_deadline()
            began = time.monotonic()
            at = 0
            for start, count in batch:
                n = count * PAGE
                out[at:at + n] = view[start * PAGE:start * PAGE + n]
                at += n
            channel.send(Kind.PAGES, encode_table(batch), out[:at])
            self.pages += pages_in(batch)
            self._page_bytes += at
            self.remaining = max(0, self.remaining - at)
            now = time.monotonic()
            if paced and self.bandwidth:
                time.sleep(max(0.0, began + at / self.bandwidth - now))
                now = time.monotonic()
            self._sending += now - began
            self.measured = self._page_bytes / self._sending if self._sending else 0.0
            self._report(now)

    def _report(self, now: float) -> None:
        if self.progress is not None and now - self._reported >= PROGRESS_INTERVAL:
            self._reported = now
            self.progress(self._page_bytes, self._page_bytes + self.remaining)

    def _check_cancel(self) -> None:
        if self.cancelled.is_set():
            raise MigrationError("cancelled (hvf ctl migrate --cancel)")

    def _check_deadline(self) -> None:
        if self.timeout is not None and time.monotonic() - self.started > self.timeout:
            raise MigrationError(
                f"it did not converge within the {self.timeout:g} s timeout (round "
                f"{self.round}: {self.remaining / 1e6:.1f} MB left to send; the link carried "
                f"{self.measured / 1e6:.1f} MB/s, the guest dirtied "
                f"{self.dirty_rate / 1e6:.1f} MB/s, throttle {self.throttle.percent} %)")

    # ---- handing over ----

    def _release_name(self) -> tuple[str, str] | None:
        """Move the control socket aside so the destination can take the VM's name
        (clients connected now are still served); returns (old path, new path)."""
        control = self.vm.control
        if control is None:
            return None
        old = control.path
        new = old.with_name(f".{old.name}.migrated-{os.getpid()}")
        try:
            os.rename(old, new)
        except OSError:
            return None
        control.path = new
        return str(old), str(new)

    def _restore_name(self, released: tuple[str, str] | None) -> None:
        control = self.vm.control
        if released is None or control is None:
            return
        old, new = released
        try:
            if not os.path.exists(old):
                os.rename(new, old)
                control.path = type(control.path)(old)
        except OSError:
            pass

    def _detach_ram(self) -> None:
        """Put private memory where the shared memfd was mapped: nothing this process
        still does (a back end finishing a request) can touch the guest the
        destination now runs."""
        memory = self.vm.memory
        got = _libc.mmap(_libc_ffi.cast("void *", memory.host_addr), memory.size,
                         mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE | _MAP_FIXED,
                         -1, 0)
        if int(_libc_ffi.cast("uintptr_t", got)) != memory.host_addr:
            raise MigrationError("cannot detach guest RAM from the shared memfd")
        self._detached = True

    def _reattach_ram(self) -> bool:
        """Map the memfd back where it was (the hand-over failed)."""
        memory = self.vm.memory
        got = _libc.mmap(_libc_ffi.cast("void *", memory.host_addr), memory.size,
                         mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
                         memory.fd, 0)
        return int(_libc_ffi.cast("uintptr_t", got)) == memory.host_addr

    def _finish(self, channel: Channel, released: tuple[str, str] | None) -> dict[str, Any]:
        try:
            reply = channel.receive({Kind.RUNNING: 4096, Kind.REFUSE: 65536})
        except MigrationError as e:
            self.phase = "unknown"
            self._restore_name(released)  # (unless the destination took it)
            raise MigrationError(
                f"the destination was told to run the VM but did not confirm ({e}); the "
                f"VM stays paused here: resume it (hvf ctl resume) only if the destination "
                f"does not run it") from None
        finally:
            channel.close()
        if reply.kind is Kind.REFUSE:  # it will not run: this side may
            self._abandon(None, MigrationError(_reason(reply.payload)), released)
            raise MigrationError(f"the destination could not start the VM: "
                                 f"{_reason(reply.payload)}; the VM runs on here")
        done = time.monotonic()
        self.phase = "completed"
        figures = self.figures()
        assert self.paused_at is not None
        figures.update(state="migrated", rounds=self.round, total_ms=round(1000 * (done - self.started), 1),
                       downtime_ms=round(1000 * (done - self.paused_at), 1), remaining=0,
                       expected_downtime_ms=0)
        self.vm.request_exit(exitcodes.REBOOT, f"migrated to {self.uri}")
        return figures

    def _abandon(self, channel: Channel | None, error: BaseException,
                 released: tuple[str, str] | None) -> None:
        """Undo everything: the VM runs on here as before."""
        self.phase = "failed"
        if channel is not None:
            try:
                channel.send(Kind.REFUSE, json.dumps({"reason": str(error)}).encode())
            except HvfError:
                pass
            channel.close()
        self.throttle.stop()
        if self.dirty is not None:
            self.dirty.stop()
        self._restore_name(released)
        if self._detached:
            self._detached = False
            if not self._reattach_ram():  # never run the guest on memory that is not its own
                self.vm.request_exit(exitcodes.ERROR, "the migration failed and guest RAM "
                                     "could not be mapped again")
                return
        if self.paused_at is not None and self.vm.paused:
            self.vm.resume()


def _reason(payload: bytes) -> str:
    try:
        reason = json.loads(payload).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return reason[:2000] if isinstance(reason, str) else "(no reason given)"
