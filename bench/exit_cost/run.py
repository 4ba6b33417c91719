# SPDX-License-Identifier: BSD-2-Clause
"""bench/exit_cost: hvf's cost per VM exit, as a ratio against a minimal C KVM loop.

Both VMMs boot the same guest, ``tests/guests/outloop.elf``, which does ``n=N``
``outl`` instructions to port 0xE0 (pc-testdev's scratch register in hvf; a store to
a variable in the C loop), prints ``outloop done`` on port 0x402 and stops by
writing 0 to port 0xF4.  Each ``outl`` is one exit to userspace.

Method (the same for both sides): each VMM is run as a child process at two values
of N and the whole child is measured, by two clocks: its CPU time (user + system of
all its threads, from rusage) and its wall time.  The cost per exit is the slope
``(t(N2) - t(N1)) / (N2 - N1)``: start-up (Python import, VM creation, guest
loading, the first KVM_RUN) and shutdown cost the same at both N and cancel out, as
do the few exits that do not depend on N.  The runs are interleaved (C and hvf
alternate, and which one goes first alternates per round) so that slow drifts in
the host's load hit both alike; the verdict uses the median over rounds of the
per-round ratio hvf/C, by CPU time unless ``--metric wall``: CPU time does not
count the time a process waits while other processes use the CPUs, so it is far
steadier on a shared host; wall time is reported beside it and would expose time
hvf spends waiting (lock or GIL hand-offs between its threads).

    python bench/exit_cost/run.py [--rounds R] [--n N1,N2] [--metric cpu|wall]
                                  [--json PATH]

Run it with the interpreter that has hvf installed (``.venv/bin/python``); hvf is
started as ``sys.executable -m hvf``.  gcc builds ``kvm_loop.c`` into a temporary
directory on every invocation.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/, for common
from common import (
    BenchError,
    Log,
    add_output_options,
    add_rounds_options,
    add_verdict_options,
    build_guest,
    host_info,
    ratio_stats,
    require_hvf,
    require_kvm,
    version_line,
    write_json,
)

C_SOURCE = HERE / "kvm_loop.c"

DEFAULT_N = (20_000, 200_000)
DEFAULT_ROUNDS = 7
DEFAULT_TARGET = 1.3
GUEST_MEMORY = "256M"  # hvf's default -m, and kvm_loop.c's GUEST_RAM_SIZE
RUN_TIMEOUT = 600.0
#: Clocks a run is measured with; the first one named by --metric decides.
METRICS = ("cpu", "wall")


# ---- building ----


def build_c_loop(out_dir: pathlib.Path, cc: str) -> pathlib.Path:
    exe = out_dir / "kvm_loop"
    cmd = [cc, "-O2", "-Wall", "-o", str(exe), str(C_SOURCE)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise BenchError(f"C compiler {cc!r} not found (kvm_loop.c needs gcc)") from None
    except subprocess.CalledProcessError as e:
        raise BenchError(f"{' '.join(cmd)} failed:\n{e.stdout}{e.stderr}") from None
    return exe


# ---- running ----


def c_command(exe: pathlib.Path, elf: pathlib.Path, n: int) -> list[str]:
    return [str(exe), str(elf), str(n)]


def hvf_command(python: str, elf: pathlib.Path, n: int) -> list[str]:
    return [
        python, "-m", "hvf", "-m", GUEST_MEMORY,
        "-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev", "-l", "debugcon,stdio",
        "--kernel", str(elf), "--append", f"n={n}", "bench",
    ]


def timed(cmd: list[str]) -> tuple[dict[str, int], subprocess.CompletedProcess[str]]:
    """Run ``cmd`` to completion; returns ({wall_ns, cpu_ns}, result).

    ``cpu_ns`` is the child's user + system time, all its threads together (guest time
    is included: KVM accounts it to the vCPU thread). It comes from the rusage of
    reaped children, so runs must not overlap.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter_ns()
    result = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    wall = time.perf_counter_ns() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_ns": wall, "cpu_ns": round(cpu * 1e9)}, result


