# SPDX-License-Identifier: BSD-2-Clause
"""Helpers shared by the benchmarks in ``bench/*/run.py``.

Each ``run.py`` runs as a script and puts this folder on ``sys.path`` to import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
GUEST_BUILD = REPO / "tests" / "guests" / "build.py"
#: How often a file backend's size is polled.
POLL_SECONDS = 0.001


class BenchError(RuntimeError):
    """The benchmark cannot be run, or a run did not do what it should."""


class Log:
    """Progress on stderr (silenced by ``--quiet``) and errors (always)."""

    def __init__(self, prog: str, quiet: bool) -> None:
        self.prog, self.quiet = prog, quiet

    def __call__(self, msg: str) -> None:
        """Write a progress line as it is."""
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        """Write a progress line headed by the benchmark's name."""
        self(f"{self.prog}: {msg}")

    def error(self, msg: object) -> None:
        """Write an error, headed by the benchmark's name, even when quiet."""
        print(f"{self.prog}: {msg}", file=sys.stderr, flush=True)


# ---- setting up ----


def require_kvm() -> None:
    """Raise BenchError unless /dev/kvm can be opened read-write."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not readable and writable")


def require_hvf() -> None:
    """Raise BenchError unless this interpreter can import hvf (it runs ``-m hvf``)."""
    probe = subprocess.run([sys.executable, "-c", "import hvf"], capture_output=True)
    if probe.returncode != 0:
        raise BenchError(
            f"{sys.executable} cannot import hvf; run this with the interpreter that has "
            "hvf installed (.venv/bin/python)"
        )


def build_guest(name: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Build test guest ``name`` (tests/guests) into ``out_dir``; its ``.elf`` path."""
    spec = importlib.util.spec_from_file_location("hvf_guest_build", GUEST_BUILD)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {GUEST_BUILD}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return pathlib.Path(module.build_guest(name, out_dir))
    except module.GuestBuildError as e:
        raise BenchError(f"building the {name} guest: {e}") from None


def find_tool(name: str, package: str, install: bool, log: Log, other: str = "") -> str:
    """The program ``name``; installs Debian's ``package`` when it is missing, as root
    and when allowed (``install``). ``other`` ends the advice when it cannot."""
    found = shutil.which(name)
    if found:
        return found
    how = f"install it with `apt-get install -y {package}` (as root){other}"
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(f"{name} not found; {how}")
    log.note(f"{name} not found, installing {package} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install_cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    for cmd in (install_cmd, ["apt-get", "update"], install_cmd):
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=env, capture_output=True,
                              text=True)
        if cmd is install_cmd and done.returncode == 0:
            break
    found = shutil.which(name)
    if not found:
        raise BenchError(f"installing {package} failed; {how}\n{done.stderr[-2000:]}")
    return found


def find_qemu(name: str, install: bool, log: Log) -> str:
    """The QEMU binary; installs Debian's qemu-system-x86 when missing, root and allowed."""
    return find_tool(name, "qemu-system-x86", install, log, " or pass --qemu PATH")


# ---- running ----


