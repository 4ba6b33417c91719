# SPDX-License-Identifier: BSD-2-Clause
"""Save and restore on real KVM, driven as a user drives it: ``hvf ctl`` and ``hvf -r``.

The counter guests (tests/guests/README.md) print numbered output on COM1 forever, so a
VM can be suspended at any moment and restored in a new process: the COM1 output of
the first process followed by that of the restored one must be one perfect sequence,
wherever the save fell (in the middle of a line, of a ``rep outsb``, of a FIFO).

Every hvf runs as a child process (:class:`Hvf`) that is killed on the way out of its
``with``; every wait is bounded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hvf.control import ControlClient, socket_path
from hvf.errors import CtlError
from hvf.plugins.snapshot.ramfile import verify_ram
from hvf.plugins.snapshot.statefile import read_state, write_state
from hvf.plugins.snapshot.store import SnapshotStore
from hvf.snapshot_api import Chunk

from conftest import PVM, PVM_REASON, raw_pty, run_hvf

pytestmark = pytest.mark.kvm

#: The machine of the counter guests: host bridge, LPC, pc-testdev; COM1 is added per run.
MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev")
SEABIOS = Path("/usr/share/seabios/bios.bin")
DATA = Path(__file__).parent.parent / "data" / "snapshots"
PLUGIN_DIST = Path(__file__).parent.parent / "plugin_dist"
START = b"counter start\n"
FNV_BASIS, FNV_PRIME = 0x811C9DC5, 0x01000193

T = TypeVar("T")


# ---- running hvf ----


class Hvf:
    """``python -m hvf ARGS`` as a child (inside network namespace ``netns`` if given,
    with its runtime directory at ``runtime`` if given); its stdout and stderr go to
    files in ``tmp``. Leaving the ``with`` kills it if it still runs."""

    def __init__(self, args: Sequence[object], tmp: Path, tag: str,
                 env: dict[str, str] | None = None, *, netns: str | None = None,
                 runtime: Path | None = None) -> None:
        self.tag = tag
        self.stdout_path = tmp / f"{tag}.stdout"
        self.stderr_path = tmp / f"{tag}.stderr"
        #: The child's environment, for ``hvf ctl`` runs that must find its socket.
        self.env = {**os.environ, **(env or {})}
        if runtime is not None:
            self.env["HVF_RUNTIME_DIR"] = str(runtime)
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "hvf", *map(str, args)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=self.env)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_bytes().decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """The exit status; kills hvf and fails if it runs past ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"hvf ({self.tag}) still running after {timeout} s; "
                                 f"stderr: {self.stderr!r}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck zombie
            pass

    def __enter__(self) -> Hvf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def wait_until(cond: Callable[[], T], timeout: float, what: str, proc: Hvf | None = None,
               interval: float = 0.05) -> T:
    """``cond()``'s first true value; fails after ``timeout`` or when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and not proc.running():
            raise AssertionError(f"hvf ({proc.tag}) exited with {proc.proc.returncode} "
                                 f"while waiting for {what}; stderr: {proc.stderr!r}")
        if time.monotonic() > deadline:
            detail = f"; stderr: {proc.stderr!r}" if proc is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


def greeting_at(path: Path, timeout: float = 5) -> dict[str, Any] | None:
    """The greeting a VM sends on the control socket at ``path``, if it sends one now."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            with s.makefile("rb") as f:
                line = f.readline()
    except OSError:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message.get("hvf") if isinstance(message, dict) else None


def served(name: str) -> dict[str, Any] | None:
    """The greeting of the VM ``name`` if it answers on its control socket now."""
    return greeting_at(socket_path(name))


def wait_served(name: str, proc: Hvf, timeout: float = 60) -> dict[str, Any]:
    return wait_until(lambda: served(name), timeout, f"VM '{name}' to answer", proc)


def ctl(name: str, *args: object, expect_ok: bool = True) -> dict[str, Any]:
    """``hvf ctl --vm NAME --json ARGS``: its JSON reply."""
    r = run_hvf(["ctl", "--vm", name, "--json", *map(str, args)], timeout=120)
    if expect_ok:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    reply: dict[str, Any] = json.loads(r.stdout.splitlines()[-1])
    return reply


def poweroff(name: str, proc: Hvf) -> None:
    assert ctl(name, "poweroff") == {"state": "stopping"}
    assert proc.wait(30) == 1, proc.stderr


def suspend_exit(name: str, proc: Hvf, snap: Path) -> dict[str, Any]:
    reply = ctl(name, "suspend", "--exit", snap)
    assert reply["state"] == "stopping" and reply["path"] == str(snap), reply
    assert proc.wait(30) == 0, proc.stderr  # bhyve's "reboot" status: stopped cleanly
    return reply


