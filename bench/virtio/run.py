# SPDX-License-Identifier: BSD-2-Clause
"""bench/virtio: guest-to-host virtio-console throughput, hvf against QEMU's virtio-serial.

Both VMMs boot the same multiboot image, ``tests/guests/virtio_console.elf``, with the
same command line ``mode=bench tx=TX buf=BUF``: the guest (a virtio 1.x modern PCI
driver, MSI-X, MULTIPORT) sets up the console, waits until port 0 is reported open,
fills one BUF-byte buffer with port 0's pattern (32-bit little-endian words, word i =
(i * 2654435761) ^ 0x5bd1e995) and sends it TX / BUF times on port 0, keeping the whole
transmit queue in flight, then prints ``bench done N`` on the debug console (port
0x402) and exits through port 0xF4 (exit status 1 on both). One row per buffer size
(default 4 KiB and 64 KiB).

    hvf:  python -m hvf -m 256M -c 1 -s 0,hostbridge -s 31,lpc -l pc-testdev
            -l debugcon,stdio -s 4,virtio-console,con=BACKEND --kernel virtio_console.elf
            --append "mode=bench tx=TX buf=BUF" bench
    QEMU: qemu-system-x86_64 -accel kvm -m 256 -smp 1 -nodefaults ... -device
            virtio-serial-pci,disable-legacy=on -chardev ...,id=c0 -device
            virtconsole,chardev=c0 -kernel virtio_console.elf -append "..."

Port 0's output goes to a regular file on both (hvf ``con=file=PATH``, QEMU
``-chardev file``; on a tmpfs when /dev/shm has room), whose size a thread polls every
millisecond, or with ``--backend unix`` to a UNIX socket that the benchmark reads all
along (hvf ``con=unix=PATH``, QEMU ``-chardev socket,server=on,wait=on``). A file is
the default because QEMU's virtconsole drops whatever its chardev does not take at
once (hw/char/virtio-console.c: consoles are never throttled), so through a socket it
loses data whenever the reader falls behind, which on a busy 2-CPU host is every run;
hvf holds the guest's buffers back instead. The debug console is each VMM's stdout, a
pipe the benchmark reads, timestamping every line.

What is timed is only the stream, at the backend, on both ends: from the arrival of
the first bytes to the arrival of the last one. No debug-console line marks the first
byte: the last one before the stream, ``port 0 host open``, comes before the guest
fills its buffer (some 50 ms of emulated instructions for 64 KiB on kvm_pvm). Throughput is the bytes that arrived after the first read (or poll)
divided by that time (wall), or by the CPU time the VMM process (all threads; KVM
accounts guest time to the vCPU thread) used over the same span (cpu: its threads'
scheduler run times, in nanoseconds, from /proc/PID/task/*/schedstat, sampled when the
first and the last bytes arrived; /proc/PID/stat's 10 ms clock ticks where a thread
ended in between). VM start-up
(QEMU runs SeaBIOS), the guest's set-up and teardown are excluded. Every run's bytes
are checked: the buffer's pattern repeated, all TX bytes (hvf with a socket may
discard whole buffers sent before it accepted the benchmark's connection, as bhyve
does; they are counted, not timed). One round runs both VMMs once per row, the one
going first alternating per round, after an unmeasured warm-up round. The verdict
uses, for each row, the median over rounds of the per-round ratio hvf/QEMU, by CPU
time unless ``--metric wall``. Target: at least 1.0 on every row.

    python bench/virtio/run.py [--sizes BUF:TX,...] [--rounds R] [--backend file|unix]
                               [--metric cpu|wall] [--qemu-accel auto|kvm|tcg]
                               [--json PATH]

Run it with the interpreter that has hvf installed; hvf is started as
``sys.executable -m hvf``. QEMU is found (or installed) as bench/serial does.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
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
    medians,
    qemu_command,
    qemu_host_info,
    qemu_kvm_note,
    ratio_stats,
    require_hvf,
    require_kvm,
    run_vmm,
    verdict,
    write_json,
)

#: (buffer bytes, bytes sent) per row.
DEFAULT_SIZES = ((4096, 32 << 20), (65536, 512 << 20))
WARMUP = (65536, 16 << 20)
DEFAULT_ROUNDS = 5
DEFAULT_TARGET = 1.0
MEMORY_MIB = 256
HVF_SLOT = 4
RUN_TIMEOUT = 120.0
#: Clocks the throughput is measured by; the one --metric names decides the verdict.
METRICS = ("cpu", "wall")
OPEN_LINE = "port 0 host open"
SHM = "/dev/shm"
QEMU_SOCKET_LOSS = (" (QEMU's virtconsole drops what the socket does not take at once, "
                    "when the benchmark's reader falls behind; use --backend file)")
PATTERN_MUL, PATTERN_XOR = 2654435761, 0x5BD1E995


def pattern(buf: int) -> bytes:
    """The buffer ``virtio_console mode=bench buf=BUF`` sends over and over (port 0)."""
    return b"".join((((i * PATTERN_MUL) & 0xFFFFFFFF) ^ PATTERN_XOR).to_bytes(4, "little")
                    for i in range(buf // 4))


def guest_append(buf: int, tx: int) -> str:
    return f"mode=bench tx={tx} buf={buf}"


# ---- one run ----


def hvf_backend_spec(kind: str, path: pathlib.Path) -> str:
    return f"{kind}={path}"


def qemu_backend_args(kind: str, path: pathlib.Path) -> list[str]:
    # wait=on: QEMU does not start the guest until the benchmark is connected (its
    # console port counts as open regardless, and drops what the chardev cannot take).
    chardev = (f"file,id=c0,path={path}" if kind == "file"
               else f"socket,id=c0,path={path},server=on,wait=on")
    return ["-device", "virtio-serial-pci,disable-legacy=on", "-chardev", chardev,
            "-device", "virtconsole,chardev=c0"]


def hvf_virtio_command(elf: pathlib.Path, buf: int, tx: int, spec: str) -> list[str]:
    return hvf_command(MEMORY_MIB, elf, guest_append(buf, tx),
                       ["-s", f"{HVF_SLOT},virtio-console,con={spec}"])


def qemu_virtio_command(qemu: str, accel: str, elf: pathlib.Path, buf: int, tx: int,
                        backend_args: list[str]) -> list[str]:
    return qemu_command(qemu, accel, MEMORY_MIB, elf, guest_append(buf, tx), backend_args)


def check_stream(data: bytes, buf: int, sent: int, may_lose: bool, what: str,
                 stderr: str, hint: str = "") -> int:
    """Raise BenchError unless ``data`` is the pattern buffer repeated ``sent / buf``
    times (fewer, whole buffers, where ``may_lose``); returns the bytes missing.
    ``hint`` follows the error when bytes are missing or out of place."""
    lost = sent - len(data)
    if lost and not (may_lose and 0 < lost < sent and lost % buf == 0):
        raise BenchError(f"{what}: the backend got {len(data)} bytes, not {sent}{hint}\n"
                         f"{stderr[-1000:]}")
    want = pattern(buf)
    view = memoryview(data)
    for offset in range(0, len(data), buf):
        if view[offset : offset + buf] != want:
            first = next(i for i, (a, b) in enumerate(zip(view[offset:], want)) if a != b)
            raise BenchError(f"{what}: byte {offset + first} of the stream differs from "
                             f"the pattern{hint}\n{stderr[-1000:]}")
    return lost


def run_once(cmd: list[str], backend: Backend, buf: int, tx: int, what: str, *,
             may_lose: bool = False, hint: str = "",
             timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Run one VMM to completion; returns its timings after checking its output
    (``may_lose``: whole buffers may be missing at the start; ``hint``: see
    :func:`check_stream`)."""
    sent = tx // buf * buf
    done_line = f"bench done {sent}"
    run = run_vmm(cmd, backend, done_line, (OPEN_LINE,), what, timeout)
    run.require(what, OPEN_LINE, done_line)
    lost = check_stream(run.data, buf, sent, may_lose, what, run.stderr, hint)
    t_done = run.line_at(done_line)
    t_open = run.line_at(OPEN_LINE)
    assert t_done is not None and t_open is not None and backend.first_at is not None
    if backend.complete_at is not None:
        t_end, cpu_end = backend.complete_at, backend.complete_cpu
    else:  # bytes were lost before the connection: the end is the last byte that came
        t_end, cpu_end = backend.last_byte_at, run.cpu_at.get(done_line)
    measured = len(run.data) - backend.first_size
    transfer = t_end - backend.first_at
    cpu = cpu_between(backend.first_cpu, cpu_end)
    if measured <= 0 or transfer <= 0:
        raise BenchError(f"{what}: the whole stream arrived at once ({len(run.data)} bytes); "
                         "send more (--sizes)")
    if not cpu:
        raise BenchError(f"{what}: no CPU time measured over {transfer * 1e3:.1f} ms; "
                         "send more (--sizes)")
    return {
        "buf": buf,
        "bytes": sent,
        "measured_bytes": measured,  # after the first read or poll
        "first_bytes": backend.first_size,
        "transfer_s": transfer,
        "bytes_per_s": measured / transfer,
        "cpu_s": cpu,
        "bytes_per_cpu_s": measured / cpu,
        "cpu_us_per_buf": cpu / (measured / buf) * 1e6,
        # How long after the guest's `bench done` line the last byte arrived (negative:
        # it had arrived before the line reached the benchmark).
        "delivery_lag_s": t_end - t_done,
        "open_s": t_open - run.t0,
        "startup_s": backend.first_at - run.t0,
        "wall_s": run.t_exit - run.t0,
        "lost_before_connect": lost,
    }


