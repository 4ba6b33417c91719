# SPDX-License-Identifier: BSD-2-Clause
"""bench/migrate: live migration of a 1 GiB guest over TCP between two processes on
this host, hvf against QEMU, idle and dirtying memory: total time and downtime.

Both VMMs run the same multiboot guests (``tests/guests``): ``counter`` (idle: a line
``count N`` on COM1 every PIT tick, ~10 ms) and ``counter_dirty`` (the same lines,
and between two of them it writes one page after another of ``pages=`` as fast as
it can). Each run starts a destination waiting on ``tcp:127.0.0.1:PORT`` (``hvf
--incoming``, QEMU ``-incoming``), then the source; once the guest has printed
``--settle`` lines it is migrated with the same downtime limit and no bandwidth limit
on either side (``migrate`` on hvf's control socket; ``migrate-set-parameters`` and
``migrate`` over QMP for QEMU). COM1 of both processes is a pipe read by the
benchmark, each chunk timestamped.

Figures per run:

* **total**: from the migrate command being sent to the guest's first output on
  the destination (the same clock for both VMMs); the VMM's own figure beside it
  (hvf: to the destination's confirmation; QEMU: ``total-time``, to the end on the
  source).
* **downtime**: the guest's gap, from its last output on the source to its first on
  the destination: how long the guest stood still as it sees it, at most one line
  interval (a tick, ~10 ms) more. The VMM's own figure beside it (hvf: from the pause
  to the destination's confirmation; QEMU: ``downtime``, source-side).
* **bytes** sent and **rounds**, each VMM's own count (hvf's includes the stop-and-copy
  round; QEMU's is ``dirty-sync-count``, its dirty-bitmap syncs).

Every run is checked: the source's output followed by the destination's must be one
sequence ``count 1, count 2, ...``, nothing skipped or repeated.

Targets: the idle guest's downtime under 50 ms on hvf; hvf's downtime and total time
at most QEMU's (medians over the rounds) for both guests.

    python bench/migrate/run.py [--rounds R] [--memory MIB] [--dirty-mib M]
                                [--downtime-ms D] [--json PATH] [--strict] [-q]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/, for common
from common import (  # noqa: E402
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

DEFAULT_MEMORY_MIB = 1024
DEFAULT_DIRTY_MIB = 256
DEFAULT_DOWNTIME_MS = 300  # both VMMs' default limit
DEFAULT_SETTLE = 200  # lines (~2 s) before migrating: the dirtying guest touched its pages
DEFAULT_ROUNDS = 3
IDLE_DOWNTIME_TARGET_MS = 50.0
AFTER_LINES = 20  # lines the destination must print after the hand-over
START_TIMEOUT = 60.0
MIGRATE_TIMEOUT = 300.0
LOCALHOST = "127.0.0.1"
COUNT = re.compile(rb"count (\d+)\n")
SCENARIOS = ("idle", "dirty")
VMMS = ("hvf", "qemu")


# ---- a child VMM and its COM1 ----


class Child:
    """A VMM process with COM1 on its stdout: every chunk timestamped as it arrives."""

    def __init__(self, what: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.what = what
        self.chunks: list[tuple[float, bytes]] = []
        self.errors = bytearray()
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.readers = start_threads(self._read_out, self._read_err)

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            now = time.monotonic()  # before the lock: a waiter may hold it
            with self.changed:
                self.chunks.append((now, chunk))
                self.changed.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            with self.changed:
                self.errors += chunk
                self.changed.notify_all()

    @property
    def output(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    def wait_for(self, test: Any, timeout: float, what: str) -> None:
        """Wait until ``test()`` holds (called with the lock held)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not test():
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise self.fail(f"no {what} within {timeout:g} s")
                self.changed.wait(min(left, 0.2))

    def lines(self) -> int:
        return self.output.count(b"\n")

    def fail(self, why: str) -> BenchError:
        return BenchError(f"{self.what}: {why} (status {self.proc.poll()}); output "
                          f"{self.output[-200:]!r}; stderr "
                          f"{bytes(self.errors[-1500:]).decode(errors='replace')}")

    def close(self) -> None:
        reap(self.proc, self.readers)  # type: ignore[arg-type]