def counter_args(guest: Path, out: Path, name: str, *extra: object,
                 append: str | None = None) -> list[object]:
    args: list[object] = [*MACHINE, *extra, "-l", f"com1,file={out}", "--kernel", guest]
    if append is not None:
        args += ["--append", append]
    return [*args, name]


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read(path: Path) -> bytes:
    """A file's bytes; nothing if it does not exist (yet)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def lines_in(path: Path) -> int:
    return read(path).count(b"\n")


def guest_symbol(elf: Path, symbol: str) -> int:
    """The address of ``symbol`` in a test kernel (identity-mapped: a RAM offset)."""
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == symbol:
            return int(parts[0], 16)
    raise AssertionError(f"no symbol {symbol} in {elf}")


def ram_u32(snap: Path, address: int) -> int:
    """A little-endian u32 of guest RAM as the snapshot at ``snap`` holds it."""
    _state, ram = SnapshotStore(snap).load()
    with open(ram, "rb") as f:
        f.seek(address)
        value: int = struct.unpack("<I", f.read(4))[0]
    return value


def chunk(snap: Path, name: str) -> Chunk:
    state = read_state(snap / "state")
    return next(c for c in state.chunks if c.name == name)


# ---- what the counter guests print ----


def check_counter(data: bytes, *, smp: bool = False) -> tuple[int, list[int]]:
    """Check a whole COM1 stream of ``counter`` (or ``counter_smp``): the start line,
    then ``count 1``, ``count 2``, ... with nothing missing or repeated, the last line
    possibly cut short. Returns (the last complete N, the AP values)."""
    assert data.startswith(START), data[:100]
    *lines, tail = data[len(START):].split(b"\n")
    aps: list[int] = []
    for n, line in enumerate(lines, 1):
        if smp:
            m = re.fullmatch(rb"count (\d+) ap (\d+)", line)
            assert m and int(m[1]) == n, f"line {n} is {line!r} (lines {lines[max(0, n - 3):n + 2]})"
            aps.append(int(m[2]))
        else:
            assert line == b"count %d" % n, f"line {n} is {line!r} (lines {lines[max(0, n - 3):n + 2]})"
    n = len(lines)
    if smp:
        m = re.fullmatch(rb"count (\d+) ap \d*", tail)
        assert (m and int(m[1]) == n + 1) or (b"count %d ap " % (n + 1)).startswith(tail), tail
    else:
        assert (b"count %d\n" % (n + 1)).startswith(tail), tail
    assert aps == sorted(aps), f"the AP counter went backwards: {aps}"
    return n, aps


def counter_from(k: int, lines: int) -> bytes:
    """What ``counter`` prints from line ``count K`` on."""
    return b"".join(b"count %d\n" % n for n in range(k, k + lines))


def check_continues(data: bytes, k: int) -> None:
    """``data`` is what a VM restored while ``count`` was K printed: the rest of the line
    ``count K`` (possibly nothing) followed by ``count K+1``, ``count K+2``, ..."""
    assert data.count(b"\n") >= 2, data
    expect = counter_from(k, data.count(b"\n") + 2)
    head = data[:data.rindex(b"\n") + 1]
    at = expect.find(head)
    assert 0 <= at <= len(b"count %d\n" % k), f"after count={k} the VM printed {data[:60]!r}"


def rep_block(n: int) -> bytes:
    """Block N of ``counter_rep`` (tests/guests/README.md)."""
    pattern = bytes(0x30 + ((7 * n + i) & 63) for i in range(64))
    return b"blk %06d " % n + pattern + b"\n"


def check_blocks(data: bytes) -> int:
    """Every block of a ``counter_rep`` stream byte-exact; the number of whole blocks."""
    assert data.startswith(START), data[:100]
    pos, n = len(START), 1
    while pos < len(data):
        want = rep_block(n)
        got = data[pos:pos + len(want)]
        if len(got) < len(want):
            assert want.startswith(got), f"last block {n} at byte {pos}: {got!r}"
            break
        assert got == want, f"block {n} at byte {pos}: {got!r}, expected {want!r}"
        pos += len(want)
        n += 1
    return n - 1


def fnv1a(data: bytes) -> int:
    h = FNV_BASIS
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFF
    return h


# ---- 1. counters across suspend, checkpoint, pause ----


def test_counter_suspend_and_restore_continues_exactly(
        guests: dict[str, Path], tmp_path: Path) -> None:
    """Suspend, restore, and suspend the restored VM into the snapshot it runs from (its
    RAM is that file, copy-on-write; the save writes the file's data and the pages the
    guest changed since): three processes print one perfect sequence."""
    name, snap = "ctr-suspend", tmp_path / "snap"
    out1, out2, out3 = tmp_path / "com1-a", tmp_path / "com1-b", tmp_path / "com1-c"
    with Hvf(counter_args(guests["counter"], out1, name), tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_until(lambda: lines_in(out1) >= 4, 60, "4 lines from the counter", vm)
        reply = suspend_exit(name, vm, snap)
    assert reply["chunks"] >= 3 and reply["seconds"] >= 0
    assert not socket_path(name).exists(), "hvf left its control socket behind"
    first, _ = check_counter(out1.read_bytes())

    with Hvf(["-r", snap, "-l", f"com1,file={out2}"], tmp_path, "b") as vm:
        assert wait_served(name, vm)["vm"] == name  # the snapshot's name by default
        wait_until(lambda: lines_in(out2) >= 4, 60, "4 lines after the restore", vm)
        status = ctl(name, "status")
        assert status["state"] == "running" and status["name"] == name
        suspend_exit(name, vm, snap)
    second, _ = check_counter(out1.read_bytes() + out2.read_bytes())
    assert second >= first + 3

    with Hvf(["-r", snap, "-l", f"com1,file={out3}"], tmp_path, "c") as vm:
        wait_served(name, vm)
        wait_until(lambda: lines_in(out3) >= 4, 60, "4 lines after the second restore", vm)
        poweroff(name, vm)
    total, _ = check_counter(out1.read_bytes() + out2.read_bytes() + out3.read_bytes())
    assert total >= second + 3


def test_counter_smp_suspend_and_restore(guests: dict[str, Path], tmp_path: Path) -> None:
    name, snap = "ctr-smp", tmp_path / "snap"
    out1, out2 = tmp_path / "com1-a", tmp_path / "com1-b"
    with Hvf(counter_args(guests["counter_smp"], out1, name, "-c", "2"), tmp_path, "a") as vm:
        wait_until(lambda: lines_in(out1) >= 4, 60, "4 lines from counter_smp", vm)
        suspend_exit(name, vm, snap)
    first, aps_before = check_counter(out1.read_bytes(), smp=True)
    assert chunk(snap, "vcpu.1").version >= 1  # both vCPUs are in the snapshot

    with Hvf(["-r", snap, "-l", f"com1,file={out2}"], tmp_path, "b") as vm:
        wait_until(lambda: lines_in(out2) >= 8, 60, "8 lines after the restore", vm)
        assert ctl(name, "status")["cpus"] == 2
        poweroff(name, vm)
    total, aps = check_counter(out1.read_bytes() + out2.read_bytes(), smp=True)
    assert total >= first + 7
    # non-decreasing across the join (check_counter), and the AP really runs again
    assert aps[-1] > aps[first], f"the AP did not run after the restore: {aps}"
    assert aps_before and aps_before[-1] > 0


def test_checkpoint_keeps_running_and_restores_under_another_name(
        guests: dict[str, Path], tmp_path: Path) -> None:
    a, b, ck = "ckpt-a", "ckpt-b", tmp_path / "ck"
    out_a, out_b = tmp_path / "com1-a", tmp_path / "com1-b"
    with Hvf(counter_args(guests["counter"], out_a, a), tmp_path, "a") as vm_a:
        wait_until(lambda: lines_in(out_a) >= 3, 60, "3 lines", vm_a)
        before = out_a.read_bytes()
        reply = ctl(a, "checkpoint", ck)
        assert reply["path"] == str(ck) and "state" not in reply, reply
        time.sleep(0.3)
        after = out_a.read_bytes()
        assert ctl(a, "status")["state"] == "running"
        wait_until(lambda: size(out_a) > len(after), 10, "output after the checkpoint", vm_a)

        with Hvf(["-r", ck, "-l", f"com1,file={out_b}", b], tmp_path, "b") as vm_b:
            assert wait_served(b, vm_b)["vm"] == b
            wait_until(lambda: lines_in(out_b) >= 3, 60, "3 lines from the copy", vm_b)
            assert ctl(b, "status")["name"] == b
            assert ctl(a, "status")["name"] == a  # both run at once
            poweroff(b, vm_b)
        poweroff(a, vm_a)

    full_a, data_b = out_a.read_bytes(), out_b.read_bytes()
    assert len(data_b) >= 20
    # A ran on past the checkpoint printing what B prints after the restore; the cut is
    # somewhere between what A had printed before the request and after the reply.
    cuts = [p for p in range(len(before), len(after) + 1)
            if full_a[p:p + len(data_b)] == data_b[:len(full_a) - p]]
    assert len(cuts) == 1, (cuts, before[-40:], after[-40:], data_b[:40])
    check_counter(full_a[:cuts[0]] + data_b)


def test_pause_resume_status(guests: dict[str, Path], tmp_path: Path) -> None:
    name, out = "pausevm", tmp_path / "com1"
    with Hvf(counter_args(guests["counter"], out, name), tmp_path, "a") as vm:
        wait_until(lambda: lines_in(out) >= 2, 60, "2 lines", vm)
        status = ctl(name, "status")
        assert status["state"] == "running" and status["cpus"] == 1
        assert status["pid"] == vm.proc.pid and status["memory"] == 256 << 20
        assert ctl(name, "pause") == {"state": "paused"}
        assert ctl(name, "status")["state"] == "paused"
        frozen = size(out)
        time.sleep(1.2)  # ~12 lines' worth
        assert size(out) == frozen, "COM1 output while paused"
        assert ctl(name, "pause") == {"state": "paused"}  # idempotent
        assert ctl(name, "resume") == {"state": "running"}
        assert ctl(name, "status")["state"] == "running"
        wait_until(lambda: lines_in(out) >= frozen and size(out) > frozen + 20, 10,
                   "output after resume", vm)
        poweroff(name, vm)
    check_counter(out.read_bytes())


# ---- 2. in the middle of string I/O, with bytes in the FIFO, in firmware ----


def test_counter_rep_saved_in_the_middle_of_rep_outsb(
        guests: dict[str, Path], tmp_path: Path) -> None:
    """Suspend and restore ``counter_rep`` several times at random moments; every block
    across every join is byte-exact."""
    guest = guests["counter_rep"]
    name, rng = "repvm", random.Random()
    rep_outsb = bytes([0xF3, 0x6E])
    outs: list[Path] = []
    mid_rep = 0
    snap_prev: Path | None = None
    for seg in range(5):
        out = tmp_path / f"com1-{seg}"
        outs.append(out)
        args: list[object] = (counter_args(guest, out, name, append="delay=0") if snap_prev is None
                              else ["-r", snap_prev, "-l", f"com1,file={out}"])
        with Hvf(args, tmp_path, f"seg{seg}") as vm:
            wait_served(name, vm)
            wait_until(lambda: size(out) > 200, 60, "blocks", vm)
            if seg == 4:
                poweroff(name, vm)
                break
            time.sleep(rng.uniform(0.0, 0.6))
            snap = tmp_path / f"snap{seg}"
            suspend_exit(name, vm, snap)
        regs = chunk(snap, "vcpu.0").fields["regs"]
        rcx, rip = struct.unpack_from("<Q", regs, 16)[0], struct.unpack_from("<Q", regs, 128)[0]
        _state, ram = SnapshotStore(snap).load()
        with open(ram, "rb") as f:
            f.seek(rip)
            at_rep = f.read(2) == rep_outsb
        if at_rep and 0 < rcx < len(rep_block(1)):
            mid_rep += 1
        snap_prev = snap
    data = b"".join(p.read_bytes() for p in outs)
    blocks = check_blocks(data)
    joins = [sum(size(p) for p in outs[:i + 1]) for i in range(4)]
    assert blocks > 100 and all(size(p) > 200 for p in outs), [size(p) for p in outs]
    print(f"counter_rep: {blocks} blocks, joins at {joins}, {mid_rep} of 4 saves inside rep outsb")
    if PVM:  # one exit per byte here: most saves land inside a rep outsb
        assert mid_rep >= 1, f"no save landed inside rep outsb (joins at {joins})"


def test_serial_rx_bytes_waiting_in_the_fifo_survive_a_restore(
        guests: dict[str, Path], tmp_path: Path) -> None:
    """``serial_rx`` counts and hashes every byte it receives. A few bytes (below the
    FIFO trigger level) are written just as a suspend stops the vCPU, until a snapshot
    holds received bytes in the UART FIFO that the guest has not read; the VM is
    restored with COM1 on a new pty and the rest of the stream is sent there. The
    guest's count and FNV-1a must be those of the whole stream."""
    guest = guests["serial_rx"]
    total, name, snap = 3000, "rxvm", tmp_path / "snap"
    rx_count, rx_hash = guest_symbol(guest, "rx_count"), guest_symbol(guest, "rx_hash")
    stream = bytes(random.Random(7).randrange(256) for _ in range(total))
    rng = random.Random()
    sent = 0
    fifo = b""
    attempts = 0
    with raw_pty() as (master, _slave, tty1):
        args = [*MACHINE, "-l", "debugcon,stdio", "-l", f"com1,{tty1}", "--kernel", guest,
                "--append", f"n={total}", name]
        with Hvf(args, tmp_path, "a") as vm:
            wait_until(lambda: "ready" in vm.stdout, 60, "ready", vm)
            with ControlClient(socket_path(name), timeout=60) as client:
                while attempts < 200 and not fifo:
                    attempts += 1
                    if attempts > 1:
                        assert client.call("resume") == {"state": "running"}
                    k = rng.randint(2, 10)
                    request = {"id": attempts, "command": "suspend", "args": {"path": str(snap)}}
                    client.sock.sendall(json.dumps(request).encode() + b"\n")
                    time.sleep(rng.uniform(0, 0.004))
                    sent += os.write(master, stream[sent:sent + k])
                    reply = json.loads(client.reader.readline())
                    assert reply.get("return", {}).get("state") == "paused", reply
                    fifo = chunk(snap, "device.com1").fields["rx_fifo"]
            vm.kill()
    print(f"serial_rx: {len(fifo)} bytes in the FIFO after {attempts} tries")
    assert fifo, f"no snapshot in {attempts} tries held unread bytes in the FIFO"
    count = ram_u32(snap, rx_count)
    assert count + len(fifo) <= sent
    assert stream[count:count + len(fifo)] == fifo
    assert ram_u32(snap, rx_hash) == fnv1a(stream[:count])

    with raw_pty() as (master, _slave, tty2):
        with Hvf(["-r", snap, "-l", f"com1,{tty2}"], tmp_path, "b") as vm:
            wait_served(name, vm)
            rest = stream[count + len(fifo):]
            writer = threading.Thread(target=os.write, args=(master, rest), daemon=True)
            writer.start()
            line = wait_until(lambda: re.search(r"rx \d+ fnv \w+ irqs \d+", vm.stdout), 60,
                              "the guest's rx line", vm)
            writer.join(10)
            assert vm.wait(30) == 1, vm.stderr  # the guest's exit 0
    assert line[0].split()[:4] == ["rx", str(total), "fnv", f"{fnv1a(stream):08x}"], (
        line[0], f"fifo {len(fifo)} bytes, {count} read before the save, {attempts} tries")


