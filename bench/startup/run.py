# SPDX-License-Identifier: BSD-2-Clause
"""bench/startup: how long hvf takes from process start to a running guest, and how
much memory hvf itself uses, against QEMU.

Start-up, three ways (each run is a fresh ``python -m hvf`` process, timed from just
before ``Popen``):

- ``plain``: ``python -m hvf -s 0,hostbridge -s 31,lpc -l pc-testdev -l debugcon,stdio
  --kernel counter.elf --append "every=1 debugcon=1" NAME`` (tests/guests ``counter``: its first
  instructions print ``counter start`` on the debug console, port 0x402, the
  benchmark's stdout pipe);
- ``restore``: ``python -m hvf -r SNAPSHOT NAME``, a snapshot of that guest taken once
  (``hvf ctl suspend --exit`` after a few lines); the first output is the guest's next
  ``count N`` line (it prints one per PIT tick of 10 ms, so this mark lags the guest
  running by up to a tick);
- ``exit``: the ``hello`` guest with ``exit=0``, which prints and stops at once: process
  start to hvf's exit (status 1), the whole life of a short VM.

Marks per run: ``output``, the guest's first line on the pipe (a thread reads it; in
``plain`` the guest writes it once its set-up code has run: .bss cleared, page tables,
IDT; on kvm_pvm, which emulates that code, its first exit to hvf comes ~25 ms after its
first instruction (~8 ms for ``hello``), so this bounds process start to the guest's
first instruction from above); ``running``, the VM's reply ``"state": "running"`` to
``status`` on its control socket (polled for from the start, every 0.5 ms); the VMM's
CPU time (user + system, all threads, /proc/PID/stat) when the output arrived; then
``poweroff`` on the control socket. The interpreter alone (``python -c pass``, the same
interpreter and site) is timed too, as the floor no Python program starts under.
Target: ``plain`` and ``restore`` median process start to running at most 100 ms.

Memory: the SeaBIOS guest of bench/boot (``-m 256M -s 0,hostbridge -s 31,lpc -l
com1,stdio -l bootrom,bios.bin``) against ``qemu-system-x86_64 -M pc -accel kvm -m 256
-bios bios.bin -nographic ... -vga none -nodefaults``; once ``No bootable device``
arrives, each process's resident memory is summed from /proc/PID/smaps, less every
mapping of at least the guest's RAM size (guest RAM), and split into anonymous memory,
the executable and shared libraries, and other files. Target: hvf at most 0.5 x QEMU.

    python bench/startup/run.py [--rounds R] [--no-memory] [--json PATH] [-q]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/, for common
from common import (
    BenchError,
    Log,
    add_output_options,
    add_qemu_options,
    add_rounds_options,
    build_guest,
    find_qemu,
    qemu_host_info,
    reap,
    require_hvf,
    require_kvm,
    start_threads,
    write_json,
)

DEFAULT_ROUNDS = 9
TARGET_S = 0.100
TARGET_MEMORY = 0.5
TIMEOUT = 60.0
POLL_S = 0.0005
MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev", "-l", "debugcon,stdio")
BIOS = "/usr/share/seabios/bios.bin"
MEMORY_MIB = 256
DONE = b"No bootable device"


# ---- the control socket, spoken directly (the benchmark must not start hvf's client) ----


def cpu_ns(pid: int) -> int | None:
    """CPU time so far of every live thread of ``pid`` (schedstat: nanoseconds)."""
    total = 0
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"{task.path}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError):
        return None
    return total


def _call(sock: socket.socket, reader: Any, command: str) -> dict[str, Any]:
    sock.sendall(json.dumps({"id": 1, "command": command}).encode() + b"\n")
    return json.loads(reader.readline() or b"{}")


class Run:
    """One hvf process: its stdout lines timestamped, the control socket polled until
    the VM says it runs."""

    def __init__(self, cmd: list[str], env: dict[str, str], sock_path: pathlib.Path,
                 first_output: bytes) -> None:
        self.sock_path, self.first_output = sock_path, first_output
        self.marks: dict[str, float] = {}
        self.cpu_at_output: float | None = None
        self.cpu_at_running: float | None = None
        self.lines: list[bytes] = []
        self.errors: list[bytes] = []
        self.seen = threading.Event()
        self.reader: Any = None
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.readers = start_threads(self._read_stdout, self._read_stderr)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.perf_counter()
            self.lines.append(line)
            if "output" not in self.marks and line.startswith(self.first_output):
                self.marks["output"] = now - self.t0
                cpu = cpu_ns(self.proc.pid)
                self.cpu_at_output = None if cpu is None else cpu / 1e9
                self.seen.set()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.errors.append(self.proc.stderr.read())

    def fail(self, why: str) -> BenchError:
        reap(self.proc, self.readers)
        return BenchError(f"{why}; stdout {b''.join(self.lines)[-300:]!r}, stderr "
                          f"{b''.join(self.errors)[-1500:].decode(errors='replace')}")

    def wait_running(self) -> socket.socket:
        """Connect as soon as the socket exists; returns it once ``status`` says running."""
        deadline = self.t0 + TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"hvf exited with status {self.proc.returncode} before running")
            if time.perf_counter() > deadline:
                raise self.fail("the VM did not answer on its control socket")
            if self.sock_path.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.sock_path))
                    reader = s.makefile("rb")
                    reader.readline()  # the greeting: sent once the server runs
                    if _call(s, reader, "status").get("return", {}).get("state") == "running":
                        self.marks["running"] = time.perf_counter() - self.t0
                        cpu = cpu_ns(self.proc.pid)
                        self.cpu_at_running = None if cpu is None else cpu / 1e9
                        self.reader = reader
                        return s
                except OSError:
                    pass
                s.close()
            time.sleep(POLL_S)

    def finish(self, sock: socket.socket) -> dict[str, Any]:
        if not self.seen.wait(TIMEOUT):
            raise self.fail("no guest output")
        _call(sock, self.reader, "poweroff")
        sock.close()
        status = self.proc.wait(TIMEOUT)
        reap(self.proc, self.readers)
        return {**self.marks, "cpu_at_output": self.cpu_at_output,
                "cpu_at_running": self.cpu_at_running, "status": status}


def hvf(*args: str) -> list[str]:
    return [sys.executable, "-m", "hvf", *args]


class Variant:
    """One hvf to time (``env``: how it is found), with its own snapshot and names."""

    def __init__(self, label: str, work: pathlib.Path, env: dict[str, str],
                 guests: dict[str, pathlib.Path]) -> None:
        self.label, self.env, self.guests = label, env, guests
        self.run_dir = pathlib.Path(env["HVF_RUNTIME_DIR"])
        self.snapshot = work / f"counter-{label}.snapshot"
        self.count = 0

    def name(self) -> str:
        self.count += 1
        return f"startup-{os.getpid()}-{self.label}-{self.count}"

    def plain_cmd(self, name: str) -> list[str]:
        return hvf(*MACHINE, "--kernel", str(self.guests["counter"]), "--append",
                   "every=1 debugcon=1", name)

    def run(self, cmd: list[str], name: str, first_output: bytes) -> Run:
        return Run(cmd, self.env, self.run_dir / f"{name}.sock", first_output)

    def take_snapshot(self) -> None:
        name = self.name()
        run = self.run(self.plain_cmd(name), name, b"count 3")
        sock = run.wait_running()
        if not run.seen.wait(TIMEOUT):
            raise run.fail("the counter guest printed no `count 3`")
        sock.sendall(json.dumps({"id": 2, "command": "suspend", "args": {
            "path": str(self.snapshot), "exit": True}}).encode() + b"\n")
        while True:  # progress lines, then the reply
            reply = json.loads(run.reader.readline() or b"{}")
            if "return" in reply or "error" in reply or not reply:
                break
        sock.close()
        run.proc.wait(TIMEOUT)
        reap(run.proc, run.readers)
        if "return" not in reply:
            raise BenchError(f"{self.label}: suspend failed: {reply}")

    def plain(self) -> dict[str, Any]:
        name = self.name()
        run = self.run(self.plain_cmd(name), name, b"counter start")
        return run.finish(run.wait_running())

    def restore(self) -> dict[str, Any]:
        name = self.name()
        run = self.run(hvf("-r", str(self.snapshot), name), name, b"count ")
        return run.finish(run.wait_running())

    def exit(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        done = subprocess.run(hvf(*MACHINE, "--kernel", str(self.guests["hello"]),
                                  "--append", "exit=0", self.name()),
                              env=self.env, capture_output=True)
        wall = time.perf_counter() - t0
        if done.returncode != 1 or not done.stdout.startswith(b"hello"):
            raise BenchError(f"{self.label} hello: status {done.returncode}, "
                             f"{done.stderr[-800:]!r}")
        return {"exit": wall}


def bytecode_note() -> str:
    """Whether hvf's modules start from cached bytecode (a .pyc as new as its source)."""
    probe = subprocess.run([sys.executable, "-c", (
        "import hvf, importlib.util, os, pathlib, sys\n"
        "src = [str(p) for p in pathlib.Path(hvf.__file__).parent.glob('*.py')]\n"
        "old = [s for s in src if not os.path.exists(importlib.util.cache_from_source(s))"
        " or os.path.getmtime(importlib.util.cache_from_source(s)) < os.path.getmtime(s)]\n"
        "print(len(old), len(src), sys.flags.dont_write_bytecode)")],
        capture_output=True, text=True, check=True)
    stale, total, no_write = (int(x) for x in probe.stdout.split())
    if not stale:
        return "hvf's modules start from cached bytecode"
    why = "PYTHONDONTWRITEBYTECODE is set, so " if no_write else ""
    return (f"{stale} of hvf's {total} core modules have no cached bytecode: {why}every start "
            "compiles them (python -m compileall core plugins caches it)")