def process_cpu_s(pid: int) -> float | None:
    """User + system time so far of process ``pid``, all its threads (KVM accounts guest
    time, and its in-kernel emulation, to the vCPU thread); None once it is gone."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU time (s) so far of each live thread of ``pid``, by thread id: its scheduler
    run time (``schedstat``, nanoseconds, where ``/proc/PID/stat`` counts 10 ms clock
    ticks); empty once the process is gone. On kvm_pvm the guest's emulated
    instructions are the vCPU thread's."""
    found = {}
    try:
        tasks = list(pathlib.Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    for task in tasks:
        try:
            found[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return found


@dataclasses.dataclass(frozen=True)
class CpuReading:
    """A process's CPU time at one moment, two ways: its live threads' scheduler run
    times (fine) and the whole process's user + system time, threads that have ended
    included (in clock ticks)."""

    fine: float
    ticks: float
    threads: frozenset[int]


def cpu_reading(pid: int) -> CpuReading | None:
    """``pid``'s CPU time now; None once it is gone."""
    threads = thread_cpu(pid)
    ticks = process_cpu_s(pid)
    if ticks is None or not threads:
        return None
    return CpuReading(sum(threads.values()), ticks, frozenset(threads))


#: A span's fine CPU time is trusted unless the ticks exceed it by more than this.
TICK_SLACK_S = 0.025


def cpu_between(start: CpuReading | None, end: CpuReading | None) -> float | None:
    """The CPU time a process used from ``start`` to ``end``: by its threads' run times
    (nanoseconds), unless a thread alive at ``start`` had ended by ``end`` or the
    ticks count more (a thread that came and went between them), then by the ticks."""
    if start is None or end is None:
        return None
    fine, ticks = end.fine - start.fine, end.ticks - start.ticks
    if start.threads - end.threads or ticks - fine > TICK_SLACK_S:
        return ticks
    return fine


def start_threads(*targets: Callable[[], object]) -> list[threading.Thread]:
    """Start a daemon thread for each of ``targets`` (readers of a child's pipes)."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def reap(proc: subprocess.Popen[bytes], readers: list[threading.Thread]) -> int | None:
    """Kill ``proc`` if it still runs, wait for it and its pipe readers, close its pipes;
    returns its exit status if it had exited by itself, else None."""
    exited = proc.poll()
    if exited is None:
        proc.kill()
    proc.wait()
    for t in readers:
        t.join(10)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    return exited


def hvf_command(memory_mib: int, kernel: pathlib.Path, append: str,
                devices: Iterable[str]) -> list[str]:
    """hvf with the machine the throughput benchmarks use: one vCPU, hostbridge, LPC,
    pc-testdev (port 0xF4 exits), the debug console (0x402) on stdout, ``devices``
    (``-l``/``-s`` options) and a multiboot kernel."""
    return [
        sys.executable, "-m", "hvf", "-m", f"{memory_mib}M", "-c", "1",
        "-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev", "-l", "debugcon,stdio",
        *devices, "--kernel", str(kernel), "--append", append, "bench",
    ]


def qemu_command(qemu: str, accel: str, memory_mib: int, kernel: pathlib.Path, append: str,
                 devices: Iterable[str]) -> list[str]:
    """QEMU with the same machine shape as :func:`hvf_command`: one vCPU, no default
    devices, isa-debug-exit at 0xF4, isa-debugcon at 0x402 on stdout, ``devices``."""
    return [
        qemu, "-accel", accel, "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-chardev", "stdio,id=dc", "-device", "isa-debugcon,iobase=0x402,chardev=dc",
        *devices, "-kernel", str(kernel), "-append", append,
    ]


def choose_qemu_accel(requested: str, probe: Callable[[str], str | None]) -> tuple[str, str | None]:
    """The accelerator for ``--qemu-accel requested`` (auto, kvm or tcg) and why KVM
    failed (None if it worked or was not tried); ``probe(accel)`` runs the guest briefly
    and returns None or what went wrong. auto falls back to TCG."""
    accel, kvm_failure = requested, None
    if accel in ("auto", "kvm"):
        kvm_failure = probe("kvm")
        if kvm_failure is not None and accel == "kvm":
            raise BenchError(f"QEMU with KVM does not run the guest: {kvm_failure}")
        accel = "kvm" if kvm_failure is None else "tcg"
    if accel == "tcg":
        tcg_failure = probe("tcg")
        if tcg_failure is not None:
            raise BenchError(f"QEMU does not run the guest: {tcg_failure}")
    return accel, kvm_failure


class Backend:
    """Where a guest's output goes: a regular file, or a UNIX socket (``kind`` ``unix``)
    that the benchmark connects to as soon as the VMM listens and reads all along.

    With ``expect`` (the bytes the run should deliver) it also records, from
    :meth:`attach` on, when the first bytes arrived (:attr:`first_at`, how many:
    :attr:`first_size`) and when the ``expect``-th did (:attr:`complete_at`), with the
    VMM's CPU time at both (:attr:`first_cpu`, :attr:`complete_cpu`); a file's size is
    then polled every :data:`POLL_SECONDS` by a thread.
    """

    def __init__(self, kind: str, work: pathlib.Path, tag: str,
                 expect: int | None = None) -> None:
        self.kind = kind
        self.path = work / (f"{tag}.out" if kind == "file" else f"{tag}.sock")
        self.expect = expect
        self.received = bytearray()
        self.last_byte_at = 0.0
        self.first_at: float | None = None
        self.first_size = 0
        self.first_cpu: CpuReading | None = None
        self.complete_at: float | None = None
        self.complete_cpu: CpuReading | None = None
        self._pid = 0
        self._seen = 0
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        if self.path.exists():
            self.path.unlink()

    def attach(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        """Connect the reader (socket backends) as soon as the VMM listens; start
        watching a file when ``expect`` was given."""
        self._pid = proc.pid
        if self.kind != "unix":
            if self.expect is not None:
                self._thread = threading.Thread(target=self._poll, daemon=True)
                self._thread.start()
            return
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                break
            except OSError:
                s.close()
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise BenchError(f"nothing listens on {self.path}") from None
                time.sleep(0.0005)
        self._sock = s
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _arrived(self, total: int, now: float) -> None:
        """``total`` bytes have reached the backend by ``now``."""
        if total > self._seen:
            self._seen = total
            self.last_byte_at = now
            if self.first_at is None:
                self.first_at, self.first_size = now, total
                self.first_cpu = cpu_reading(self._pid)
            if self.expect is not None and total >= self.expect and self.complete_at is None:
                self.complete_at = now
                self.complete_cpu = cpu_reading(self._pid)

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            self.received += chunk
            self._arrived(len(self.received), time.perf_counter())

    def _poll(self) -> None:
        while self.complete_at is None and not self._stop.wait(POLL_SECONDS):
            self._arrived(self.size(), time.perf_counter())

    def size(self) -> int:
        """Bytes delivered so far."""
        if self.kind == "file":
            try:
                return self.path.stat().st_size
            except FileNotFoundError:
                return 0
        return len(self.received)

    def finish(self) -> bytes:
        """Stop reading or watching (once the VMM has exited); everything delivered."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._sock is not None:
            self._sock.close()
        if self.kind == "file":
            self._arrived(self.size(), time.perf_counter())  # a last byte the poll missed
            data = self.path.read_bytes() if self.path.exists() else b""
            self.path.unlink(missing_ok=True)
            return data
        self.path.unlink(missing_ok=True)
        return bytes(self.received)


@dataclasses.dataclass
class VmmRun:
    """One VMM run as :func:`run_vmm` saw it (times are ``time.perf_counter()``)."""

    lines: list[tuple[float, str]]  #: debug-console lines with their arrival times
    cpu_at: dict[str, CpuReading | None]  #: the VMM's CPU time when the marked lines arrived
    returncode: int
    stderr: str
    data: bytes  #: everything the backend received
    t0: float  #: just before the VMM was started
    t_exit: float  #: when it was seen to have exited
    samples: list[tuple[float, int]]  #: (time, backend size) polled after the done line

    def line_at(self, text: str) -> float | None:
        """When the first line equal to ``text`` arrived; None if none did."""
        return next((t for t, line in self.lines if line == text), None)

    def require(self, what: str, *texts: str) -> None:
        """Raise BenchError unless the guest exited with status 1 (wrote 0 to port
        0xF4) after printing each of ``texts``."""
        if self.returncode != 1 or any(self.line_at(t) is None for t in texts):
            stdout = [line for _, line in self.lines]
            raise BenchError(f"{what}: the guest did not finish (exit status "
                             f"{self.returncode}, want 1)\nstdout: {stdout}\n"
                             f"stderr: {self.stderr[-2000:]}")


def run_vmm(cmd: list[str], backend: Backend, done_line: str, cpu_lines: Iterable[str],
            what: str, timeout: float) -> VmmRun:
    """Run one VMM whose debug console is its stdout until it exits: timestamp every
    line (and take its CPU time when a line of ``cpu_lines`` or ``done_line``
    arrives), attach ``backend``, wait for ``done_line``, then poll the backend's size
    every :data:`POLL_SECONDS` until the VMM exits (or ``timeout`` runs out)."""
    lines: list[tuple[float, str]] = []
    seen = threading.Condition()
    marked = {done_line, *cpu_lines}
    cpu_at: dict[str, CpuReading | None] = {}
    t0 = time.perf_counter()
    deadline = t0 + timeout
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def read_stdout() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            now = time.perf_counter()
            line = raw.decode(errors="replace").rstrip("\n")
            if line in marked and line not in cpu_at:
                cpu_at[line] = cpu_reading(proc.pid)
            with seen:
                lines.append((now, line))
                seen.notify_all()

    errors: list[bytes] = []
    readers = start_threads(read_stdout,
                            lambda: errors.append(proc.stderr.read()))  # type: ignore[union-attr]

    def done_seen() -> bool:
        return any(line == done_line for _, line in lines)

    samples: list[tuple[float, int]] = []
    try:
        backend.attach(proc, deadline)
        with seen:
            while not done_seen() and proc.poll() is None:
                if time.perf_counter() > deadline:
                    raise BenchError(f"{what}: no `{done_line}` within {timeout:.0f} s; "
                                     f"stdout ended {[line for _, line in lines][-4:]}, "
                                     f"the backend had {backend.size()} bytes")
                seen.wait(0.05)
        # The guest is done; poll how much has reached the backend until the VMM exits.
        while proc.poll() is None:
            samples.append((time.perf_counter(), backend.size()))
            if time.perf_counter() > deadline:
                raise BenchError(f"{what}: did not exit within {timeout:.0f} s")
            time.sleep(POLL_SECONDS)
        t_exit = time.perf_counter()
    finally:
        reap(proc, readers)
        data = backend.finish()
    return VmmRun(lines=lines, cpu_at=cpu_at, returncode=proc.returncode,
                  stderr=b"".join(errors).decode(errors="replace"), data=data, t0=t0,
                  t_exit=t_exit, samples=samples)


# ---- reporting ----


#: The two VMMs every comparison runs, in the order of a round's first half.
VMMS = ("hvf", "qemu")


def medians(rounds: list[dict[str, Any]], who: str, keys: Iterable[str]) -> dict[str, float]:
    """The median over ``rounds`` of each of ``who``'s figures ``keys``."""
    return {k: statistics.median(r[who][k] for r in rounds) for k in keys}


def judge(entry: dict[str, Any], metric: str, target: float) -> dict[str, Any]:
    """Give a summary row its ratio by ``metric`` and its PASS/MISS against ``target``."""
    entry["ratio"] = entry[metric]["ratio"]
    entry["verdict"] = "PASS" if entry["ratio"] >= target else "MISS"
    return entry


def verdict(rows: Any, metric: str, target: float) -> dict[str, Any]:
    """The summary of judged ``rows`` (a list, or a dict of them): PASS only when every
    row passes, and the least ratio."""
    judged = list(rows.values()) if isinstance(rows, dict) else rows
    return {"metric": metric, "target": target, "rows": rows,
            "verdict": "PASS" if all(e["verdict"] == "PASS" for e in judged) else "MISS",
            "ratio": min(e["ratio"] for e in judged)}


def qemu_kvm_note(config: dict[str, Any]) -> list[str]:
    """The report's line saying QEMU fell back to TCG, if it did."""
    if not config.get("qemu_kvm_failure"):
        return []
    return [f"  NOTE:    QEMU with KVM failed here ({config['qemu_kvm_failure']}); "
            "the comparison is against QEMU with TCG"]


def ratio_stats(ratios: list[float]) -> dict[str, float]:
    """Median, least and greatest of per-round ratios."""
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def host_info(**extra: Any) -> dict[str, Any]:
    """The host: kernel, KVM module, CPU, Python; then ``extra``."""
    cpu = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kvm = next(
        (m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.exists(f"/sys/module/{m}")),
        "unknown",
    )
    return {
        "kernel": platform.release(), "kvm_module": kvm, "cpu": cpu, "cpus": os.cpu_count(),
        "python": platform.python_version(), "python_executable": sys.executable, **extra,
    }


def qemu_host_info(qemu: str) -> dict[str, Any]:
    """host_info with QEMU's version and path and the load average."""
    return host_info(qemu=version_line(qemu), qemu_path=qemu,
                     loadavg=" ".join(f"{x:.2f}" for x in os.getloadavg()))


def version_line(tool: str) -> str:
    """The first line of ``tool --version``; empty if that fails."""
    try:
        return subprocess.run([tool, "--version"], capture_output=True,
                              text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return ""


def write_json(path: pathlib.Path, doc: dict[str, Any], indent: int = 2) -> None:
    """Write ``doc`` to ``path`` (its folder created if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent) + "\n")


# ---- command line ----


def add_rounds_options(parser: argparse.ArgumentParser, rounds: int,
                       warmup_help: str = "unmeasured rounds first (default 1)") -> None:
    """--rounds and --warmup."""
    parser.add_argument("--rounds", type=int, default=rounds,
                        help=f"measured rounds (default {rounds})")
    parser.add_argument("--warmup", type=int, default=1, help=warmup_help)


def add_verdict_options(parser: argparse.ArgumentParser, target: float, target_help: str,
                        metrics: tuple[str, ...], metric: str) -> None:
    """--target (``target_help`` is followed by the default) and --metric."""
    parser.add_argument("--target", type=float, default=target,
                        help=f"{target_help} (default {target})")
    parser.add_argument("--metric", choices=metrics, default=metric,
                        help=f"the clock the verdict uses (default {metric}; both are "
                        "reported)")


def add_qemu_options(parser: argparse.ArgumentParser) -> None:
    """--qemu and --no-install."""
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install qemu-system-x86 when QEMU is missing")


def add_qemu_accel_option(parser: argparse.ArgumentParser) -> None:
    """--qemu-accel auto|kvm|tcg (see :func:`choose_qemu_accel`)."""
    parser.add_argument("--qemu-accel", choices=("auto", "kvm", "tcg"), default="auto",
                        help="QEMU's accelerator; auto: KVM if it runs the guest here, "
                        "else TCG, which the report then says (default auto)")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json, --strict and -q/--quiet."""
    parser.add_argument("--json", metavar="PATH", type=pathlib.Path,
                        help="also write the results as JSON to PATH")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 on MISS (default: 0 for PASS and MISS)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