# ---- the benchmark ----


Runner = Callable[[int, int, str], dict[str, Any]]


def probe_qemu(qemu: str, accel: str, elf: pathlib.Path, work: pathlib.Path) -> str | None:
    """None if QEMU runs the guest with ``accel`` (a short stream, checked); else why not."""
    buf, tx = 4096, 1 << 16
    backend = Backend("file", work, "probe")
    what = f"QEMU -accel {accel} probe"
    try:
        run = run_vmm(qemu_virtio_command(qemu, accel, elf, buf, tx,
                                          qemu_backend_args("file", backend.path)),
                      backend, f"bench done {tx}", (), what, 120)
        run.require(what, OPEN_LINE, f"bench done {tx}")
        check_stream(run.data, buf, tx, False, what, run.stderr)
    except BenchError as e:
        lines = str(e).splitlines()
        return lines[0] + " " + " ".join(lines[-2:])
    return None


def bench(runners: dict[str, Runner], sizes: list[tuple[int, int]], rounds: int,
          warmup: int, log: Log) -> list[dict[str, Any]]:
    """One record per round and row (buffer size)."""
    for _ in range(warmup):  # page cache, .pyc files, the CPU's frequency
        for name in VMMS:
            runners[name](*WARMUP, f"{name} warm-up")
    rows = []
    for r in range(rounds):
        order = VMMS if r % 2 == 0 else VMMS[::-1]
        for buf, tx in sizes:
            got = {name: runners[name](buf, tx, f"{name} round {r + 1} buf={buf}")
                   for name in order}
            row = {
                "round": r + 1, "buf": buf, "first": order[0], **got,
                "wall_ratio": got["hvf"]["bytes_per_s"] / got["qemu"]["bytes_per_s"],
                "cpu_ratio": got["hvf"]["bytes_per_cpu_s"] / got["qemu"]["bytes_per_cpu_s"],
            }
            rows.append(row)
            log(f"  round {r + 1}/{rounds} buf={buf}: hvf {got['hvf']['bytes_per_s'] / 1e6:.1f}"
                f" MB/s, QEMU {got['qemu']['bytes_per_s'] / 1e6:.1f} MB/s; hvf/QEMU "
                f"{row['wall_ratio']:.3f} wall, {row['cpu_ratio']:.3f} cpu")
    return rows