def floor() -> dict[str, Any]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return {"exit": time.perf_counter() - t0}


# ---- memory: hvf's own against QEMU's ----


def own_memory(pid: int, guest_bytes: int) -> dict[str, int]:
    """Resident KiB of ``pid`` from its smaps, less mappings of at least ``guest_bytes``
    (guest RAM), split by what backs them."""
    parts = {"anonymous": 0, "code": 0, "files": 0, "guest_ram": 0}
    kind = "anonymous"
    exe = os.path.realpath(f"/proc/{pid}/exe")
    for line in pathlib.Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            path = head[5] if len(head) > 5 else ""
            if end - start >= guest_bytes:
                kind = "guest_ram"
            elif path.startswith("/") and (".so" in path or path == exe):
                kind = "code"
            elif path.startswith("/") and not path.startswith("/memfd:"):
                kind = "files"
            else:
                kind = "anonymous"
        elif head[0] == "Rss:":
            parts[kind] += int(head[1])
    parts["own"] = parts["anonymous"] + parts["code"] + parts["files"]
    return parts


def seabios_memory(cmd: list[str], env: dict[str, str], what: str) -> dict[str, int]:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    out = bytearray()
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            out.extend(chunk)
            if DONE in out:
                done.set()
        done.set()

    readers = start_threads(read)
    try:
        if not done.wait(180) or DONE not in out:
            raise BenchError(f"{what}: no `No bootable device`: {bytes(out[-300:])!r}")
        time.sleep(0.2)  # let the firmware's last output settle
        return own_memory(proc.pid, MEMORY_MIB << 20)
    finally:
        proc.send_signal(signal.SIGKILL)
        reap(proc, readers)