def _failure(what: str, result: subprocess.CompletedProcess[str], why: str) -> BenchError:
    out = (result.stdout + result.stderr).strip()
    return BenchError(f"{what}: {why} (exit status {result.returncode})\n{out[-2000:]}")


def run_c(exe: pathlib.Path, elf: pathlib.Path, n: int) -> dict[str, int]:
    times, result = timed(c_command(exe, elf, n))
    what = f"kvm_loop n={n}"
    if result.returncode != 0:
        raise _failure(what, result, "failed")
    fields = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    try:
        exits = int(fields["exits"])
        scratch = int(fields["scratch_writes"])
        loop_ns = int(fields["loop_ns"])
    except (KeyError, ValueError):
        raise _failure(what, result, "unexpected output") from None
    if scratch != n or fields.get("exit_value") != "0" or "outloop done" not in fields.get(
        "debugcon", ""
    ):
        raise _failure(what, result, f"the guest did not do {n} scratch writes and exit 0")
    return {**times, "exits": exits, "loop_ns": loop_ns}


def run_hvf(python: str, elf: pathlib.Path, n: int) -> dict[str, int]:
    times, result = timed(hvf_command(python, elf, n))
    # The guest writes 0 to port 0xF4: bhyve exit status (0 << 1) | 1 = 1.
    if result.returncode != 1 or "outloop done" not in result.stdout:
        raise _failure(f"hvf n={n}", result, "the guest did not finish (want status 1)")
    return times


def slope(t1: float, t2: float, n1: int, n2: int) -> float:
    return (t2 - t1) / (n2 - n1)


def bench(
    c_exe: pathlib.Path, elf: pathlib.Path, python: str, n1: int, n2: int, rounds: int,
    warmup: int, log: Log,
) -> list[dict[str, Any]]:
    runners = {
        "c": lambda n: run_c(c_exe, elf, n),
        "hvf": lambda n: run_hvf(python, elf, n),
    }
    for _ in range(warmup):  # page cache, .pyc files, the CPU's frequency
        for name in ("c", "hvf"):
            for n in (n1, n2):
                runners[name](n)
    results = []
    for r in range(rounds):
        order = ("c", "hvf") if r % 2 == 0 else ("hvf", "c")
        got: dict[str, dict[int, dict[str, int]]] = {"c": {}, "hvf": {}}
        for n in (n1, n2):
            for name in order:
                got[name][n] = runners[name](n)
        row: dict[str, Any] = {"round": r + 1, "first": order[0]}
        for metric in METRICS:
            key = f"{metric}_ns"
            fit = {}
            for name in ("c", "hvf"):
                t1, t2 = got[name][n1][key], got[name][n2][key]
                per_exit = slope(t1, t2, n1, n2)
                if per_exit <= 0:
                    raise BenchError(
                        f"round {r + 1}: {name} at N={n2} took no more {metric} time than at "
                        f"N={n1}; the host is too noisy or N2 - N1 too small"
                    )
                fit[f"{name}_ns_per_exit"] = per_exit
                fit[f"{name}_fixed_ms"] = (t1 - per_exit * n1) / 1e6
            fit["ratio"] = fit["hvf_ns_per_exit"] / fit["c_ns_per_exit"]
            row[metric] = fit
        c1, c2 = got["c"][n1], got["c"][n2]
        row["c_loop_ns_per_exit"] = slope(c1["loop_ns"], c2["loop_ns"], c1["exits"], c2["exits"])
        row["runs"] = {name: {str(n): got[name][n] for n in (n1, n2)} for name in got}
        results.append(row)
        log(
            f"  round {r + 1}/{rounds}: ns/exit C {row['cpu']['c_ns_per_exit']:.1f} cpu "
            f"{row['wall']['c_ns_per_exit']:.1f} wall, hvf "
            f"{row['cpu']['hvf_ns_per_exit']:.1f} cpu {row['wall']['hvf_ns_per_exit']:.1f}"
            f" wall; hvf/C {row['cpu']['ratio']:.3f} cpu {row['wall']['ratio']:.3f} wall"
        )
    return results


# ---- reporting ----


