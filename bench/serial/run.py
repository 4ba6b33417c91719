# SPDX-License-Identifier: BSD-2-Clause
"""bench/serial: guest-to-host serial throughput through COM1, hvf against QEMU.

Both VMMs boot the same multiboot image, ``tests/guests/serial_tx.elf``, with the same
command line ``n=N mode=byte``: the guest sets up the 16550 at 0x3F8, prints
``uart 03f8 irq 4`` on the debug console (port 0x402), sends N bytes of a fixed pattern
(byte i = (i*7 + (i >> 8)) & 0xff) with one ``outb`` per byte, waiting for LSR.THRE
before every 16 bytes (so QEMU's real 16-byte FIFO loses nothing; ``mode=rep`` relies
on hvf's always-empty THR and would lose data on QEMU), prints ``tx done N`` and exits
through port 0xF4 (exit status 1 on both).

The machine shape is the same: 256 MiB, one vCPU, KVM, the UART's output going to a
regular file (``-l com1,file=PATH`` / ``-serial file:PATH``) or, with
``--backend unix``, to a UNIX socket that the benchmark reads all along. The debug
console is each VMM's stdout, a pipe the benchmark reads, timestamping every line.

What is timed is only the transfer: from the moment the ``uart`` line arrives (the
guest is about to send its first byte) until the last byte has reached the backend:
the file has its final size (polled every millisecond once ``tx done`` has arrived) or
the socket reader has received the last byte. hvf writes to its backend from an I/O
thread, so its delivery can trail the guest; that lag is included (and reported). VM
start-up, firmware (QEMU runs SeaBIOS) and teardown are not. Each run's bytes are
checked against the pattern. Runs alternate between the VMMs, the one going first
alternating per round. Throughput is measured by two clocks: N / transfer time (wall),
and N / the CPU time the VMM process (all threads; KVM accounts guest time to the vCPU
thread) used from the ``uart`` line to ``tx done`` (cpu: its threads' scheduler run
times, from /proc/PID/task/*/schedstat; /proc/PID/stat's clock ticks where a thread
ended in between).
The verdict uses the median over rounds of the per-round ratio hvf/QEMU, by CPU time
unless ``--metric wall``: on a shared host the elapsed time of either VMM swings with
other load (by 2x and more on a busy 2-CPU host), its CPU time hardly. On a quiet host
the two agree. Target: at least 1.0.

    python bench/serial/run.py [--n BYTES] [--rounds R] [--backend file|unix]
                               [--metric cpu|wall] [--qemu-accel auto|kvm|tcg]
                               [--json PATH]

Run it with the interpreter that has hvf installed; hvf is started as
``sys.executable -m hvf``. QEMU is ``qemu-system-x86_64`` on PATH (``--qemu``); if it
is missing and the benchmark runs as root it installs Debian's ``qemu-system-x86``
with apt-get (``--no-install`` turns that off).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/, for common
from common import (
    VMMS,
    Backend,
    BenchError,
    Log,
    add_output_options,
    add_qemu_accel_option,
    add_qemu_options,
    add_rounds_options,
    add_verdict_options,
    build_guest,
    choose_qemu_accel,
    cpu_between,
    find_qemu,
    hvf_command,
    judge,
    qemu_command,
    qemu_host_info,
    qemu_kvm_note,
    ratio_stats,
    require_hvf,
    require_kvm,
    run_vmm,
    write_json,
)

DEFAULT_BYTES = 256 << 10
DEFAULT_ROUNDS = 5
DEFAULT_TARGET = 1.0
WARMUP_BYTES = 16 << 10
MEMORY_MIB = 256
RUN_TIMEOUT = 600.0
#: Clocks the throughput is measured by; the one --metric names decides the verdict.
METRICS = ("cpu", "wall")
UART_LINE = "uart 03f8 irq 4"


def pattern(n: int) -> bytes:
    """What ``serial_tx n=N`` sends."""
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(n))


# ---- one run ----


def hvf_backend_spec(kind: str, path: pathlib.Path) -> str:
    return f"file={path}" if kind == "file" else f"unix={path}"


def qemu_backend_args(kind: str, path: pathlib.Path) -> list[str]:
    if kind == "file":
        return ["-serial", f"file:{path}"]
    # wait=on: QEMU does not start the guest until the benchmark is connected.
    return ["-chardev", f"socket,id=com1,path={path},server=on,wait=on",
            "-serial", "chardev:com1"]


def hvf_serial_command(elf: pathlib.Path, n: int, backend_spec: str) -> list[str]:
    return hvf_command(MEMORY_MIB, elf, f"n={n} mode=byte", ["-l", f"com1,{backend_spec}"])


def qemu_serial_command(qemu: str, accel: str, elf: pathlib.Path, n: int,
                        backend_args: list[str]) -> list[str]:
    return qemu_command(qemu, accel, MEMORY_MIB, elf, f"n={n} mode=byte", backend_args)


def run_once(cmd: list[str], backend: Backend, n: int, what: str,
             timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Run one VMM to completion; returns its timings after checking its output."""
    done_line = f"tx done {n}"
    run = run_vmm(cmd, backend, done_line, (UART_LINE,), what, timeout)
    run.require(what, UART_LINE, done_line)
    data, stderr, samples = run.data, run.stderr, run.samples
    t_uart, t_done = run.line_at(UART_LINE), run.line_at(done_line)
    assert t_uart is not None and t_done is not None
    want = pattern(n)
    lost_before_connect = 0
    if backend.kind == "unix" and data and not data.startswith(want[:64]):
        # hvf discards output while no client is connected (as bhyve does); the guest
        # may have sent a few bytes before hvf accepted the benchmark's connection.
        lost_before_connect = want.find(data[:4096])
        if not 0 < lost_before_connect < 65536:
            lost_before_connect = 0
    if data != want[lost_before_connect:]:
        firmware = len(data) - n
        if not (firmware > 0 and data.endswith(want)):
            first = next((i for i, (a, b) in enumerate(zip(data, want)) if a != b),
                         min(len(data), len(want)))
            raise BenchError(f"{what}: the backend got {len(data)} bytes, not the {n}-byte "
                             f"pattern (first difference at byte {first})\n{stderr[-1000:]}")
    final = len(data)
    if backend.kind == "unix":
        t_end = max(backend.last_byte_at, t_done)
    elif not samples or samples[0][1] >= final:
        t_end = t_done  # complete when first looked at, right after `tx done`
    else:
        t_end = next((t for t, size in samples if size >= final), run.t_exit)
    transfer = t_end - t_uart
    cpu0, cpu1 = run.cpu_at.get(UART_LINE), run.cpu_at.get(done_line)
    return {
        "bytes": n,
        "transfer_s": transfer,
        "bytes_per_s": n / transfer,
        "guest_s": t_done - t_uart,  # the guest's own view: first byte to `tx done`
        # CPU time the VMM used (all threads) from the `uart` line to `tx done`:
        # insensitive to other load on the host, unlike the elapsed time.
        "cpu_s": cpu_between(cpu0, cpu1),
        "delivery_lag_s": t_end - t_done,
        "startup_s": t_uart - run.t0,
        "wall_s": run.t_exit - run.t0,
        "lost_before_connect": lost_before_connect,
    }