def memory(env: dict[str, str], qemu: str, name: str) -> dict[str, Any]:
    hvf_cmd = hvf("-m", f"{MEMORY_MIB}M", "-s", "0,hostbridge", "-s", "31,lpc",
                  "-l", "com1,stdio", "-l", f"bootrom,{BIOS}", name)
    qemu_cmd = [qemu, "-M", "pc", "-accel", "kvm", "-m", str(MEMORY_MIB), "-bios", BIOS,
                "-nographic", "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-net", "none", "-no-reboot", "-vga", "none", "-nodefaults"]
    result = {"hvf": seabios_memory(hvf_cmd, env, "hvf"),
              "qemu": seabios_memory(qemu_cmd, env, "QEMU"),
              "commands": {"hvf": hvf_cmd, "qemu": qemu_cmd}}
    result["ratio"] = result["hvf"]["own"] / result["qemu"]["own"]
    return result


# ---- the report ----

SCENARIOS = ("plain", "restore", "exit")
KEYS = ("output", "running", "cpu_at_running", "exit")


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per row label (``plain``, ``plain baseline``, ``floor``...) and mark: the
    median and the least over the rounds."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for label in rows[0]:
        summary[label] = {}
        for key in KEYS:
            values = [r[label][key] for r in rows if r[label].get(key) is not None]
            if values:
                summary[label][key] = {"median": statistics.median(values),
                                       "min": min(values)}
    return summary


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f}"


def _cell(d: dict[str, float] | None) -> str:
    return f"{'':>15}" if d is None else f"{_ms(d['median']):>7} ({_ms(d['min']):>5})"