def summarize(
    rows: list[dict[str, Any]], n1: int, n2: int, target: float, metric: str
) -> dict[str, Any]:
    med = statistics.median
    summary: dict[str, Any] = {"metric": metric}
    for m in METRICS:
        fits = [r[m] for r in rows]
        d = {k: med(f[k] for f in fits) for k in fits[0]}
        d.update(ratio_stats([f["ratio"] for f in fits]))
        d["ratio_of_medians"] = d["hvf_ns_per_exit"] / d["c_ns_per_exit"]
        summary[m] = d
    summary["c_loop_ns_per_exit"] = med(r["c_loop_ns_per_exit"] for r in rows)
    summary["median_run"] = {
        name: {
            str(n): {f"{m}_ns": med(r["runs"][name][str(n)][f"{m}_ns"] for r in rows)
                     for m in METRICS}
            for n in (n1, n2)
        }
        for name in ("c", "hvf")
    }
    summary["ratio"] = summary[metric]["ratio"]
    summary["target"] = target
    summary["verdict"] = "PASS" if summary["ratio"] <= target else "MISS"
    return summary


def report(
    rows: list[dict[str, Any]], summary: dict[str, Any], host: dict[str, Any],
    n1: int, n2: int, warmup: int,
) -> str:
    metric = summary["metric"]
    other = next(m for m in METRICS if m != metric)
    out = [
        "bench/exit_cost: hvf's cost per VM exit vs. a minimal C KVM loop (kvm_loop.c)",
        "  guest:  tests/guests/outloop.elf, N x `outl` to port 0xE0 (pc-testdev scratch), "
        "then exit; the same image for both",
        "  method: each VMM is a child process run at N1 and N2; cost per exit = slope "
        "(t(N2)-t(N1))/(N2-N1),",
        "          so start-up, teardown and the exits that do not depend on N cancel out. "
        "t is measured as",
        "          cpu  = the child's user+system time, all threads (from rusage; "
        "insensitive to other load)",
        "          wall = the child's elapsed time (also counts waiting: descheduled, "
        "lock/GIL hand-offs)",
        "          Runs interleave C and hvf, the one going first alternating per round; "
        "hvf/C is taken",
        f"          per round and the verdict uses its median over rounds, by {metric} time.",
        f"  N1 = {n1}, N2 = {n2}; {len(rows)} rounds after {warmup} warm-up round(s)",
        f"  host:   Linux {host['kernel']}, {host['kvm_module']}, {host['cpus']} CPUs, "
        f"{host['cpu'] or 'unknown CPU'}",
        f"          Python {host['python']} ({host['python_executable']}), {host['cc']}",
        "",
        f"{'':5}  {'----------- cpu time -----------':>32}  "
        f"{'----------- wall time ----------':>32}  {'C loop-only':>11}",
        f"{'round':>5}  {'C ns/exit':>10}  {'hvf ns/exit':>11}  {'hvf/C':>6}  "
        f"{'C ns/exit':>10}  {'hvf ns/exit':>11}  {'hvf/C':>6}  {'ns/exit':>11}",
    ]

    def line(label: str, d: dict[str, Any]) -> str:
        cells = [f"{label:>5}"]
        for m in METRICS:
            f = d[m]
            cells.append(
                f"{f['c_ns_per_exit']:10.1f}  {f['hvf_ns_per_exit']:11.1f}  {f['ratio']:6.3f}"
            )
        cells.append(f"{d['c_loop_ns_per_exit']:11.1f}")
        return "  ".join(cells)

    for r in rows:
        out.append(line(str(r["round"]), r))
    out.append(line("med", summary))
    runs = summary["median_run"]
    out += [
        "",
        "  fixed cost (the fit at N = 0: process start, VM set-up, teardown), median:",
        f"          C {summary['cpu']['c_fixed_ms']:.1f} ms cpu, "
        f"{summary['wall']['c_fixed_ms']:.1f} ms wall;  hvf "
        f"{summary['cpu']['hvf_fixed_ms']:.1f} ms cpu, {summary['wall']['hvf_fixed_ms']:.1f} "
        "ms wall",
        "  one run, median (start-up included):",
        f"{'N':>10}  {'C cpu ms':>9}  {'C wall ms':>9}  {'hvf cpu ms':>10}  {'hvf wall ms':>11}",
    ]
    for n in (n1, n2):
        c, h = runs["c"][str(n)], runs["hvf"][str(n)]
        out.append(
            f"{n:>10}  {c['cpu_ns'] / 1e6:9.1f}  {c['wall_ns'] / 1e6:9.1f}  "
            f"{h['cpu_ns'] / 1e6:10.1f}  {h['wall_ns'] / 1e6:11.1f}"
        )
    s, o = summary[metric], summary[other]
    out += [
        "",
        f"  hvf/C by {metric} time: median {s['ratio']:.3f} (rounds {s['ratio_min']:.3f}-"
        f"{s['ratio_max']:.3f}; ratio of median slopes {s['ratio_of_medians']:.3f})",
        f"  hvf/C by {other} time: median {o['ratio']:.3f} (rounds {o['ratio_min']:.3f}-"
        f"{o['ratio_max']:.3f}; ratio of median slopes {o['ratio_of_medians']:.3f})",
        f"  target: hvf/C <= {summary['target']:.2f} ({metric} time)  ->  "
        f"{summary['verdict']}",
        "",
        "  C loop-only: kvm_loop's own clock around its KVM_RUN loop, same slope; it should "
        "match C's wall ns/exit.",
    ]
    return "\n".join(out)


