# SPDX-License-Identifier: BSD-2-Clause
"""bench/boot: SeaBIOS from reset to "No bootable device", hvf against QEMU ``-M pc``.

Both VMMs run the same firmware image (``/usr/share/seabios/bios.bin``) with 256 MiB,
one vCPU and KVM, and no disk, so SeaBIOS posts, finds nothing to boot and prints
``No bootable device.`` on COM1 (then retries every 60 s). COM1 is each VMM's stdout,
a pipe the benchmark reads in a thread, timestamping every chunk as it arrives:

    hvf:       python -m hvf -m 256M -s 0,hostbridge -s 31,lpc -l com1,stdio
                   -l bootrom,bios.bin NAME
    QEMU:      qemu-system-x86_64 -M pc -accel kvm -m 256 -bios bios.bin -nographic
                   -display none -monitor none -serial stdio -net none -no-reboot
    QEMU trim: the same plus ``-vga none -nodefaults``

hvf's SeaBIOS console reaches COM1 through fw_cfg's ``etc/sercon-port``; QEMU's
default machine has a VGA card whose option ROM SeaBIOS's serial console follows, and
the trimmed one none (SeaBIOS then also uses its serial console on COM1).

What is timed: from just before the process is started to the arrival of
``No bootable device`` on the pipe (wall), and the CPU time the VMM used until then
(user + system of all its threads, from /proc/PID/stat; on a host without hardware
virtualization KVM emulates the firmware instruction by instruction in the kernel,
and that shows as system time). Then the process is killed. Also recorded per run:
the arrival of COM1's first byte (the firmware's console is up) and of the banner
``SeaBIOS (version``, and for hvf the first time its standard error mentions port
0x402 (SeaBIOS's debug port, which hvf reports as unhandled: the guest's first
instructions ran), which separates hvf's own start-up from the firmware's time.

Every run must print the banner and then the text; the banner's version must be the
same on all VMMs. One round runs each of the three once, the order rotating from
round to round; one unmeasured warm-up round comes first. The ratios hvf/QEMU are
taken per round, and the verdict uses the median of hvf / trimmed QEMU (the machine
closest to hvf's), by wall time unless ``--metric cpu``. Target: at most 1.0.

    python bench/boot/run.py [--rounds R] [--metric wall|cpu] [--json PATH] [-q]

Run it with the interpreter that has hvf installed; hvf is started as
``sys.executable -m hvf`` with a private ``HVF_RUNTIME_DIR`` and a VM name of its own
per run. QEMU is ``qemu-system-x86_64`` on PATH (``--qemu``); if it is missing and the
benchmark runs as root it installs Debian's ``qemu-system-x86`` with apt-get
(``--no-install`` turns that off).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
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
    add_verdict_options,
    find_qemu,
    process_cpu_s,
    qemu_host_info,
    ratio_stats,
    reap,
    require_hvf,
    require_kvm,
    start_threads,
    write_json,
)

DEFAULT_BIOS = "/usr/share/seabios/bios.bin"
DEFAULT_ROUNDS = 5
DEFAULT_TARGET = 1.0
DEFAULT_TIMEOUT = 180.0
MEMORY_MIB = 256
#: The three machines, in the order of the first round; later rounds rotate it.
VMMS = ("hvf", "qemu_trim", "qemu")
LABELS = {"hvf": "hvf", "qemu_trim": "QEMU trimmed", "qemu": "QEMU default"}
#: Clocks a run is measured by; the one --metric names decides the verdict.
METRICS = ("wall", "cpu")
BANNER = b"SeaBIOS (version "
DONE = b"No bootable device"
BANNER_VERSION = re.compile(rb"SeaBIOS \(version ([^)\r\n]*)\)")
#: hvf's warning about SeaBIOS's first write to its debug port 0x402.
HVF_GUEST_MARK = "port 0x0402"


# ---- setting up ----


def hvf_command(bios: str, name: str) -> list[str]:
    return [
        sys.executable, "-m", "hvf", "-m", f"{MEMORY_MIB}M",
        "-s", "0,hostbridge", "-s", "31,lpc",
        "-l", "com1,stdio", "-l", f"bootrom,{bios}", name,
    ]


def qemu_command(qemu: str, bios: str, trimmed: bool) -> list[str]:
    cmd = [
        qemu, "-M", "pc", "-accel", "kvm", "-m", str(MEMORY_MIB), "-bios", bios,
        "-nographic", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-net", "none", "-no-reboot",
    ]
    if trimmed:
        cmd += ["-vga", "none", "-nodefaults"]
    return cmd


# ---- one run ----


def run_once(cmd: list[str], env: dict[str, str], what: str,
             timeout: float) -> dict[str, Any]:
    """Start one VMM, wait for `No bootable device` on its COM1 (stdout), kill it."""
    out = bytearray()
    marks: dict[str, float] = {}
    cpu: dict[str, float | None] = {}
    done = threading.Event()
    err_lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)

    def read_stdout() -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            now = time.perf_counter()
            if not chunk:
                break
            if "first_byte" not in marks:
                marks["first_byte"] = now
            # Only the tail can complete a match that spans chunks.
            start = max(0, len(out) - len(DONE))
            out.extend(chunk)
            if "banner" not in marks and BANNER in out[max(0, start - len(BANNER)):]:
                marks["banner"] = now
            if "done" not in marks and DONE in out[start:]:
                marks["done"] = now
                cpu["done"] = process_cpu_s(proc.pid)
                done.set()
        done.set()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if "guest_io" not in marks and HVF_GUEST_MARK in line:
                marks["guest_io"] = time.perf_counter()
            if len(err_lines) < 200:
                err_lines.append(line)

    readers = start_threads(read_stdout, read_stderr)
    try:
        done.wait(timeout)
    finally:
        exited_by_itself = reap(proc, readers)
    text = bytes(out)
    tail = "\n".join(err_lines[-15:])
    if "done" not in marks:
        why = (f"exited with status {exited_by_itself}" if exited_by_itself is not None
               else f"no `No bootable device` within {timeout:.0f} s")
        raise BenchError(f"{what}: {why}\nCOM1: {text[-600:]!r}\nstderr: {tail}")
    version = BANNER_VERSION.search(text)
    if "banner" not in marks or version is None or text.find(BANNER) > text.find(DONE):
        raise BenchError(f"{what}: no SeaBIOS banner before `No bootable device`\n"
                         f"COM1: {text[-600:]!r}\nstderr: {tail}")
    if cpu.get("done") is None:
        raise BenchError(f"{what}: no CPU time from /proc/{proc.pid}/stat")
    result: dict[str, Any] = {
        "wall_s": marks["done"] - t0,
        "cpu_s": cpu["done"],
        "first_byte_s": marks["first_byte"] - t0,
        "banner_s": marks["banner"] - t0,
        # After the console came up: the firmware's own time, VMM start-up excluded.
        "after_console_s": marks["done"] - marks["first_byte"],
        "guest_io_s": marks["guest_io"] - t0 if "guest_io" in marks else None,
        "com1_bytes": len(text),
        "seabios": version.group(1).decode(errors="replace"),
    }
    return result


# ---- the benchmark ----


class Runners:
    def __init__(self, qemu: str, bios: str, work: pathlib.Path, timeout: float) -> None:
        self.qemu, self.bios, self.timeout = qemu, bios, timeout
        self.env = dict(os.environ, HVF_RUNTIME_DIR=str(work / "run"))
        self.count = 0

    def hvf_name(self) -> str:
        self.count += 1
        return f"bench-boot-{os.getpid()}-{self.count}"

    def commands(self) -> dict[str, list[str]]:
        return {"hvf": hvf_command(self.bios, "NAME"),
                "qemu_trim": qemu_command(self.qemu, self.bios, True),
                "qemu": qemu_command(self.qemu, self.bios, False)}

    def run(self, name: str, what: str) -> dict[str, Any]:
        if name == "hvf":
            cmd = hvf_command(self.bios, self.hvf_name())
        else:
            cmd = qemu_command(self.qemu, self.bios, name == "qemu_trim")
        return run_once(cmd, self.env, what, self.timeout)


def bench(runners: Runners, rounds: int, warmup: int, log: Log) -> list[dict[str, Any]]:
    for _ in range(warmup):  # page cache, .pyc files, the CPU's frequency
        for name in VMMS:
            runners.run(name, f"{LABELS[name]} warm-up")
    rows = []
    for r in range(rounds):
        k = r % len(VMMS)
        order = VMMS[k:] + VMMS[:k]
        got = {name: runners.run(name, f"{LABELS[name]} round {r + 1}") for name in order}
        versions = {got[name]["seabios"] for name in VMMS}
        if len(versions) != 1:
            raise BenchError(f"round {r + 1}: the VMMs ran different firmware: {versions}")
        row: dict[str, Any] = {"round": r + 1, "order": list(order), **got}
        for m in METRICS:
            key = f"{m}_s"
            row[f"{m}_ratio_trim"] = got["hvf"][key] / got["qemu_trim"][key]
            row[f"{m}_ratio_default"] = got["hvf"][key] / got["qemu"][key]
        rows.append(row)
        log(f"  round {r + 1}/{rounds}: hvf {got['hvf']['wall_s']:.2f} s, QEMU trimmed "
            f"{got['qemu_trim']['wall_s']:.2f} s, QEMU default {got['qemu']['wall_s']:.2f}"
            f" s; hvf/trimmed {row['wall_ratio_trim']:.3f} wall "
            f"{row['cpu_ratio_trim']:.3f} cpu")
    return rows


# ---- reporting ----


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rows: list[dict[str, Any]], target: float, metric: str) -> dict[str, Any]:
    summary: dict[str, Any] = {"metric": metric}
    for name in VMMS:
        summary[name] = {
            key: _median_or_none([r[name][key] for r in rows])
            for key in ("wall_s", "cpu_s", "first_byte_s", "banner_s", "after_console_s",
                        "guest_io_s")
        }
    for m in METRICS:
        for base in ("trim", "default"):
            ratios = [r[f"{m}_ratio_{base}"] for r in rows]
            other = "qemu_trim" if base == "trim" else "qemu"
            summary[f"{m}_{base}"] = {
                **ratio_stats(ratios),
                "ratio_of_medians": summary["hvf"][f"{m}_s"] / summary[other][f"{m}_s"],
            }
    summary["ratio"] = summary[f"{metric}_trim"]["ratio"]
    summary["ratio_default"] = summary[f"{metric}_default"]["ratio"]
    summary["target"] = target
    summary["verdict"] = "PASS" if summary["ratio"] <= target else "MISS"
    summary["seabios"] = rows[0]["hvf"]["seabios"]
    return summary


def _s(value: float | None, width: int = 6) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.2f}"


def report(rows: list[dict[str, Any]], summary: dict[str, Any], host: dict[str, Any],
           config: dict[str, Any]) -> str:
    metric = summary["metric"]
    out = [
        'bench/boot: SeaBIOS from reset to "No bootable device" on COM1, hvf vs. QEMU -M pc',
        f"  firmware: {config['bios']} (SeaBIOS {summary['seabios']}), the same ROM for all; "
        f"{MEMORY_MIB} MiB, 1 vCPU, KVM, no disk",
        "  hvf:          -m 256M -s 0,hostbridge -s 31,lpc -l com1,stdio -l bootrom,ROM "
        "(console via fw_cfg etc/sercon-port)",
        "  QEMU default: -M pc -accel kvm -m 256 -bios ROM -nographic -display none "
        "-monitor none -serial stdio -net none -no-reboot",
        "                (what a user gets: VGA, IDE with an empty CD drive, floppy, ...)",
        "  QEMU trimmed: the same plus -vga none -nodefaults (i440fx/PIIX3 board and COM1 "
        "only; the closest to hvf's machine)",
        "  timed:    process start to the arrival of `No bootable device` on the COM1 pipe "
        "(wall), and the CPU",
        "            time the VMM used until then (all threads; in-kernel emulation shows "
        "as system time)",
        f"  {len(rows)} rounds after {config['warmup']} warm-up round(s); each round runs the "
        "three, the order rotating per round",
        f"  host:     Linux {host['kernel']}, {host['kvm_module']}, {host['cpus']} CPUs, "
        f"{host['cpu'] or 'unknown CPU'}; load average at start {host['loadavg']}",
        f"            Python {host['python']}; {host['qemu']}",
        "",
        f"{'':5}  {'------- hvf -------':>19}  {'--- QEMU trimmed --':>19}  "
        f"{'--- QEMU default --':>19}  {'hvf/trimmed':>13}  {'hvf/default':>13}",
        f"{'round':>5}  " + "  ".join([f"{'wall s':>6} {'cpu s':>5} {'1st B':>6}"] * 3)
        + f"  {'wall':>6} {'cpu':>6}  {'wall':>6} {'cpu':>6}",
    ]

    def cells(d: dict[str, Any]) -> str:
        return f"{d['wall_s']:6.2f} {d['cpu_s']:5.2f} {d['first_byte_s']:6.2f}"

    for r in rows:
        out.append(f"{r['round']:>5}  " + "  ".join(cells(r[n]) for n in VMMS)
                   + f"  {r['wall_ratio_trim']:6.3f} {r['cpu_ratio_trim']:6.3f}"
                   f"  {r['wall_ratio_default']:6.3f} {r['cpu_ratio_default']:6.3f}")
    out.append(f"{'med':>5}  " + "  ".join(cells(summary[n]) for n in VMMS)
               + f"  {summary['wall_trim']['ratio']:6.3f} {summary['cpu_trim']['ratio']:6.3f}"
               f"  {summary['wall_default']['ratio']:6.3f} "
               f"{summary['cpu_default']['ratio']:6.3f}")
    h, t, q = summary["hvf"], summary["qemu_trim"], summary["qemu"]
    out += [
        "",
        "  1st B: arrival of COM1's first byte (SeaBIOS's console is up), from process start",
        "  where the time goes (medians, seconds from process start):",
        f"{'':4}{'':14}{'guest runs':>11}{'1st byte':>10}{'banner':>8}{'done':>8}"
        f"{'done - 1st byte':>17}",
    ]
    for name, d in (("hvf", h), ("qemu_trim", t), ("qemu", q)):
        out.append(f"{'':4}{LABELS[name]:14}{_s(d['guest_io_s'], 11)}{_s(d['first_byte_s'], 10)}"
                   f"{_s(d['banner_s'], 8)}{_s(d['wall_s'], 8)}{_s(d['after_console_s'], 17)}")
    out += [
        "    guest runs: hvf's first warning about SeaBIOS's debug port 0x402, written in "
        "the firmware's first",
        "    milliseconds: process start to then is hvf's own start-up (interpreter, "
        "imports, building the VM)",
        "",
    ]
    for base, label in (("trim", "trimmed"), ("default", "default")):
        for m in (metric, *(x for x in METRICS if x != metric)):
            d = summary[f"{m}_{base}"]
            out.append(f"  hvf/QEMU {label:8} by {m:4} time: median {d['ratio']:.3f} (rounds "
                       f"{d['ratio_min']:.3f}-{d['ratio_max']:.3f}; ratio of medians "
                       f"{d['ratio_of_medians']:.3f})")
    out += [
        f"  verdict on hvf/QEMU trimmed (the same firmware on the closest machine), "
        f"{metric} time",
        f"  target: hvf/QEMU trimmed <= {summary['target']:.2f}  ->  {summary['verdict']}",
    ]
    return "\n".join(out)


# ---- command line ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/boot/run.py",
        description='SeaBIOS from reset to "No bootable device", hvf against QEMU -M pc.',
    )
    add_rounds_options(parser, DEFAULT_ROUNDS)
    parser.add_argument("--bios", default=DEFAULT_BIOS,
                        help=f"the SeaBIOS image all VMMs run (default {DEFAULT_BIOS})")
    add_qemu_options(parser)
    add_verdict_options(parser, DEFAULT_TARGET, "PASS when the median ratio hvf/QEMU trimmed "
                        "is at most this", METRICS, "wall")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds one run may take (default {DEFAULT_TIMEOUT:.0f})")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--rounds must be at least 1, --warmup at least 0, --timeout positive")

    log = Log("boot", args.quiet)

    try:
        require_kvm()
        if not os.path.isfile(args.bios):
            raise BenchError(f"{args.bios} not found (Debian: apt-get install seabios)")
        bios = os.path.abspath(args.bios)
        require_hvf()
        qemu = find_qemu(args.qemu, not args.no_install, log)
        host = qemu_host_info(qemu)
        with tempfile.TemporaryDirectory(prefix="hvf-bench-boot-") as tmp:
            runners = Runners(qemu, bios, pathlib.Path(tmp), args.timeout)
            log.note(f"{args.rounds} rounds (+{args.warmup} warm-up) of hvf, QEMU trimmed "
                     "and QEMU default")
            rows = bench(runners, args.rounds, args.warmup, log)
            commands = runners.commands()
    except (BenchError, OSError) as e:
        log.error(e)
        return 2

    config = {"bios": bios, "warmup": args.warmup}
    summary = summarize(rows, args.target, args.metric)
    print(report(rows, summary, host, config))
    if args.json:
        doc = {
            "benchmark": "boot",
            "method": "process start to the arrival of `No bootable device` on COM1 (a "
            "pipe read in a thread), wall time and the VMM's CPU time (/proc/PID/stat); "
            "SeaBIOS banner checked; hvf, QEMU trimmed and QEMU default per round, order "
            f"rotating; verdict on the median per-round ratio hvf/QEMU trimmed by "
            f"{args.metric} time",
            "bios": bios,
            "memory_mib": MEMORY_MIB,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "host": host,
            "commands": commands,
            "summary": summary,
            "per_round": rows,
        }
        write_json(args.json, doc)
    return 1 if args.strict and summary["verdict"] == "MISS" else 0


if __name__ == "__main__":
    sys.exit(main())