def report(summary: dict[str, dict[str, dict[str, float]]], rounds: int,
           mem: dict[str, Any] | None, host: dict[str, Any]) -> tuple[str, bool]:
    ok = all(summary[s]["running"]["median"] <= TARGET_S for s in ("plain", "restore"))
    out = [
        "bench/startup: process start to a running guest, and hvf's own memory",
        f"  host: Linux {host['kernel']}, {host['kvm_module']}, {host['cpus']} CPUs; load "
        f"average {host['loadavg']}; Python {host['python']}",
        f"  {host['bytecode']}",
        f"  milliseconds from Popen, median (least) of {rounds} rounds:",
        f"    {'':18}{'output':>15}{'running':>15}{'cpu@running':>15}{'exit':>15}",
    ]
    for label, marks in summary.items():
        out.append(f"    {label:18}" + "".join(_cell(marks.get(k)) for k in KEYS))
    out += [
        "    plain: --kernel counter.elf (its first output follows its set-up code); "
        "restore: -r SNAPSHOT of it;",
        "    exit: the hello guest with exit=0, to hvf's exit; floor: python -c pass; "
        "running: `status` says so",
        "    on the control socket; cpu@running: hvf's CPU time then (all threads)",
        f"  target: plain and restore running <= {TARGET_S * 1000:.0f} ms (median) -> "
        f"{'PASS' if ok else 'MISS'}",
    ]
    if mem is not None:
        h, q = mem["hvf"], mem["qemu"]
        out += [
            "  memory at `No bootable device` (SeaBIOS, 256 MiB), resident KiB less guest RAM:",
            f"    {'':6}{'own':>8}{'anon':>8}{'code':>8}{'files':>8}{'guest RAM':>11}",
            *(f"    {n:6}{d['own']:8}{d['anonymous']:8}{d['code']:8}{d['files']:8}"
              f"{d['guest_ram']:11}" for n, d in (("hvf", h), ("QEMU", q))),
            "    anon: heap and other private memory; code: the executable and shared "
            "libraries; files: other mapped files",
            f"  hvf/QEMU {mem['ratio']:.2f}; target <= {TARGET_MEMORY} -> "
            f"{'PASS' if mem['ratio'] <= TARGET_MEMORY else 'MISS'}",
        ]
        ok = ok and mem["ratio"] <= TARGET_MEMORY
    return "\n".join(out), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/startup/run.py", description=__doc__.split(
        "\n")[0])
    add_rounds_options(parser, DEFAULT_ROUNDS)
    parser.add_argument("--baseline", metavar="DIR", type=pathlib.Path,
                        help="also time the hvf package in DIR/hvf (run with PYTHONPATH=DIR), "
                        "round by round beside this one: an hvf from before a change")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory comparison")
    add_qemu_options(parser)
    add_output_options(parser)
    args = parser.parse_args(argv)
    log = Log("startup", args.quiet)
    try:
        require_kvm()
        require_hvf()
        if args.baseline is not None and not (args.baseline / "hvf" / "__init__.py").exists():
            raise BenchError(f"--baseline {args.baseline}: no hvf package there")
        qemu = None if args.no_memory else find_qemu(args.qemu, not args.no_install, log)
        host = qemu_host_info(qemu) if qemu else qemu_host_info(sys.executable)
        host["bytecode"] = bytecode_note()
        with tempfile.TemporaryDirectory(prefix="hvf-bench-startup-") as tmp:
            work = pathlib.Path(tmp)
            env = dict(os.environ, HVF_RUNTIME_DIR=str(work / "run"))
            guests = {name: build_guest(name, work) for name in ("counter", "hello")}
            variants = [Variant("hvf", work, env, guests)]
            if args.baseline is not None:
                variants.append(Variant("baseline", work, dict(
                    env, PYTHONPATH=str(args.baseline.resolve())), guests))
            for variant in variants:
                variant.take_snapshot()
            rows = []
            for r in range(args.warmup + args.rounds):
                row: dict[str, Any] = {}
                for scenario in SCENARIOS:
                    for variant in variants[r % 2:] + variants[:r % 2]:  # who goes first
                        label = scenario if variant is variants[0] else f"{scenario} baseline"
                        row[label] = getattr(variant, scenario)()
                row["floor"] = floor()
                if r >= args.warmup:
                    rows.append(row)
                    log.note(f"round {len(rows)}: plain {_ms(row['plain']['running'])} ms, "
                             f"restore {_ms(row['restore']['running'])} ms")
            mem = None if qemu is None else memory(env, qemu, variants[0].name())
    except (BenchError, OSError) as e:
        log.error(e)
        return 2
    summary = summarize(rows)
    text, ok = report(summary, args.rounds, mem, host)
    print(text)
    if args.json:
        write_json(args.json, {"benchmark": "startup", "host": host, "summary": summary,
                               "memory": mem, "per_round": rows})
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