# ---- command line ----


def parse_n(text: str) -> tuple[int, int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number list: {text!r}") from None
    if len(values) == 1:
        values = [max(1, values[0] // 10), values[0]]
    if len(values) != 2 or not 0 <= values[0] < values[1] <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError("want N1,N2 with 0 <= N1 < N2 < 2**32 (or one N2)")
    return values[0], values[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/exit_cost/run.py",
        description="hvf's cost per VM exit, as a ratio against a minimal C KVM loop.",
    )
    add_rounds_options(parser, DEFAULT_ROUNDS)
    parser.add_argument("--n", type=parse_n, default=DEFAULT_N, metavar="N1,N2",
                        help="the two numbers of exits whose difference gives the slope "
                        f"(default {DEFAULT_N[0]},{DEFAULT_N[1]}; one value N means N/10,N)")
    add_verdict_options(parser, DEFAULT_TARGET, "PASS when the median ratio hvf/C is at "
                        "most this", METRICS, "cpu")
    parser.add_argument("--cc", default=os.environ.get("CC", "gcc"),
                        help="C compiler for kvm_loop.c (default $CC or gcc)")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")
    n1, n2 = args.n
    log = Log("exit_cost", args.quiet)

    try:
        require_kvm()
        require_hvf()
        with tempfile.TemporaryDirectory(prefix="hvf-exit-cost-") as tmp:
            work = pathlib.Path(tmp)
            elf = build_guest("outloop", work)
            c_exe = build_c_loop(work, args.cc)
            host = host_info(cc=version_line(args.cc))
            log.note(f"N={n1},{n2}, {args.rounds} rounds (+{args.warmup} warm-up)")
            rows = bench(c_exe, elf, sys.executable, n1, n2, args.rounds, args.warmup, log)
    except (BenchError, subprocess.TimeoutExpired) as e:
        log.error(e)
        return 2

    summary = summarize(rows, n1, n2, args.target, args.metric)
    print(report(rows, summary, host, n1, n2, args.warmup))
    if args.json:
        doc = {
            "benchmark": "exit_cost",
            "method": "each VMM run as a child at two N; per-exit cost = slope "
            "(t(N2)-t(N1))/(N2-N1) of its cpu (user+system, rusage) and wall time; "
            "interleaved runs; verdict on the median per-round ratio hvf/C by "
            f"{args.metric} time",
            "n": [n1, n2],
            "rounds": args.rounds,
            "warmup": args.warmup,
            "host": host,
            "hvf_command": hvf_command(sys.executable, pathlib.Path("outloop.elf"), n2),
            "summary": summary,
            "per_round": rows,
        }
        write_json(args.json, doc)
    return 1 if args.strict and summary["verdict"] == "MISS" else 0


if __name__ == "__main__":
    sys.exit(main())
