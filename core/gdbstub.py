# SPDX-License-Identifier: BSD-2-Clause
"""bhyve's ``-G [w][bind:]port``: a GDB remote stub on TCP, one debugger at a time.

While gdb holds the guest every vCPU is parked outside ``KVM_RUN``
(:meth:`hvf.vm.Machine.hold`) and the stub's thread reads and writes registers and
memory (:mod:`hvf.gdbstub_target`) itself; a resume releases the vCPUs it names (a
legacy ``s`` only the stepped one, as bhyve). ``s`` is ``KVM_GUESTDBG_SINGLESTEP``. The
vCPU that stops reports from its own thread (:meth:`GdbStub.debug_exit`) and the others
are held. Detaching (``D``, ``k`` or a lost connection) removes every breakpoint and
lets the guest run on. Where this host's KVM cannot emulate ``int3`` (``kvm_pvm``), the
failed emulation of a patched one counts as the hit (:meth:`GdbStub.breakpoint_trap`).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

import hvf
from hvf import gdbstub_x86 as x86
from hvf.iowait import readable
from hvf._kvm import lib
from hvf.errors import CapabilityError, ConfigError, HvfError
from hvf.gdbstub_target import INT3, GuestDebug
from hvf.gdbstub_protocol import (
    ALL_THREADS, ANY_THREAD, MAX_READ, PACKET_SIZE, BadPacket, Breakpoint, Interrupt,
    Packet, PacketError, PacketReader, Query, ReadFeatures, ReadMemory, ReadRegister,
    Resume, SetThread, Stop, ThreadQuery, WriteMemory, WriteRegister, WriteRegisters,
    frame, parse,
)

if TYPE_CHECKING:
    from hvf.kvm import VcpuFd
    from hvf.vcpu import Vcpu
    from hvf.vm import Machine

log = logging.getLogger("hvf.gdb")

BP_VECTOR = 3
EIO = 0x05
SEND_TIMEOUT = 30.0
ACCEPT_RETRY = 0.5
#: Packets kept for later while the guest runs (gdb sends none but Ctrl-C then).
MAX_PENDING = 64
_CONSTANT_REPLIES = {
    "qSupported": b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+"
                  % PACKET_SIZE,
    "qAttached": b"1",  # an existing process: quitting gdb detaches, the guest runs on
    "qsThreadInfo": b"l",
    "vCont?": b"vCont;c;C;s;S",
    "QStartNoAckMode": b"OK",
}


class GdbStub:
    """The stub for one machine: a listening socket and the thread serving gdb."""

    def __init__(self, vm: Machine, address: str, port: int, wait: bool) -> None:
        self.vm = vm
        self.wait = wait
        self.where = f"{address}:{port}"
        if not vm.kvm.check_extension(lib.KVM_CAP_SET_GUEST_DEBUG):
            raise CapabilityError("-G needs KVM_CAP_SET_GUEST_DEBUG, which this KVM lacks")
        try:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            self._listener = socket.create_server((address.strip("[]"), port), family=family,
                                                  backlog=1)
        except (OSError, OverflowError) as e:
            raise ConfigError(f"gdb: cannot listen on {self.where}: {e}") from None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._exit_status = 0
        self._attached = False
        self._running = True
        self._stop: Stop | None = None  # the stop to report, once set while running
        self._reported = Stop(0)
        self._current = 0  # Hg: the vCPU whose registers and page tables are used
        self._resume_thread: int | None = None  # Hc
        self._no_ack = False
        self.guest = GuestDebug(vm.memory, bool(
            vm.kvm.check_extension(lib.KVM_CAP_SET_GUEST_DEBUG2) & lib.KVM_GUESTDBG_BLOCKIRQ))
        #: The registers gdb is shown, chosen by the vCPU's mode when it connects.
        self.layout = x86.AMD64
        vm.plugins.pm.register(self, name="gdb stub")

    @classmethod
    def from_config(cls, vm: Machine) -> GdbStub | None:
        """The stub ``gdb.port`` asks for (none for 0, the default)."""
        port = vm.config.get_int("gdb.port", 0)
        if port == 0:
            return None
        if not 0 < port < 65536:
            raise ConfigError(f"gdb.port {port} is out of range (1-65535, or 0 for none)")
        return cls(vm, vm.config.get("gdb.address") or "127.0.0.1", port,
                   vm.config.get_bool("gdb.wait"))

    # ---- the machine's side ----

    def start(self) -> None:
        """Serve gdb from now on; with ``w``, the guest waits for the debugger."""
        if self.wait:
            self.vm.hold(self.vm.vcpus)
            log.warning("gdb: waiting for a debugger on %s before the guest starts", self.where)
        else:
            log.info("gdb: listening on %s", self.where)
        self._thread = threading.Thread(target=self._serve, name="gdb stub", daemon=True)
        self._thread.start()

    def close(self, status: int | None) -> None:
        """Tell a connected debugger the guest exited with ``status``; stop serving."""
        self._exit_status = status or 0
        self._closing = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.vm.plugins.pm.unregister(self)

    @hvf.hookimpl
    def hvf_vm_pause(self, vm: Machine) -> None:
        if vm is self.vm:
            self.guest.lift()  # no snapshot keeps the breakpoints' int3 bytes

    @hvf.hookimpl
    def hvf_vm_resume(self, vm: Machine) -> None:
        if vm is self.vm:
            self.guest.plant()

    # ---- called on vCPU threads, off their fast path ----

    def debug_exit(self, vcpu: Vcpu) -> None:
        """KVM_EXIT_DEBUG: a breakpoint, watchpoint or step to report, or the guest's
        own ``int3`` (given its #BP)."""
        exit_debug = vcpu.fd.exit_debug
        if exit_debug.exception == BP_VECTOR:
            pc = exit_debug.pc
            if not self._breakpoint_hit(vcpu, pc) and self.guest.byte_at(vcpu.fd, pc) == INT3:
                control = self.guest.control(False) | lib.KVM_GUESTDBG_INJECT_BP
                vcpu.fd.set_guest_debug(control, self.guest.debugreg())
            return
        self._report(Stop(vcpu.index, reason=self.guest.stop_reason(exit_debug.dr6) or ""))

    def breakpoint_trap(self, vcpu: Vcpu) -> bool:
        """KVM failed to emulate an ``int3`` at the vCPU's RIP: True when it was one of
        the stub's breakpoints (now reported) or one removed since (the instruction runs
        again); False for the guest's own."""
        pc = x86.linear_pc(vcpu.fd)
        return self._breakpoint_hit(vcpu, pc) or self.guest.byte_at(vcpu.fd, pc) != INT3

    def _breakpoint_hit(self, vcpu: Vcpu, pc: int) -> bool:
        if pc not in self.guest.software:
            return False
        self._report(Stop(vcpu.index, reason="swbreak:"))
        return True

    def _report(self, stop: Stop) -> None:
        with self._lock:
            if not self._attached or self._stop is not None:
                return  # no debugger, or the guest is stopping already
            self._stop = stop
        self.vm.hold(self.vm.vcpus)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass

    # ---- the stub's thread ----

    def _serve(self) -> None:
        while not self._closing:
            ready = readable([self._listener, self._wake_r])
            self._drain()
            if self._listener not in ready or self._closing:
                continue
            try:
                conn, peer = self._listener.accept()
            except OSError as e:  # out of descriptors, say: try again soon
                log.warning("gdb: accept failed: %s", e)
                time.sleep(ACCEPT_RETRY)
                continue
            log.info("gdb: debugger connected from %s", peer[0])
            try:
                self._session(conn)
            except (OSError, HvfError) as e:
                log.warning("gdb: session ended: %s", e)
            except Exception:
                log.exception("gdb: session failed")
            conn.close()
            try:
                self._detach()
            except HvfError as e:
                log.error("gdb: detaching failed: %s", e)

    def _drain(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def _send(self, conn: socket.socket, payload: bytes) -> None:
        conn.sendall(frame(payload))

    def _session(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(SEND_TIMEOUT)  # a peer that stops reading is dropped
        reader = PacketReader()
        pending: collections.deque[Packet | BadPacket | Interrupt] = collections.deque()
        announce = False  # the stop on connecting is told when gdb asks ('?')
        self._no_ack, self._running = False, True
        self._current, self._resume_thread = 0, None
        with self._lock:
            self._attached = True
            self._stop = Stop(self._current)
        self.vm.hold(self.vm.vcpus)
        while True:
            if self._closing:
                self._send(conn, b"W%02x" % (self._exit_status & 0xFF))
                return
            if self._running and self._stop is not None:
                if not self.vm.wait_parked():  # the machine is exiting: close() follows
                    readable([self._wake_r], 1.0)
                    continue
                self._stopped()
                if announce:
                    self._send(conn, self._reported.reply())
                else:
                    self.layout = x86.layout_for(self._fd())
                announce = True
            while pending and not self._running:
                self._event(conn, pending.popleft())
                if not self._attached:
                    return
            if self._running and self._stop is not None:
                continue
            ready = readable([conn, self._wake_r, self._listener])
            self._drain()
            if self._listener in ready:
                extra, _ = self._listener.accept()
                extra.close()  # one debugger at a time
            if conn in ready:
                data = conn.recv(65536)
                if not data:
                    return
                for event in reader.feed(data):
                    retry = isinstance(event, BadPacket) and event.retry
                    if not self._no_ack and not isinstance(event, Interrupt):
                        conn.sendall(b"-" if retry else b"+")
                    if isinstance(event, Interrupt):
                        self.interrupt()
                    elif not retry:
                        pending.append(event)
                if len(pending) > MAX_PENDING:
                    raise HvfError(f"more than {MAX_PENDING} packets sent while the guest ran")

    def _event(self, conn: socket.socket, event: Packet | BadPacket | Interrupt) -> None:
        if isinstance(event, BadPacket):
            self._send(conn, PacketError(event.reason).reply)
        elif isinstance(event, Packet):
            reply = self.handle(event.payload)
            if reply is not None:
                self._send(conn, reply)
            if event.payload == b"QStartNoAckMode":
                self._no_ack = True

    def _stopped(self) -> None:
        with self._lock:
            stop = self._stop
        assert stop is not None
        self._running = False
        self._reported = stop
        self._current = stop.vcpu

    def interrupt(self) -> None:
        """Ctrl-C from gdb: stop the running guest (reported as SIGINT)."""
        with self._lock:
            if not self._running or self._stop is not None:
                return
            self._stop = Stop(self._current, signal.SIGINT)
        self.vm.hold(self.vm.vcpus)

    def _detach(self) -> None:
        """Remove every breakpoint and let the guest run on without a debugger."""
        with self._lock:
            self._attached = False
            self._stop = None
        if self.vm.exit_status is not None:
            return
        self.vm.hold(self.vm.vcpus)
        if self.vm.wait_parked():
            self.guest.remove_all()
            for vcpu in self.vm.vcpus:
                vcpu.fd.set_guest_debug(0)
        self._running = True
        self.vm.release(self.vm.vcpus)
        log.info("gdb: debugger detached; the guest runs on")

    # ---- packets (the guest is held) ----

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet from gdb (None: no reply), errors included."""
        try:
            return self._dispatch(payload)
        except PacketError as e:
            log.debug("gdb: %r refused: %s", payload[:40], e)
            return e.reply
        except HvfError as e:
            log.warning("gdb: %r failed: %s", payload[:40], e)
            return PacketError(str(e), EIO).reply

    def _dispatch(self, payload: bytes) -> bytes | None:
        cmd = parse(payload)
        if isinstance(cmd, Query):
            return self._query(cmd.name)
        fd = self._fd()
        if isinstance(cmd, WriteRegisters):
            state = x86.read_state(fd)
            x86.write_state(fd, state, x86.decode(self.layout, cmd.data, state))
        elif isinstance(cmd, ReadRegister):
            return x86.register_bytes(self.layout, x86.read_state(fd), cmd.number).hex().encode()
        elif isinstance(cmd, WriteRegister):
            state = x86.read_state(fd)
            x86.write_state(fd, state, x86.with_register(self.layout, state, cmd.number,
                                                          cmd.data))
        elif isinstance(cmd, ReadMemory):
            return self.guest.read(fd, cmd.address, cmd.length).hex().encode()
        elif isinstance(cmd, WriteMemory):
            self.guest.write(fd, cmd.address, cmd.data)
        elif isinstance(cmd, Breakpoint):
            return self.guest.change(fd, cmd)
        elif isinstance(cmd, Resume):
            self._resume(cmd)
            return None
        elif isinstance(cmd, SetThread):
            index = self._thread_index(cmd.thread)
            if cmd.op == "g":
                self._current = self._current if index is None else index
            else:
                self._resume_thread = index
        elif isinstance(cmd, ThreadQuery):
            index = self._thread_index(cmd.thread)
            if cmd.name == "qThreadExtraInfo":
                return f"vCPU {self._current if index is None else index}".encode().hex().encode()
        elif isinstance(cmd, ReadFeatures):
            if cmd.annex != "target.xml":
                raise PacketError(f"no feature document {cmd.annex!r}")
            xml = self.layout.target_xml()
            chunk = xml[cmd.offset : cmd.offset + min(cmd.length, MAX_READ)]
            more = cmd.offset + len(chunk) < len(xml)
            return (b"m" if more else b"l") + chunk
        else:
            return b""
        return b"OK"

    def _query(self, name: str) -> bytes | None:
        if name in _CONSTANT_REPLIES:
            return _CONSTANT_REPLIES[name]
        if name == "?":
            return self._reported.reply()
        if name == "g":
            return x86.encode(self.layout, x86.read_state(self._fd())).hex().encode()
        if name == "qC":
            return b"QC%x" % (self._current + 1)
        if name == "qfThreadInfo":
            return b"m" + b",".join(b"%x" % (v.index + 1) for v in self.vm.vcpus)
        with self._lock:  # D and k
            self._attached = False
        return b"OK" if name == "D" else None

    def _fd(self) -> VcpuFd:
        """The current thread's vCPU (Hg)."""
        return self.vm.vcpus[self._current].fd

    def _thread_index(self, thread: int) -> int | None:
        """The vCPU of a thread id, None for 'any' or 'all'."""
        if thread in (ANY_THREAD, ALL_THREADS):
            return None
        if thread > len(self.vm.vcpus):
            raise PacketError(f"no thread {thread:x}")
        return thread - 1

    # ---- resuming ----

    def _resume(self, cmd: Resume) -> None:
        step = self._current if self._resume_thread is None else self._resume_thread
        run, steps = cmd.plan(len(self.vm.vcpus), step)
        for vcpu in self.vm.vcpus:
            vcpu.fd.set_guest_debug(self.guest.control(vcpu.index in steps),
                                    self.guest.debugreg())
        with self._lock:
            self._stop = None
        self._running = True
        self.vm.release([self.vm.vcpus[i] for i in sorted(run)])