@pytest.mark.skipif(not SEABIOS.exists(), reason=f"needs SeaBIOS at {SEABIOS}")
def test_seabios_saved_while_running_reaches_its_prompt(tmp_path: Path) -> None:
    name, snap = "biosvm", tmp_path / "snap"
    out1, out2 = tmp_path / "com1-a", tmp_path / "com1-b"
    text = b"No bootable device"
    args = [*MACHINE[:4], "-l", f"bootrom,{SEABIOS}", "-l", f"com1,file={out1}", name]
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        time.sleep(0.7)
        suspend_exit(name, vm, snap)
    assert text not in read(out1), "the save came too late: SeaBIOS had finished"
    with Hvf(["-r", snap, "-l", f"com1,file={out2}"], tmp_path, "b") as vm:
        wait_until(lambda: text in read(out2), 30, "SeaBIOS's prompt", vm)
        poweroff(name, vm)
    whole = read(out1) + read(out2)
    assert b"SeaBIOS (version" in whole and whole.count(b"SeaBIOS (version") == 1, whole


# ---- 3. a Linux guest ----


@pytest.mark.skipif(PVM, reason=f"needs hardware-backed KVM: {PVM_REASON}; a Linux boot "
                    "runs for hours here")
def test_linux_guest_suspend_and_restore(tmp_path: Path) -> None:
    """The guest kit's Debian kernel and busybox initramfs (``hvf.action=counter``: a
    ``tick N`` line a second from a shell loop) on two vCPUs, suspended once it ticks
    and restored: the ticks go on, none missing or repeated."""
    from hvf.testing import guestkit

    try:
        kit = guestkit.ensure_guest()
    except guestkit.GuestKitError as e:
        pytest.skip(f"cannot fetch the Debian guest kernel: {e}")
    name, snap = "linuxvm", tmp_path / "snap"
    out1, out2 = tmp_path / "com1-a", tmp_path / "com1-b"
    args = [*MACHINE[:4], "-c", "2", "-m", "512M", "-l", f"com1,file={out1}",
            "--kernel", kit.kernel, "--initrd", kit.initramfs,
            "--append", guestkit.kernel_cmdline("counter"), name]

    def ticks(data: bytes) -> list[int]:
        return [int(m) for m in re.findall(rb"^tick (\d+)\r?$", data, re.M)]

    with Hvf(args, tmp_path, "a") as vm:
        wait_until(lambda: len(ticks(read(out1))) >= 3, 300, "3 ticks", vm, interval=0.2)
        suspend_exit(name, vm, snap)
    before = ticks(read(out1))
    with Hvf(["-r", snap, "-l", f"com1,file={out2}"], tmp_path, "b") as vm:
        wait_until(lambda: len(ticks(read(out1) + read(out2))) >= len(before) + 3, 60,
                   "3 ticks after the restore", vm, interval=0.2)
        poweroff(name, vm)
    got = ticks(read(out1) + read(out2))
    assert got == list(range(len(got))), got