class JsonSocket:
    """hvf's control socket or QEMU's QMP: a greeting, then one JSON object a line."""

    def __init__(self, path: pathlib.Path, owner: Child, qmp: bool) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline or owner.proc.poll() is not None:
                    raise owner.fail(f"no control socket at {path}") from None
                time.sleep(0.02)
        self.reader = self.sock.makefile("rb")
        self.qmp = qmp
        self.sock.settimeout(START_TIMEOUT)
        try:
            self.reader.readline()  # the greeting
        except OSError as e:
            raise owner.fail(f"no greeting on {path} ({e})") from None
        if qmp:
            self.call("qmp_capabilities")

    def call(self, command: str, args: dict[str, Any] | None = None,
             timeout: float = 30.0) -> Any:
        key = "execute" if self.qmp else "command"
        request: dict[str, Any] = {key: command, "id": 1}
        if args:
            request["arguments" if self.qmp else "args"] = args
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                line = self.reader.readline()
                if not line:
                    raise BenchError(f"{command}: the VMM closed its control socket")
                reply = json.loads(line)
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise BenchError(f"{command}: {reply['error']}")
                return reply.get("return")
        except OSError as e:  # a timeout among them
            raise BenchError(f"{command}: the control socket failed: {e}") from None
        except ValueError as e:
            raise BenchError(f"{command}: the VMM's reply is not JSON: {e}") from None

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


# ---- one migration ----


def hvf_pair(work: pathlib.Path, kernel: pathlib.Path, append: str, memory_mib: int,
             downtime_ms: float, settle: int) -> dict[str, Any]:
    port = free_port()
    uri = f"tcp:{LOCALHOST}:{port}"
    env_a = dict(os.environ, HVF_RUNTIME_DIR=str(work / "run-a"))
    env_b = dict(os.environ, HVF_RUNTIME_DIR=str(work / "run-b"))
    python = [sys.executable, "-m", "hvf"]
    dst = Child("hvf destination", [*python, "--incoming", uri, "-l", "com1,stdio", "dst"],
                env_b)
    src = None
    try:
        dst.wait_for(lambda: b"waiting for a migration on" in dst.errors, START_TIMEOUT,
                     "'waiting for a migration'")
        src = Child("hvf source", [
            *python, "-m", f"{memory_mib}M", "-c", "1", "-s", "0,hostbridge", "-s", "31,lpc",
            "-l", "com1,stdio", "--kernel", str(kernel), "--append", append, "src"], env_a)
        src.wait_for(lambda: src.lines() >= settle, START_TIMEOUT, f"{settle} lines")
        control = JsonSocket(work / "run-a" / "src.sock", src, qmp=False)
        sent = time.monotonic()
        try:
            figures = control.call("migrate", {"uri": uri, "downtime_ms": downtime_ms},
                                   timeout=MIGRATE_TIMEOUT)
        finally:
            control.close()
        if not isinstance(figures, dict) or figures.get("state") != "migrated":
            raise src.fail(f"the migration ended as {figures}")
        return finish(src, dst, sent, {
            "vmm_total_ms": figures["total_ms"], "vmm_downtime_ms": figures["downtime_ms"],
            "bytes": figures["bytes"], "rounds": figures["rounds"]})
    finally:
        for child in (src, dst):
            if child is not None:
                child.close()


