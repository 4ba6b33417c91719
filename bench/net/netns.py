# SPDX-License-Identifier: BSD-2-Clause
"""bench/net's pieces: the test network (a network namespace of the benchmark's own
with a persistent tap), the rows, the host side (``hostside.c``, built here and run in
the namespace) and one timed run of a VMM against it.

A run starts ``hostside`` in the namespace, waits for its ``ready`` line (its sockets
are bound to the tap), then starts the VMM there too (``ip netns exec NS ...``, which
execs, so the process is the VMM's own) and samples the VMM's CPU time per thread
(``/proc/PID/task/*/schedstat``) every :data:`SAMPLE_SECONDS`; its CPU over the run is
taken between the first sample after hostside reported the first frame and the last
ones before it was done (the guest exits as soon as it is, often before that line is
read). The busiest thread over that span is taken for the vCPU's.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import threading
import time
from typing import Any

import attrs
from common import BenchError, reap, start_threads, thread_cpu

TAP = "hvfb0"
TX_QUEUE_LEN = 1000
GUEST_MAC = "02:00:00:77:00:05"
RUN_TIMEOUT = 300.0
#: How long the host side may take after the VMM has exited (its idle limit is 3 s).
HOST_GRACE = 10.0
#: How often the VMM's per-thread CPU times are read.
SAMPLE_SECONDS = 0.01
HERE = pathlib.Path(__file__).resolve().parent
DIRECTIONS = {"g2h": "guest->host", "h2g": "host->guest"}


def why_no_network() -> str | None:
    """Why the benchmark cannot make its network here, or None."""
    if os.geteuid() != 0:
        return "network namespaces and taps need root"
    if not shutil.which("ip"):
        return "iproute2's ip is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    return None


class TestNet:
    """A network namespace with a persistent tap (up, ``txqueuelen`` 1000, IPv6 off so
    that the host sends nothing of its own), made on entry and removed on exit."""

    def __init__(self) -> None:
        self.name = f"hvfbnet{os.getpid()}"

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(self.command(list(cmd)), capture_output=True, text=True,
                              timeout=60)
        if done.returncode:
            raise BenchError(f"{' '.join(cmd)} in {self.name}: {done.stderr.strip()}")

    def __enter__(self) -> TestNet:
        made = subprocess.run(["ip", "netns", "add", self.name], capture_output=True,
                              text=True)
        if made.returncode:
            raise BenchError(f"cannot make a network namespace: {made.stderr.strip()}")
        try:
            self._run("ip", "link", "set", "lo", "up")
            self._run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                      "net.ipv6.conf.default.disable_ipv6=1")
            self._run("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
            self._run("ip", "link", "set", TAP, "txqueuelen", str(TX_QUEUE_LEN), "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        subprocess.run(self.command(["ip", "tuntap", "del", "dev", TAP, "mode", "tap"]),
                       capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def build_hostside(work: pathlib.Path, cc: str) -> pathlib.Path:
    exe = work / "hostside"
    try:
        subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(HERE / "hostside.c")],
                       check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise BenchError(f"C compiler {cc!r} not found (hostside.c needs one)") from None
    except subprocess.CalledProcessError as e:
        raise BenchError(f"building hostside.c failed:\n{e.stderr}") from None
    return exe


@attrs.frozen
class Row:
    """One line of the report: ``frames`` frames of ``length`` bytes (Ethernet header
    included, no FCS) in ``direction`` g2h (guest to host) or h2g."""

    direction: str
    length: int
    frames: int

    @property
    def name(self) -> str:
        return f"{DIRECTIONS[self.direction]} {self.length} B"

    def append(self) -> str:
        """The virtio_net guest's command line."""
        if self.direction == "g2h":
            return f"source={self.frames} len={self.length}"
        return f"sink={self.frames}"

    def guest_line(self) -> str:
        """The start of the guest's result line."""
        if self.direction == "g2h":
            return f"net source {self.frames} frames {self.length} bytes tsc "
        return f"net sink {self.frames} frames lost 0 late 0 tsc "

    def hostside_args(self, window: int, frames: int | None = None) -> list[str]:
        n = str(frames or self.frames)
        if self.direction == "g2h":
            return ["recv", TAP, n, str(self.length)]
        return ["send", TAP, n, str(self.length), str(window), GUEST_MAC]