# ---- 4. broken snapshots, contradicting options, a killed save ----


@pytest.fixture(scope="module")
def counter_snapshot(guests: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of a running ``counter`` (suspended, hvf stopped); copy it before use."""
    tmp = tmp_path_factory.mktemp("countersnap")
    name, snap, out = "snapsrc", tmp / "snap", tmp / "com1"
    with Hvf(counter_args(guests["counter"], out, name), tmp, "src") as vm:
        wait_until(lambda: lines_in(out) >= 3, 60, "3 lines", vm)
        suspend_exit(name, vm, snap)
    return snap


@pytest.fixture
def snap_copy(counter_snapshot: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "snap"
    shutil.copytree(counter_snapshot, copy)
    return copy


class SocketWatch(threading.Thread):
    """Watches the control socket of ``name`` while a restore runs: whether the file
    appears and whether anything is ever served on it."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.path = socket_path(name)
        self.name = name
        self.seen = False
        self.greeting: dict[str, Any] | None = None
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.is_set():
            if self.path.exists():
                self.seen = True
                self.greeting = self.greeting or greeting_at(self.path, 0.3)
            self._done.wait(0.001)

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def refused_restore(snap: Path, tmp_path: Path, name: str, *extra: str,
                    env: dict[str, str] | None = None) -> str:
    """Restore ``snap`` expecting a refusal; no VM may start. Returns stderr."""
    out = tmp_path / f"com1-{name}"
    watch = SocketWatch(name)
    try:
        r = run_hvf(["-r", str(snap), "-l", f"com1,file={out}", *extra, name],
                    timeout=60, env=env)
    finally:
        watch.stop()
    assert r.returncode not in (0, 1, 2, 3), (r.returncode, r.stderr)
    assert r.stderr.startswith("hvf: ") and len(r.stderr.splitlines()) <= 20, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    print(f"refused restore {name}: control socket file seen while it ran: {watch.seen}")
    assert watch.greeting is None, "a VM answered on its control socket"
    assert not watch.path.exists(), "a control socket was left behind"
    assert size(out) == 0, "the refused VM printed"
    return r.stderr


def test_restore_refuses_a_corrupted_state_file(snap_copy: Path, tmp_path: Path) -> None:
    state = snap_copy / "state"
    original = state.read_bytes()
    # in the manifest
    data = bytearray(original)
    data[100] ^= 0xFF
    state.write_bytes(bytes(data))
    err = refused_restore(snap_copy, tmp_path, "corrupt1")
    assert "manifest checksum mismatch" in err and "corrupt" in err and str(state) in err
    # in the last chunk's payload
    data = bytearray(original)
    data[-5] ^= 0x01
    state.write_bytes(bytes(data))
    err = refused_restore(snap_copy, tmp_path, "corrupt2")
    assert "checksum mismatch in chunk" in err and "corrupt" in err
    # not a state file at all
    state.write_bytes(b"\x7fELF" + original[4:])
    assert "not an hvf state file" in refused_restore(snap_copy, tmp_path, "corrupt3")


def test_restore_refuses_truncated_files(snap_copy: Path, tmp_path: Path) -> None:
    state = snap_copy / "state"
    original = state.read_bytes()
    state.write_bytes(original[:len(original) // 2])
    assert "truncated" in refused_restore(snap_copy, tmp_path, "trunc1")
    state.write_bytes(original[:10])
    assert "truncated in the header" in refused_restore(snap_copy, tmp_path, "trunc2")
    state.write_bytes(original)
    _st, ram = SnapshotStore(snap_copy).load()
    full = ram.stat().st_size
    os.truncate(ram, full - 4096)
    err = refused_restore(snap_copy, tmp_path, "trunc3")
    assert "RAM file" in err and "truncated" in err and str(full) in err
    ram.unlink()
    assert "missing" in refused_restore(snap_copy, tmp_path, "trunc4")


def test_restore_refuses_newer_versions(snap_copy: Path, tmp_path: Path) -> None:
    state = snap_copy / "state"
    original = state.read_bytes()
    data = bytearray(original)
    struct.pack_into("<I", data, 8, 3)  # the header's format version
    state.write_bytes(bytes(data))
    err = refused_restore(snap_copy, tmp_path, "newer1")
    assert "unsupported state file format version 3" in err and "newer hvf" in err
    # a chunk saved by a newer core (a valid file otherwise)
    state.write_bytes(original)
    parsed = read_state(state)
    chunks = [Chunk(c.name, c.owner, 99 if c.name == "vcpu.0" else c.version, c.fields)
              for c in parsed.chunks]
    write_state(state, machine=parsed.machine, ram=parsed.ram, chunks=chunks)
    err = refused_restore(snap_copy, tmp_path, "newer2")
    assert "vcpu.0" in err and "newer hvf" in err and "99" in err
    # a device chunk newer than the device: named, with both versions
    chunks = [Chunk(c.name, c.owner, 3 if c.name == "device.rtc" else c.version, c.fields)
              for c in parsed.chunks]
    write_state(state, machine=parsed.machine, ram=parsed.ram, chunks=chunks)
    err = refused_restore(snap_copy, tmp_path, "newer3")
    assert "'device.rtc' was saved by a newer hvf (state version 3; this hvf reads up to 2)" in err


def test_restore_refuses_a_chunk_nobody_restores(snap_copy: Path, tmp_path: Path) -> None:
    state = snap_copy / "state"
    parsed = read_state(state)
    extra = Chunk("device.frobnicator", "hvf_frobnicator", 1, {"x": 1})
    write_state(state, machine=parsed.machine, ram=parsed.ram, chunks=[*parsed.chunks, extra])
    err = refused_restore(snap_copy, tmp_path, "extrachunk")
    assert "no installed plugin restores" in err and "device.frobnicator" in err
    assert "hvf_frobnicator" in err


def _with_field(fields: dict[str, Any], key: str, value: object) -> dict[str, Any]:
    if value is _MISSING:
        return {k: v for k, v in fields.items() if k != key}
    return {**fields, key: value}


def _vendor_changed(fields: dict[str, Any]) -> dict[str, Any]:
    config = bytearray(fields["config"])
    config[0] ^= 0xFF
    return {**fields, "config": bytes(config)}


_MISSING = object()


@pytest.mark.parametrize(("chunk_name", "change", "message"), [
    ("vm", lambda f: _with_field(f, "pic_master", _MISSING), "'pic_master' is missing"),
    ("vcpu.0", lambda f: _with_field(f, "mp_state", -1), "vcpu 0: malformed saved state"),
    ("vcpu.0", lambda f: _with_field(f, "msrs", [[1 << 40, 0]]), "vcpu 0: malformed"),
    ("device.hostbridge@pci.0.0.0", _vendor_changed, "another device's"),
    ("device.hostbridge@pci.0.0.0", lambda f: _with_field(f, "bar_addresses", None),
     "BAR addresses are not a list"),
    ("device.lpc@pci.0.31.0", lambda f: _with_field(f, "bar_addresses", [0x1000] * 6),
     "BAR address 4096 is invalid"),
    ("device.rtc", lambda f: _with_field(f, "cmos", 1 << 70),
     "device.rtc: malformed saved state (saved field 'cmos' is not a byte string of 128"),
    ("device.rtc", lambda f: _with_field(f, "offset", float("nan")), "clock offset"),
    ("device.rtc", lambda f: _with_field(f, "offset", 1.5), "device.rtc: malformed saved state "
     "(saved field 'offset' is not a clock offset in nanoseconds"),
    ("device.kbc", lambda f: _with_field(f, "status", 3.5), "'status' is not an unsigned integer of 8 bits"),
    ("device.pm", lambda f: _with_field(f, "control", -1), "'control' is not an unsigned integer of 16 bits"),
    ("device.com1", lambda f: _with_field(f, "rx_fifo", b"x" * 100), "rx_fifo"),
])
def test_restore_refuses_hostile_device_state(
        snap_copy: Path, tmp_path: Path, chunk_name: str,
        change: Callable[[dict[str, Any]], dict[str, Any]], message: str) -> None:
    """A snapshot is untrusted: a well-formed state file whose fields no hvf could have
    written gets an error naming the chunk or device, never a traceback or a VM."""
    state = snap_copy / "state"
    parsed = read_state(state)
    assert chunk_name in [c.name for c in parsed.chunks]
    chunks = [Chunk(c.name, c.owner, c.version, change(c.fields)) if c.name == chunk_name
              else c for c in parsed.chunks]
    write_state(state, machine=parsed.machine, ram=parsed.ram, chunks=chunks)
    err = refused_restore(snap_copy, tmp_path, "hostile")
    assert message in err, err


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose Python path holds the third-party test plugin."""
    target = tmp_path_factory.mktemp("plugin")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(PLUGIN_DIST)], check=True, capture_output=True)
    return {**os.environ, "PYTHONPATH": str(target)}


def test_restore_without_the_plugin_a_device_came_from(
        guests: dict[str, Path], tmp_path: Path, plugin_env: dict[str, str]) -> None:
    name, snap, out = "plugvm", tmp_path / "snap", tmp_path / "com1"
    args = counter_args(guests["counter"], out, name, "-s", "3,testdev")
    with Hvf(args, tmp_path, "a", env=plugin_env) as vm:
        wait_until(lambda: lines_in(out) >= 2, 60, "2 lines", vm)
        suspend_exit(name, vm, snap)
    assert chunk(snap, "device.testdev@pci.0.3.0").owner == "hvf_testplugin"
    err = refused_restore(snap, tmp_path, "noplugin")
    assert "testdev" in err
    # with the plugin the same snapshot restores
    out2 = tmp_path / "com1-b"
    with Hvf(["-r", snap, "-l", f"com1,file={out2}"], tmp_path, "b", env=plugin_env) as vm:
        wait_until(lambda: lines_in(out2) >= 2, 60, "2 lines after the restore", vm)
        poweroff(name, vm)
    check_counter(out.read_bytes() + out2.read_bytes())


def test_restore_lists_contradicting_options(snap_copy: Path, tmp_path: Path) -> None:
    err = refused_restore(snap_copy, tmp_path, "contra1", "-m", "1G")
    assert "contradict" in err and "memory.size=1G" in err
    err = refused_restore(snap_copy, tmp_path, "contra2", "-m", "1G", "-s", "5,hostbridge")
    assert "memory.size=1G" in err and "pci.0.5.0.device=hostbridge" in err
    err = refused_restore(snap_copy, tmp_path, "contra3", "-c", "2")
    assert "cpus=2" in err


def test_restore_accepts_a_new_console_and_name(snap_copy: Path, tmp_path: Path) -> None:
    name, out = "newname", tmp_path / "com1-new"
    with Hvf(["-r", snap_copy, "-l", f"com1,file={out}", name], tmp_path, "b") as vm:
        assert wait_served(name, vm)["vm"] == name
        wait_until(lambda: lines_in(out) >= 2, 60, "2 lines", vm)
        poweroff(name, vm)


def fill_guest_ram(pid: int, start: int, length: int) -> None:
    """Random bytes into a running guest's RAM, written through hvf's guest-RAM memfd
    (``/proc/PID/fd``; ``memory.shared=true``): the test guests cannot dirty hundreds of
    MiB themselves here."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:hvf-guest-ram"):
            break
    else:
        raise AssertionError(f"hvf {pid} has no guest-RAM memfd")
    pool = os.urandom(16 << 20)
    ram = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
    try:
        for off in range(start, start + length, len(pool)):
            os.pwrite(ram, pool[:start + length - off], off)
    finally:
        os.close(ram)


def test_sigkill_during_a_save_leaves_the_previous_snapshot(
        guests: dict[str, Path], tmp_path: Path) -> None:
    """Snapshot P of a 2 GiB guest holding 768 MiB of data; then, several times,
    restore P and checkpoint it to P again, killing hvf when the save has reported
    some of its progress (the RAM file half written). P must always load, with a valid
    state file and a RAM file that matches its checksum, and restore to a VM that
    continues from its count."""
    guest = guests["counter"]
    count_at = guest_symbol(guest, "count")
    snap, rng = tmp_path / "P", random.Random()
    out = tmp_path / "com1-0"
    with Hvf(counter_args(guest, out, "killsrc", "-m", "2G", "-o", "memory.shared=true"),
             tmp_path, "src") as vm:
        wait_until(lambda: lines_in(out) >= 2, 60, "2 lines", vm)
        fill_guest_ram(vm.proc.pid, 256 << 20, 768 << 20)  # the guest never looks there
        ctl("killsrc", "checkpoint", snap)
        poweroff("killsrc", vm)
    assert read_state(snap / "state").ram["data_bytes"] >= 768 << 20
    outcomes = []
    for i in range(1, 5):
        name, out = f"kill{i}", tmp_path / f"com1-{i}"
        ram_before = read_state(snap / "state").ram["file"]
        kill_at = rng.randint(2, 8)  # progress lines come every 64 MiB of the 1 GiB scanned
        seen: list[int] = []

        def progress(done: int, total: int) -> None:
            seen.append(done)
            if len(seen) == kill_at:
                vm.proc.kill()
        with Hvf(["-r", snap, "-l", f"com1,file={out}", name], tmp_path, f"r{i}") as vm:
            wait_served(name, vm)
            wait_until(lambda: lines_in(out) >= 1, 60, "output", vm)
            with ControlClient(socket_path(name), timeout=60) as client:
                with pytest.raises(CtlError, match="closed the control connection"):
                    client.call("checkpoint", path=str(snap), progress=progress)
            vm.wait(10)
        state, ram = SnapshotStore(snap).load()
        verify_ram(ram, state.ram)
        leftovers = sorted(n for n in os.listdir(snap) if n.startswith("."))
        outcomes.append((state.ram["file"] != ram_before, leftovers, seen))
    print(f"kills during saves: (committed, leftovers, progress seen) = {outcomes}")
    assert all(not committed and leftovers for committed, leftovers, _ in outcomes), outcomes

    k = ram_u32(snap, count_at)
    out = tmp_path / "com1-final"
    with Hvf(["-r", snap, "-l", f"com1,file={out}", "killfinal"], tmp_path, "final") as vm:
        wait_until(lambda: lines_in(out) >= 3, 60, "3 lines", vm)
        check_continues(out.read_bytes(), k)
        # a save that completes removes what the killed ones left
        ctl("killfinal", "checkpoint", snap)
        poweroff("killfinal", vm)
    state, ram = SnapshotStore(snap).load()
    assert sorted(os.listdir(snap)) == sorted(["state", ram.name])


# ---- 5. a snapshot from an older state format ----


def tree_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_checked_in_v1_snapshot_restores_and_upgrades(tmp_path: Path) -> None:
    original = DATA / "counter-v1"
    digest = tree_digest(original)
    snap = tmp_path / "v1"
    shutil.copytree(original, snap)
    info = run_hvf(["snapshot", "info", str(snap)])
    assert info.returncode == 0, info.stderr
    row = re.search(r"^\s*device\.pc-testdev\s+\S+\s+(\d+)\s+\d+$", info.stdout, re.M)
    assert row and row[1] == "1", info.stdout
    v1_rtc = chunk(snap, "device.rtc")
    assert v1_rtc.version == 1 and type(v1_rtc.fields["offset"]) is float

    name, out, ck = "v1vm-restored", tmp_path / "com1", tmp_path / "ck"
    with Hvf(["-r", snap, "-l", f"com1,file={out}", name], tmp_path, "v1") as vm:
        wait_until(lambda: lines_in(out) >= 2, 60, "output", vm)
        ctl(name, "checkpoint", ck)
        poweroff(name, vm)
    assert out.read_bytes().split(b"\n")[0] == b"count 125"
    check_continues(out.read_bytes(), 124)
    info = run_hvf(["snapshot", "info", str(ck)])
    row = re.search(r"^\s*device\.pc-testdev\s+\S+\s+(\d+)\s+\d+$", info.stdout, re.M)
    assert row and row[1] == "2", info.stdout
    rtc = chunk(ck, "device.rtc")  # upgraded by the RTC: integer nanoseconds
    assert rtc.version == 2 and rtc.fields["offset"] == 0
    assert type(rtc.fields["offset"]) is int and rtc.fields["cmos"] == v1_rtc.fields["cmos"]
    assert tree_digest(original) == digest, "the checked-in snapshot was modified"


# ---- 6, 7. the control socket: other users, stale and live sockets ----


NOBODY = 65534
def as_nobody(path: Path) -> dict[str, Any]:
    """Connect to ``path`` from a forked child running as uid/gid 65534: what it got."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, just the result and _exit
        result: dict[str, Any] = {}
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result["uid"] = os.getuid()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(str(path))
            except OSError as e:
                result["connect_errno"] = e.errno
            else:
                f = s.makefile("rb")
                result["first"] = json.loads(f.readline() or "null")
                try:
                    s.sendall(b'{"id": 1, "command": "status"}\n')
                    result["second"] = f.readline().decode()
                except OSError as e:
                    result["second"] = f"error {e.errno}"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result["child_error"] = repr(e)
        os.write(wfd, json.dumps(result).encode())
        os._exit(0)
    os.close(wfd)
    data = b""
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    os.waitpid(pid, 0)
    got: dict[str, Any] = json.loads(data)
    assert "child_error" not in got, got
    return got


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_is_refused(
        guests: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # A runtime directory others may traverse, so that the socket's own mode and then
    # the SO_PEERCRED check are what stop them (pytest's temporary directories are 0700).
    rundir = Path(tempfile.mkdtemp(prefix="hvf-uidtest-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(rundir, ignore_errors=True))
    os.chmod(rundir, 0o711)
    for parent in rundir.parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            pytest.skip(f"{parent} is not searchable by others; cannot test other uids")
    env = {**os.environ, "HVF_RUNTIME_DIR": str(rundir)}
    name, out = "uidvm", tmp_path / "com1"
    path = rundir / f"{name}.sock"
    with Hvf(counter_args(guests["counter"], out, name), tmp_path, "a", env=env) as vm:
        wait_until(lambda: path.exists() and vm.running(), 60, "the socket", vm)
        wait_until(lambda: lines_in(out) >= 1, 60, "output", vm)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # (a) the socket's mode keeps others out
        assert as_nobody(path) == {"uid": NOBODY, "connect_errno": errno.EACCES}
        # (b) with the mode opened, SO_PEERCRED does
        os.chmod(path, 0o666)
        got = as_nobody(path)
        assert got["uid"] == NOBODY
        assert got["first"]["error"]["class"] == "PermissionDenied", got
        assert str(NOBODY) in got["first"]["error"]["desc"]
        assert not got["second"].startswith("{"), f"the VM answered another uid: {got}"
        assert vm.running()
        with ControlClient(path, timeout=10) as client:  # the owner still gets in
            assert client.call("status")["state"] == "running"
            client.call("poweroff")
        assert vm.wait(30) == 1
    assert "refused a client with uid 65534" in vm.stderr


def test_stale_socket_is_replaced_and_a_live_name_refused(
        guests: dict[str, Path], tmp_path: Path) -> None:
    name = "samename"
    path = socket_path(name)
    out1, out2, out3 = tmp_path / "com1-a", tmp_path / "com1-b", tmp_path / "com1-c"
    with Hvf(counter_args(guests["counter"], out1, name), tmp_path, "a") as vm:
        wait_served(name, vm)
        vm.proc.kill()
        vm.wait(10)
    assert stat.S_ISSOCK(os.lstat(path).st_mode), "SIGKILL should leave the socket"
    assert served(name) is None
    with Hvf(counter_args(guests["counter"], out2, name), tmp_path, "b") as vm:
        assert wait_served(name, vm)["vm"] == name
        wait_until(lambda: lines_in(out2) >= 1, 60, "output", vm)
        second = Hvf(counter_args(guests["counter"], out3, name), tmp_path, "c")
        with second:
            assert second.wait(60) == 4
        assert "already running" in second.stderr and name in second.stderr, second.stderr
        assert size(out3) == 0
        assert ctl(name, "status")["pid"] == vm.proc.pid  # the first one is untouched
        poweroff(name, vm)
    assert not path.exists()