def summarize(rows: list[dict[str, Any]], sizes: list[tuple[int, int]], target: float,
              metric: str) -> dict[str, Any]:
    keys = ("bytes_per_s", "bytes_per_cpu_s", "cpu_us_per_buf", "transfer_s", "cpu_s",
            "delivery_lag_s", "startup_s", "wall_s")
    per_buf: dict[str, Any] = {}
    for buf, tx in sizes:
        mine = [r for r in rows if r["buf"] == buf]
        entry: dict[str, Any] = {"buf": buf, "bytes": tx // buf * buf}
        for name in VMMS:
            entry[name] = medians(mine, name, keys)
            entry[name]["lost_before_connect"] = max(r[name]["lost_before_connect"]
                                                     for r in mine)
        for m in METRICS:
            key = "bytes_per_s" if m == "wall" else "bytes_per_cpu_s"
            entry[m] = {**ratio_stats([r[f"{m}_ratio"] for r in mine]),
                        "ratio_of_medians": entry["hvf"][key] / entry["qemu"][key]}
        per_buf[str(buf)] = judge(entry, metric, target)
    return verdict(per_buf, metric, target)


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def report(rows: list[dict[str, Any]], summary: dict[str, Any], host: dict[str, Any],
           config: dict[str, Any]) -> str:
    qemu_label = config["qemu_label"]
    metric = summary["metric"]
    sizes = ", ".join(f"buf {_size(b)} x {t // b} = {_size(t // b * b)}"
                      for b, t in config["sizes"])
    out = [
        "bench/virtio: guest-to-host throughput through virtio-console port 0, hvf vs. QEMU",
        "  guest:   tests/guests/virtio_console.elf `mode=bench tx=TX buf=BUF` (one buffer "
        "sent TX/BUF times, whole queue in flight, MSI-X); the same image for both",
        f"  device:  hvf `-s {HVF_SLOT},virtio-console,con=...`; {qemu_label} "
        "`-device virtio-serial-pci,disable-legacy=on -device virtconsole`",
        f"  backend: {config['backend_desc']}",
        f"  machine: {MEMORY_MIB} MiB, 1 vCPU; hvf `-m {MEMORY_MIB}M -c 1` (hostbridge, lpc, "
        f"pc-testdev, debugcon); {qemu_label} `-m {MEMORY_MIB} -smp 1 -nodefaults`",
        "  timed:   at the backend, from the first bytes' arrival to the last byte's; "
        "start-up, guest set-up and teardown excluded",
        "           wall = bytes after the first read / elapsed time; cpu = the same bytes / "
        "the VMM's CPU time over that span (all threads, guest time included)",
        f"  sizes:   {sizes}; {config['rounds']} rounds after {config['warmup']} warm-up "
        "round(s); first VMM alternating per round",
        f"  host:    Linux {host['kernel']}, {host['kvm_module']}, {host['cpus']} CPUs, "
        f"{host['cpu'] or 'unknown CPU'}; load average at start {host['loadavg']}",
        f"           Python {host['python']}; {host['qemu']}",
    ]
    out += qemu_kvm_note(config)
    head = (f"{'':9}  {'---------- hvf ----------':>25}  {'---------- QEMU ---------':>25}  "
            f"{'-- hvf/QEMU --':>14}")
    cols = (f"{'buf':>5} {'rnd':>3}  {'MB/s':>7}  {'cpu MB/s':>8}  {'us/buf':>6}  "
            f"{'MB/s':>7}  {'cpu MB/s':>8}  {'us/buf':>6}  {'wall':>6}  {'cpu':>6}")
    out += ["", head, cols]

    def cells(d: dict[str, Any]) -> str:
        return (f"{d['bytes_per_s'] / 1e6:7.1f}  {d['bytes_per_cpu_s'] / 1e6:8.1f}  "
                f"{d['cpu_us_per_buf']:6.1f}")

    for buf, _ in config["sizes"]:
        label = _size(buf).replace(" KiB", "K").replace(" MiB", "M").replace(" B", "")
        for r in (r for r in rows if r["buf"] == buf):
            out.append(f"{label:>5} {r['round']:>3}  {cells(r['hvf'])}  {cells(r['qemu'])}  "
                       f"{r['wall_ratio']:6.3f}  {r['cpu_ratio']:6.3f}")
        e = summary["rows"][str(buf)]
        out.append(f"{label:>5} {'med':>3}  {cells(e['hvf'])}  {cells(e['qemu'])}  "
                   f"{e['wall']['ratio']:6.3f}  {e['cpu']['ratio']:6.3f}")
    out += ["", "  cpu MB/s: bytes per second of the VMM's CPU time; us/buf: its CPU time "
            "per buffer (chain)"]
    for buf, _ in config["sizes"]:
        e = summary["rows"][str(buf)]
        h, q = e["hvf"], e["qemu"]
        out.append(f"  buf {_size(buf)}: one run, median: transfer hvf {h['transfer_s']:.3f} s,"
                   f" QEMU {q['transfer_s']:.3f} s; start-up to the first byte hvf "
                   f"{h['startup_s']:.2f} s, QEMU {q['startup_s']:.2f} s")
        if h["lost_before_connect"]:
            out.append(f"           hvf discarded up to {h['lost_before_connect']} bytes sent "
                       "before it accepted the benchmark's connection (not timed)")
        for m in (metric, *(x for x in METRICS if x != metric)):
            d = e[m]
            out.append(f"    hvf/QEMU by {m} time: median {d['ratio']:.3f} (rounds "
                       f"{d['ratio_min']:.3f}-{d['ratio_max']:.3f}; ratio of medians "
                       f"{d['ratio_of_medians']:.3f})  {e['verdict'] if m == metric else ''}")
    out.append(f"  target: hvf/QEMU >= {summary['target']:.2f} on every row ({metric} time)"
               f"  ->  {summary['verdict']}")
    return "\n".join(out)


def work_parent(sizes: list[tuple[int, int]]) -> str | None:
    """Where the runs' files go: a tmpfs (/dev/shm) when it has room for the largest
    stream twice over, so that no disk is involved; else the default temporary folder."""
    try:
        if shutil.disk_usage(SHM).free > 2 * max(tx for _, tx in sizes) + (64 << 20):
            return SHM
    except OSError:
        pass
    return None


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``BUF:TX,...`` with K/M suffixes (KiB, MiB)."""
    def number(s: str) -> int:
        s = s.strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
        return int(s[:-1] if scale > 1 else s) * scale

    sizes = []
    for item in text.split(","):
        buf_s, sep, tx_s = item.partition(":")
        if not sep:
            raise ValueError(f"{item!r} is not BUF:TX")
        buf, tx = number(buf_s), number(tx_s)
        if buf < 4 or buf % 4 or buf > 1 << 20 or tx // buf < 2 or tx >= 1 << 32:
            raise ValueError(f"{item!r}: BUF must be a multiple of 4 up to 1M, TX at least "
                             "2 buffers and below 4 GiB")
        sizes.append((buf, tx))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/virtio/run.py",
        description="Guest-to-host virtio-console throughput, hvf against QEMU.",
    )
    default_sizes = ",".join(f"{b >> 10}K:{t >> 20}M" for b, t in DEFAULT_SIZES)
    parser.add_argument("--sizes", default=default_sizes, metavar="BUF:TX,...",
                        help="rows: buffer bytes and bytes sent per run, K/M suffixes "
                        f"(default {default_sizes})")
    add_rounds_options(parser, DEFAULT_ROUNDS,
                       f"unmeasured rounds (one {_size(WARMUP[1])} run per VMM) first "
                       "(default 1)")
    parser.add_argument("--backend", choices=("file", "unix"), default="file",
                        help="where port 0's output goes on both (default file; with unix "
                        "QEMU drops what the reader does not take at once)")
    add_qemu_options(parser)
    add_qemu_accel_option(parser)
    add_verdict_options(parser, DEFAULT_TARGET, "PASS when every row's median ratio "
                        "hvf/QEMU is at least this", METRICS, "cpu")
    add_output_options(parser)
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as e:
        parser.error(f"--sizes: {e}")
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1, --warmup at least 0")
    log = Log("virtio", args.quiet)

    try:
        require_kvm()
        require_hvf()
        qemu = find_qemu(args.qemu, not args.no_install, log)
        with tempfile.TemporaryDirectory(prefix="hvf-virtio-bench-",
                                         dir=work_parent(sizes)) as tmp:
            work = pathlib.Path(tmp)
            elf = build_guest("virtio_console", work)
            accel, kvm_failure = choose_qemu_accel(
                args.qemu_accel, lambda a: probe_qemu(qemu, a, elf, work))
            qemu_label = f"QEMU ({accel.upper()})"
            host = qemu_host_info(qemu)

            def run_hvf(buf: int, tx: int, what: str) -> dict[str, Any]:
                backend = Backend(args.backend, work, "hvf", expect=tx // buf * buf)
                cmd = hvf_virtio_command(elf, buf, tx,
                                         hvf_backend_spec(backend.kind, backend.path))
                # hvf discards output while no client is connected, as bhyve does.
                return run_once(cmd, backend, buf, tx, what, may_lose=args.backend == "unix")

            def run_qemu(buf: int, tx: int, what: str) -> dict[str, Any]:
                backend = Backend(args.backend, work, "qemu", expect=tx // buf * buf)
                cmd = qemu_virtio_command(qemu, accel, elf, buf, tx,
                                          qemu_backend_args(backend.kind, backend.path))
                return run_once(cmd, backend, buf, tx, what, hint=QEMU_SOCKET_LOSS
                                if args.backend == "unix" else "")

            log.note(f"sizes {args.sizes}, backend {args.backend}, {qemu_label}, "
                     f"{args.rounds} rounds (+{args.warmup} warm-up)")
            rows = bench({"hvf": run_hvf, "qemu": run_qemu}, sizes, args.rounds,
                         args.warmup, log)
    except (BenchError, subprocess.TimeoutExpired) as e:
        log.error(e)
        return 2

    backend_desc = (
        "a UNIX socket read all along on both: hvf `con=unix=PATH`, QEMU "
        "`-chardev socket,server=on,wait=on`" if args.backend == "unix" else
        "a regular file on both, its size polled every ms: hvf `con=file=PATH`, QEMU "
        "`-chardev file`"
    )
    config = {"sizes": sizes, "rounds": args.rounds, "warmup": args.warmup,
              "backend": args.backend, "backend_desc": backend_desc,
              "qemu_accel": accel, "qemu_label": qemu_label,
              "qemu_kvm_failure": kvm_failure if args.qemu_accel == "auto" else None}
    summary = summarize(rows, sizes, args.target, args.metric)
    print(report(rows, summary, host, config))
    if args.json:
        out_path = pathlib.Path("con.out" if args.backend == "file" else "con.sock")
        elf_name = pathlib.Path("virtio_console.elf")
        doc = {
            "benchmark": "virtio",
            "method": "same guest (virtio_console mode=bench tx=TX buf=BUF) on both; "
            "throughput = bytes after the first read at the backend / time from the first "
            "bytes' arrival to the last byte's (wall), or / the VMM's CPU time over that "
            "span (cpu); alternating runs; verdict on the median per-round ratio hvf/QEMU "
            f"by {args.metric} time, on every buffer size",
            **{k: v for k, v in config.items() if k != "backend_desc"},
            "host": host,
            "hvf_commands": {str(b): hvf_virtio_command(
                elf_name, b, t, hvf_backend_spec(args.backend, out_path)) for b, t in sizes},
            "qemu_commands": {str(b): qemu_virtio_command(
                qemu, accel, elf_name, b, t, qemu_backend_args(args.backend, out_path))
                for b, t in sizes},
            "summary": summary,
            "per_round": rows,
        }
        write_json(args.json, doc)
    return 1 if args.strict and summary["verdict"] == "MISS" else 0


if __name__ == "__main__":
    sys.exit(main())