def parse_rows(text: str, frames: int) -> list[Row]:
    """``DIR:LEN,...`` with DIR g2h or h2g and LEN 60-1514."""
    rows = []
    for item in text.split(","):
        direction, sep, length = item.strip().partition(":")
        if not sep or direction not in DIRECTIONS or not length.isdigit():
            raise ValueError(f"{item!r} is not DIR:LEN with DIR g2h or h2g")
        if not 60 <= int(length) <= 1514:
            raise ValueError(f"{item!r}: LEN takes 60 to 1514 (bytes, Ethernet header "
                             "included)")
        rows.append(Row(direction, int(length), frames))
    return rows


def parse_done(line: str) -> dict[str, float]:
    """hostside's ``done key=value ...`` line."""
    return {k: float(v) for k, v in (f.split("=", 1) for f in line.split()[1:])}


@attrs.define
class PairRun:
    """A hostside run and the VMM (if any) beside it, as the benchmark saw them."""

    done: dict[str, float]  #: hostside's result
    guest: list[str]  #: the VMM's debug-console lines
    cpu: dict[str, dict[int, float]]  #: the VMM's per-thread CPU at first and done
    returncode: int | None  #: the VMM's exit status
    stderr: str
    started: float  #: from starting the VMM to hostside's first frame (s)


def run_pair(net: TestNet, hostside: list[str], vmm: list[str] | None, what: str,
             timeout: float = RUN_TIMEOUT) -> PairRun:
    """Run ``hostside`` (its arguments after the program) in the namespace and, once it
    is ready, ``vmm``; wait for both."""
    host = subprocess.Popen(net.command(hostside), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    host_readers: list[threading.Thread] = []
    proc: subprocess.Popen[bytes] | None = None
    readers: list[threading.Thread] = []
    guest: list[str] = []
    samples: list[tuple[float, dict[int, float]]] = []
    done: list[str] = []
    errors: list[bytes] = []
    host_err: list[str] = []
    marks: dict[str, float] = {}
    try:
        assert host.stdout is not None
        ready = host.stdout.readline()
        if ready.strip() != "ready":
            raise BenchError(f"{what}: hostside did not start: {ready}{host.stderr.read()}")
        t0 = time.perf_counter()
        if vmm is not None:
            proc = subprocess.Popen(net.command(vmm), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def read_host() -> None:
            assert host.stdout is not None
            for line in host.stdout:
                word = line.split(" ", 1)[0].strip()
                if word in ("first", "done"):
                    marks[word] = time.perf_counter()
                if word == "done":
                    done.append(line.strip())

        def sample_cpu() -> None:
            assert proc is not None
            while proc.poll() is None:
                if threads := thread_cpu(proc.pid):
                    samples.append((time.perf_counter(), threads))
                time.sleep(SAMPLE_SECONDS)

        def read_guest() -> None:
            assert proc is not None and proc.stdout is not None
            for raw in proc.stdout:
                guest.append(raw.decode(errors="replace").rstrip("\n"))

        host_readers = start_threads(read_host, lambda: host_err.append(
            host.stderr.read()))  # type: ignore[union-attr]
        if proc is not None:
            readers = start_threads(read_guest, sample_cpu, lambda: errors.append(
                proc.stderr.read()))  # type: ignore[union-attr]
        # The VMM first (the host side waits for frames that a failed guest never
        # sends), then the host side's last frames or ack.
        try:
            for p, limit in ((proc, timeout), (host, HOST_GRACE if proc else timeout)):
                if p is not None:
                    p.wait(limit)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what}: did not finish within {timeout:.0f} s; guest "
                             f"output ended {guest[-4:]}, hostside {done}") from None
    finally:
        if proc is not None:
            reap(proc, readers)
        if host.poll() is None:
            host.kill()
        host.wait()
        for t in host_readers:
            t.join(10)
    stderr = b"".join(errors).decode(errors="replace")
    if not done or host.returncode:
        raise BenchError(f"{what}: hostside failed (exit status {host.returncode}): "
                         f"{''.join(host_err).strip()}; guest output ended {guest[-4:]}\n"
                         f"{stderr[-1500:]}")
    return PairRun(parse_done(done[0]), guest, _span(samples, marks),
                   None if proc is None else proc.returncode, stderr,
                   marks.get("first", t0) - t0)