def qemu_pair(qemu: str, work: pathlib.Path, kernel: pathlib.Path, append: str,
              memory_mib: int, downtime_ms: float, settle: int) -> dict[str, Any]:
    port = free_port()
    uri = f"tcp:{LOCALHOST}:{port}"

    def cmd(qmp: pathlib.Path, *extra: str) -> list[str]:
        return [qemu, "-accel", "kvm", "-m", str(memory_mib), "-smp", "1", "-nodefaults",
                "-display", "none", "-no-reboot", "-monitor", "none", "-serial", "stdio",
                "-qmp", f"unix:{qmp},server=on,wait=off", "-kernel", str(kernel),
                "-append", append, *extra]

    dst = Child("QEMU destination", cmd(work / "qmp-b", "-incoming", uri))
    src = None
    try:
        JsonSocket(work / "qmp-b", dst, qmp=True).close()  # it is up (and listening)
        src = Child("QEMU source", cmd(work / "qmp-a"))
        src.wait_for(lambda: src.lines() >= settle, START_TIMEOUT, f"{settle} lines")
        qmp = JsonSocket(work / "qmp-a", src, qmp=True)
        try:
            qmp.call("migrate-set-parameters", {"downtime-limit": round(downtime_ms),
                                                "max-bandwidth": 1 << 40})
            sent = time.monotonic()
            qmp.call("migrate", {"uri": uri})
            deadline = sent + MIGRATE_TIMEOUT
            while True:
                info = qmp.call("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise src.fail(f"the migration ended as {info}")
                time.sleep(0.005)
        finally:
            qmp.close()
        ram = info.get("ram", {})
        return finish(src, dst, sent, {
            "vmm_total_ms": info["total-time"], "vmm_downtime_ms": info["downtime"],
            "bytes": ram.get("transferred"), "rounds": ram.get("dirty-sync-count")})
    finally:
        for child in (src, dst):
            if child is not None:
                child.close()


def finish(src: Child, dst: Child, sent: float, vmm: dict[str, Any]) -> dict[str, Any]:
    """Wait for the destination's lines; check the sequence; the guest's figures."""
    dst.wait_for(lambda: dst.lines() >= AFTER_LINES, START_TIMEOUT,
                 f"{AFTER_LINES} lines after the migration")
    src_chunks, dst_chunks = list(src.chunks), list(dst.chunks)
    check_sequence(src.output + dst.output, src.what)
    first_dst = dst_chunks[0][0]
    return {"total_ms": 1000 * (first_dst - sent),
            "downtime_ms": 1000 * (first_dst - src_chunks[-1][0]), **vmm}


def check_sequence(output: bytes, what: str) -> None:
    """``counter start`` then ``count 1, 2, ...`` with nothing skipped or repeated."""
    start = output.find(b"counter start\n")
    if start < 0:
        raise BenchError(f"{what}: no 'counter start' in {output[:200]!r}")
    numbers = [int(m) for m in COUNT.findall(output, start)]
    if numbers != list(range(1, len(numbers) + 1)):
        bad = next(i for i, n in enumerate(numbers) if n != i + 1)
        raise BenchError(f"{what}: the count breaks after {bad}: "
                         f"{numbers[max(0, bad - 3):bad + 3]}")


# ---- the benchmark ----


def scenario_append(scenario: str, dirty_mib: int) -> str:
    if scenario == "idle":
        return "every=1"
    return f"every=1 pages={dirty_mib * 256}"


def bench(options: argparse.Namespace, qemu: str, kernels: dict[str, pathlib.Path],
          work: pathlib.Path, log: Log) -> list[dict[str, Any]]:
    def one(vmm: str, scenario: str, n: int) -> dict[str, Any]:
        where = work / f"{vmm}-{scenario}-{n}"
        where.mkdir()
        kernel = kernels[scenario]
        append = scenario_append(scenario, options.dirty_mib)
        if vmm == "hvf":
            return hvf_pair(where, kernel, append, options.memory, options.downtime_ms,
                            options.settle)
        return qemu_pair(qemu, where, kernel, append, options.memory, options.downtime_ms,
                         options.settle)

    n = 0
    for _ in range(options.warmup):
        for vmm in VMMS:
            n += 1
            one(vmm, "idle", n)
    rounds = []
    for r in range(options.rounds):
        order = VMMS if r % 2 == 0 else VMMS[::-1]
        row: dict[str, Any] = {"round": r + 1, "first": order[0]}
        for scenario in SCENARIOS:
            row[scenario] = {}
            for vmm in order:
                n += 1
                got = row[scenario][vmm] = one(vmm, scenario, n)
                log(f"  round {r + 1}/{options.rounds} {scenario:5} {vmm:4}: total "
                    f"{got['total_ms']:.0f} ms, downtime {got['downtime_ms']:.0f} ms "
                    f"(VMM: {got['vmm_total_ms']:.0f} / {got['vmm_downtime_ms']:.0f} ms), "
                    f"{got['bytes'] / 1e6:.1f} MB, {got['rounds']} rounds")
        rounds.append(row)
    return rounds


FIGURES = ("total_ms", "downtime_ms", "vmm_total_ms", "vmm_downtime_ms", "bytes", "rounds")


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for scenario in SCENARIOS:
        med = {vmm: {k: statistics.median(r[scenario][vmm][k] for r in rounds)
                     for k in FIGURES} for vmm in VMMS}
        hvf, qemu = med["hvf"], med["qemu"]
        checks = {"downtime <= QEMU's": hvf["downtime_ms"] <= qemu["downtime_ms"],
                  "total <= QEMU's": hvf["total_ms"] <= qemu["total_ms"]}
        if scenario == "idle":
            checks[f"downtime < {IDLE_DOWNTIME_TARGET_MS:g} ms"] = (
                hvf["downtime_ms"] < IDLE_DOWNTIME_TARGET_MS)
        summary[scenario] = {**med, "checks": checks,
                             "verdict": "PASS" if all(checks.values()) else "MISS"}
    summary["verdict"] = ("PASS" if all(summary[s]["verdict"] == "PASS" for s in SCENARIOS)
                          else "MISS")
    return summary


def report(config: dict[str, Any], summary: dict[str, Any]) -> str:
    host = config["host"]
    out = [
        "bench/migrate: live migration over TCP on this host, hvf vs. QEMU (KVM), same guests",
        f"  guests:  {config['memory_mib']} MiB, 1 vCPU; idle: counter every=1 (a COM1 line "
        f"a PIT tick); dirty: counter_dirty, writing {config['dirty_mib']} MiB page after "
        "page between its lines",
        f"  run:     destination waiting on tcp:{LOCALHOST}:PORT, source migrated after "
        f"{config['settle']} lines; downtime limit {config['downtime_ms']:g} ms, no "
        "bandwidth limit, on both",
        f"  rounds:  {config['rounds']} after {config['warmup']} warm-up; first VMM "
        "alternating per round",
        f"  machine: Linux {host['kernel']}, {host['kvm_module']}, {host['cpus']} CPUs, "
        f"{host['cpu']}; load average at start {host['loadavg']}",
        f"           Python {host['python']}; {host['qemu']}",
        "",
        "  medians:             total ms  downtime ms   VMM total  VMM downtime        MB"
        "  rounds",
    ]
    for scenario in SCENARIOS:
        for vmm in VMMS:
            m = summary[scenario][vmm]
            out.append(f"    {scenario:5} {vmm:5}      {m['total_ms']:9.0f}  "
                       f"{m['downtime_ms']:11.1f}  {m['vmm_total_ms']:10.0f}  "
                       f"{m['vmm_downtime_ms']:12.1f}  {m['bytes'] / 1e6:8.1f}  "
                       f"{m['rounds']:6g}")
    out += [
        "",
        "  total: migrate command sent -> the guest's first output on the destination; "
        "downtime: the guest's",
        "  gap, its last output on the source to its first on the destination (at most one "
        "10 ms tick more); VMM total/downtime:",
        "  each VMM's own figures (hvf: to the destination's confirmation; QEMU: "
        "total-time and downtime, source-side)",
    ]
    for scenario in SCENARIOS:
        checks = summary[scenario]["checks"]
        said = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items())
        out.append(f"  {scenario}: {said}  ->  {summary[scenario]['verdict']}")
    out.append(f"  target: every check above  ->  {summary['verdict']}")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/migrate",
        description="Live migration of a 1 GiB guest over TCP, hvf against QEMU: total "
        "time and downtime, idle and dirtying memory.")
    add_rounds_options(p, DEFAULT_ROUNDS,
                       warmup_help="unmeasured idle migrations of each VMM first (default 1)")
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, metavar="MIB",
                   help=f"guest RAM (default {DEFAULT_MEMORY_MIB})")
    p.add_argument("--dirty-mib", type=int, default=DEFAULT_DIRTY_MIB, metavar="M",
                   help=f"what the dirtying guest writes over (default {DEFAULT_DIRTY_MIB})")
    p.add_argument("--downtime-ms", type=float, default=DEFAULT_DOWNTIME_MS, metavar="D",
                   help=f"both VMMs' downtime limit (default {DEFAULT_DOWNTIME_MS})")
    p.add_argument("--settle", type=int, default=DEFAULT_SETTLE, metavar="LINES",
                   help=f"guest lines before migrating (default {DEFAULT_SETTLE})")
    add_qemu_options(p)
    add_output_options(p)
    options = p.parse_args(argv)
    if options.rounds < 1 or options.warmup < 0:
        p.error("--rounds must be at least 1 and --warmup at least 0")
    if not 64 <= options.memory <= 65536:
        p.error("--memory must be 64 to 65536 MiB")
    if not 1 <= options.dirty_mib <= options.memory - 64:
        p.error("--dirty-mib must be from 1 to the guest's memory less 64 MiB "
                "(the guest writes from 32 MiB up)")
    if not 1 <= options.downtime_ms <= 2_000_000:
        p.error("--downtime-ms must be 1 to 2000000")
    if options.settle < 1:
        p.error("--settle must be at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    log = Log("bench/migrate", options.quiet)
    try:
        require_kvm()
        require_hvf()
        qemu = find_qemu(options.qemu, not options.no_install, log)
        with tempfile.TemporaryDirectory(prefix="hvf-bench-migrate-") as tmp:
            work = pathlib.Path(tmp)
            kernels = {"idle": build_guest("counter", work),
                       "dirty": build_guest("counter_dirty", work)}
            config = {"memory_mib": options.memory, "dirty_mib": options.dirty_mib,
                      "downtime_ms": options.downtime_ms, "settle": options.settle,
                      "rounds": options.rounds, "warmup": options.warmup,
                      "host": qemu_host_info(qemu)}
            rounds = bench(options, qemu, kernels, work, log)
    except (BenchError, OSError) as e:
        log.error(e)
        return 2
    summary = summarise(rounds)
    print(report(config, summary))
    if options.json:
        write_json(options.json, {"config": config, "summary": summary, "per_round": rounds})
    return 1 if options.strict and summary["verdict"] != "PASS" else 0


if __name__ == "__main__":
    sys.exit(main())