# ---- the benchmark ----


def probe_qemu(qemu: str, accel: str, elf: pathlib.Path, work: pathlib.Path) -> str | None:
    """None if QEMU runs the guest with ``accel``; else why not."""
    backend = Backend("file", work, "probe")
    try:
        run_once(qemu_serial_command(qemu, accel, elf, 64,
                                     qemu_backend_args("file", backend.path)),
                 backend, 64, f"QEMU -accel {accel} probe", timeout=120)
    except BenchError as e:
        return str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[-2:])
    return None


def bench(runners: dict[str, Callable[[int, str], dict[str, Any]]], n: int, rounds: int,
          warmup: int, log: Log) -> list[dict[str, Any]]:
    for _ in range(warmup):  # page cache, .pyc files, the CPU's frequency
        for name in VMMS:
            runners[name](WARMUP_BYTES, f"{name} warm-up")
    rows = []
    for r in range(rounds):
        order = VMMS if r % 2 == 0 else VMMS[::-1]
        got = {name: runners[name](n, f"{name} round {r + 1}") for name in order}
        for name in VMMS:
            if not got[name]["cpu_s"]:
                raise BenchError(f"{name} round {r + 1}: no CPU time measured")
        row = {
            "round": r + 1, "first": order[0], **got,
            # Throughput ratio by elapsed time, and by CPU time (bytes per CPU second).
            "wall_ratio": got["hvf"]["bytes_per_s"] / got["qemu"]["bytes_per_s"],
            "cpu_ratio": got["qemu"]["cpu_s"] / got["hvf"]["cpu_s"],
        }
        rows.append(row)
        log(f"  round {r + 1}/{rounds}: hvf {got['hvf']['bytes_per_s'] / 1e3:.1f} kB/s, "
            f"QEMU {got['qemu']['bytes_per_s'] / 1e3:.1f} kB/s; hvf/QEMU "
            f"{row['wall_ratio']:.3f} wall, {row['cpu_ratio']:.3f} cpu")
    return rows