def _span(samples: list[tuple[float, dict[int, float]]],
          marks: dict[str, float]) -> dict[str, dict[int, float]]:
    """Per-thread CPU at the first sample after hostside's first frame, and each
    thread's last value up to its end (a thread gone from a sample taken while the
    VMM exits keeps its last value)."""
    if "first" not in marks or "done" not in marks:
        return {}
    window = [c for t, c in samples if marks["first"] <= t <= marks["done"]]
    if len(window) < 2:
        return {}
    last: dict[int, float] = {}
    for threads in window:
        last.update(threads)
    return {"first": window[0], "done": last}


def measure(run: PairRun, row: Row, what: str) -> dict[str, Any]:
    """One VMM run's figures, after checking that guest and host side did the whole row."""
    d = run.done
    result = next((line for line in run.guest if line.startswith(row.guest_line())), None)
    if run.returncode != 1 or result is None:
        raise BenchError(f"{what}: the guest did not finish the row (exit status "
                         f"{run.returncode}, want 1)\nguest: {run.guest[-6:]}\n"
                         f"stderr: {run.stderr[-1500:]}")
    if not run.cpu:
        raise BenchError(f"{what}: the VMM's CPU time was not sampled twice over the "
                         f"{d['seconds']:.3f} s run; send more frames (--frames)")
    if d["frames"] != row.frames or d["lost"] or d["late"] or d["other"]:
        raise BenchError(f"{what}: the host side got {d['frames']:.0f} of {row.frames} "
                         f"frames (lost {d['lost']:.0f}, late {d['late']:.0f}, other "
                         f"{d['other']:.0f}); socket drops {d['socket_drops']:.0f}, tap "
                         f"drops {d['tap_dropped']:.0f}")
    before, after = run.cpu["first"], run.cpu["done"]
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    cpu_s = sum(spent.values())
    # The vCPU thread is the busiest: the guest polls, so it never leaves KVM_RUN long
    # enough for bench/disk's vcpu_thread to catch it in the ioctl.
    vcpu_s = max(spent.values(), default=0.0)
    n, seconds = d["measured"], d["seconds"]
    return {
        "frames": row.frames, "measured": n, "seconds": seconds,
        "frames_per_s": n / seconds, "bytes_per_s": n * row.length / seconds,
        "cpu_s": cpu_s, "frames_per_cpu_s": n / cpu_s if cpu_s else float("inf"),
        "cpu_us_per_frame": cpu_s / n * 1e6,
        "vcpu_us_per_frame": vcpu_s / n * 1e6,
        "other_us_per_frame": (cpu_s - vcpu_s) / n * 1e6,
        "hostside_us_per_frame": d["cpu"] / n * 1e6,
        "guest_tsc": int(result[len(row.guest_line()):], 16),
        "tap_dropped": d["tap_dropped"], "socket_drops": d["socket_drops"],
        "startup_s": run.started,
    }


def ceiling(run: PairRun, row: Row, frames: int) -> dict[str, Any]:
    """The host side against its own peer on the tap: its rate for ``row``."""
    d = run.done
    if d["frames"] != frames or d["lost"]:
        raise BenchError(f"host ceiling {row.name}: {d['frames']:.0f} of {frames} frames "
                         f"(lost {d['lost']:.0f})")
    return {"frames_per_s": d["measured"] / d["seconds"],
            "bytes_per_s": d["measured"] * row.length / d["seconds"],
            "cpu_us_per_frame": d["cpu"] / d["measured"] * 1e6}