def summarize(rows: list[dict[str, Any]], target: float, metric: str) -> dict[str, Any]:
    med = statistics.median
    summary: dict[str, Any] = {"metric": metric}
    for name in VMMS:
        d = {key: med(r[name][key] for r in rows)
             for key in ("bytes_per_s", "transfer_s", "guest_s", "delivery_lag_s",
                         "startup_s", "wall_s")}
        d["us_per_byte"] = 1e6 / d["bytes_per_s"]
        d["cpu_us_per_byte"] = med(r[name]["cpu_s"] / r[name]["bytes"] for r in rows) * 1e6
        summary[name] = d
    for m in METRICS:
        ratios = [r[f"{m}_ratio"] for r in rows]
        per_byte = "us_per_byte" if m == "wall" else "cpu_us_per_byte"
        summary[m] = {
            **ratio_stats(ratios),
            "ratio_of_medians": summary["qemu"][per_byte] / summary["hvf"][per_byte],
        }
    summary["target"] = target
    return judge(summary, metric, target)


def report(rows: list[dict[str, Any]], summary: dict[str, Any], host: dict[str, Any],
           config: dict[str, Any]) -> str:
    qemu_label = config["qemu_label"]
    metric = summary["metric"]
    out = [
        "bench/serial: guest-to-host throughput through COM1, hvf vs. QEMU",
        "  guest:   tests/guests/serial_tx.elf `n=N mode=byte` (one outb per byte, THRE "
        "waited for every 16 bytes); the same image for both",
        f"  backend: {config['backend_desc']}",
        f"  machine: {MEMORY_MIB} MiB, 1 vCPU; hvf `-m {MEMORY_MIB}M -c 1` (hostbridge, lpc, "
        f"pc-testdev, debugcon); {qemu_label} `-m {MEMORY_MIB} -smp 1 -nodefaults`",
        "  timed:   from the guest's `uart` line (about to send) to the last byte at the "
        "backend; start-up and teardown excluded",
        "           wall = elapsed time; cpu = the VMM's CPU time, all threads, guest time "
        "included (`uart` to `tx done`)",
        f"  N = {config['n']} bytes; {len(rows)} rounds after {config['warmup']} warm-up "
        "round(s); runs alternate, first VMM alternating per round",
        f"  host:    Linux {host['kernel']}, {host['kvm_module']}, {host['cpus']} CPUs, "
        f"{host['cpu'] or 'unknown CPU'}; load average at start {host['loadavg']}",
        f"           Python {host['python']}; {host['qemu']}",
    ]
    out += qemu_kvm_note(config)
    out += [
        "",
        f"{'':5}  {'------------- hvf -------------':>31}  "
        f"{'------------- QEMU ------------':>31}  {'--- hvf/QEMU ---':>16}",
        f"{'round':>5}  {'kB/s':>8}  {'us/B':>6}  {'lag ms':>6}  {'cpu us/B':>8}  "
        f"{'kB/s':>8}  {'us/B':>6}  {'lag ms':>6}  {'cpu us/B':>8}  {'wall':>7}  {'cpu':>7}",
    ]

    def cells(d: dict[str, Any], cpu_us_per_byte: float) -> str:
        return (f"{d['bytes_per_s'] / 1e3:8.2f}  {1e6 / d['bytes_per_s']:6.2f}  "
                f"{d['delivery_lag_s'] * 1e3:6.1f}  {cpu_us_per_byte:8.2f}")

    for r in rows:
        h, q = r["hvf"], r["qemu"]
        out.append(f"{r['round']:>5}  {cells(h, h['cpu_s'] / h['bytes'] * 1e6)}  "
                   f"{cells(q, q['cpu_s'] / q['bytes'] * 1e6)}  "
                   f"{r['wall_ratio']:7.3f}  {r['cpu_ratio']:7.3f}")
    h, q = summary["hvf"], summary["qemu"]
    out.append(f"{'med':>5}  {cells(h, h['cpu_us_per_byte'])}  {cells(q, q['cpu_us_per_byte'])}  "
               f"{summary['wall']['ratio']:7.3f}  {summary['cpu']['ratio']:7.3f}")
    out += [
        "",
        "  lag: how long after the guest's `tx done` the last byte reached the backend "
        "(in the wall time)",
        f"  one run, median: start-up to the `uart` line hvf {h['startup_s']:.2f} s, "
        f"QEMU {q['startup_s']:.2f} s; whole run hvf {h['wall_s']:.2f} s, "
        f"QEMU {q['wall_s']:.2f} s",
    ]
    for m in (metric, *(x for x in METRICS if x != metric)):
        d = summary[m]
        out.append(f"  hvf/QEMU throughput by {m} time: median {d['ratio']:.3f} (rounds "
                   f"{d['ratio_min']:.3f}-{d['ratio_max']:.3f}; ratio of medians "
                   f"{d['ratio_of_medians']:.3f})")
    out.append(f"  target: hvf/QEMU >= {summary['target']:.2f} ({metric} time)  ->  "
               f"{summary['verdict']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/serial/run.py",
        description="Guest-to-host serial throughput through COM1, hvf against QEMU.",
    )
    parser.add_argument("--n", type=int, default=DEFAULT_BYTES, metavar="BYTES",
                        help=f"bytes the guest sends per run (default {DEFAULT_BYTES})")
    add_rounds_options(parser, DEFAULT_ROUNDS,
                       f"unmeasured rounds of {WARMUP_BYTES} bytes first (default 1)")
    parser.add_argument("--backend", choices=("file", "unix"), default="file",
                        help="where COM1's output goes on both (default file)")
    add_qemu_options(parser)
    add_qemu_accel_option(parser)
    add_verdict_options(parser, DEFAULT_TARGET, "PASS when the median ratio hvf/QEMU is at "
                        "least this", METRICS, "cpu")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or not 16 <= args.n < 1 << 31:
        parser.error("--rounds must be at least 1, --warmup at least 0, --n at least 16")
    log = Log("serial", args.quiet)

    try:
        require_kvm()
        require_hvf()
        qemu = find_qemu(args.qemu, not args.no_install, log)
        with tempfile.TemporaryDirectory(prefix="hvf-serial-bench-") as tmp:
            work = pathlib.Path(tmp)
            elf = build_guest("serial_tx", work)
            accel, kvm_failure = choose_qemu_accel(
                args.qemu_accel, lambda a: probe_qemu(qemu, a, elf, work))
            qemu_label = f"QEMU ({accel.upper()})"
            host = qemu_host_info(qemu)

            def run_hvf(n: int, what: str) -> dict[str, Any]:
                backend = Backend(args.backend, work, "hvf")
                return run_once(hvf_serial_command(elf, n, hvf_backend_spec(
                    backend.kind, backend.path)), backend, n, what)

            def run_qemu(n: int, what: str) -> dict[str, Any]:
                backend = Backend(args.backend, work, "qemu")
                return run_once(qemu_serial_command(qemu, accel, elf, n, qemu_backend_args(
                    backend.kind, backend.path)), backend, n, what)

            log.note(f"N={args.n}, backend {args.backend}, {qemu_label}, "
                     f"{args.rounds} rounds (+{args.warmup} warm-up)")
            rows = bench({"hvf": run_hvf, "qemu": run_qemu}, args.n, args.rounds,
                         args.warmup, log)
    except (BenchError, subprocess.TimeoutExpired) as e:
        log.error(e)
        return 2

    backend_desc = (
        "a regular file on both: hvf `-l com1,file=PATH`, QEMU `-serial file:PATH`"
        if args.backend == "file" else
        "a UNIX socket read all along on both: hvf `-l com1,unix=PATH`, QEMU "
        "`-chardev socket,server=on,wait=on` + `-serial chardev:`"
    )
    config = {"n": args.n, "rounds": args.rounds, "warmup": args.warmup,
              "backend": args.backend, "backend_desc": backend_desc,
              "qemu_accel": accel, "qemu_label": qemu_label,
              "qemu_kvm_failure": kvm_failure if args.qemu_accel == "auto" else None}
    summary = summarize(rows, args.target, args.metric)
    print(report(rows, summary, host, config))
    if args.json:
        out_path = pathlib.Path("com1.out" if args.backend == "file" else "com1.sock")
        doc = {
            "benchmark": "serial",
            "method": "same guest (serial_tx n=N mode=byte) on both; throughput = N / time "
            "from the guest's `uart` debug-console line to the last byte at the backend "
            "(wall), or N / the VMM's CPU time from `uart` to `tx done` (cpu); alternating "
            f"runs; verdict on the median per-round ratio hvf/QEMU by {args.metric} time",
            **{k: v for k, v in config.items() if k != "backend_desc"},
            "host": host,
            "hvf_command": hvf_serial_command(pathlib.Path("serial_tx.elf"), args.n,
                                              hvf_backend_spec(args.backend, out_path)),
            "qemu_command": qemu_serial_command(qemu, accel, pathlib.Path("serial_tx.elf"),
                                                args.n, qemu_backend_args(args.backend,
                                                                          out_path)),
            "summary": summary,
            "per_round": rows,
        }
        write_json(args.json, doc)
    return 1 if args.strict and summary["verdict"] == "MISS" else 0


if __name__ == "__main__":
    sys.exit(main())
