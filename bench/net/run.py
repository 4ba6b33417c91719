# SPDX-License-Identifier: BSD-2-Clause
"""bench/net: frames through a tap, guest to host and host to guest, hvf's virtio-net
against QEMU's, with the same guest on the same tap, and the host side's own ceiling.

The benchmark makes a network namespace with a persistent tap (``hvfb0``, up,
``txqueuelen`` 1000, IPv6 off) and runs everything inside it: both VMMs attach to
that tap, and its host end is ``hostside`` (hostside.c), AF_PACKET sockets bound to
the tap. Both VMMs boot the same multiboot guest, ``tests/guests/virtio_net.elf``, in
one of its bench modes::

    hvf:  python -m hvf -m 256M -c 1 -s 0,hostbridge -s 31,lpc -l pc-testdev
            -l debugcon,stdio -s 2,virtio-net,hvfb0,mac=02:00:00:77:00:05
            --kernel virtio_net.elf --append "source=N len=L" bench
    QEMU: qemu-system-x86_64 -accel kvm -m 256 -smp 1 -nodefaults ...
            -netdev tap,id=n0,ifname=hvfb0,script=no,downscript=no,vhost=off
            -device virtio-net-pci,netdev=n0,mac=02:00:00:77:00:05,disable-legacy=on,romfile=
            -kernel virtio_net.elf -append "source=N len=L"

guest->host (``source=N len=L``): the guest keeps its transmit ring full of numbered
L-byte frames; hostside counts them off the tap (``hostside recv``) and times them
from its first batch to the last frame. host->guest (``sink=N``): hostside waits for
the guest's ready ack, sends N numbered frames to the guest's MAC, never more than
``--window`` ahead of the guest's acks (one every 64 frames; the tap's queue and the
guest's 256 receive buffers hold the window, so nothing is dropped), and times them
from the first frame sent to the last ack. Every frame must arrive, in order. The
VMM's CPU time (all threads, per thread) is sampled over the same span. Once per
round hostside also runs against a peer of its own that attaches to the tap as a VMM
does (``peer``): the host side's ceiling. One round runs every row on both VMMs, the
first alternating; the verdict uses each row's median per-round ratio hvf/QEMU of
frames per CPU second of the VMM (``--metric cpu``, the default: steady on a shared
host) or per second (``wall``). Target: at least 1.0 on every row.

    python bench/net/run.py [--rows DIR:LEN,...] [--frames N] [--window W]
                            [--rounds R] [--metric cpu|wall] [--json PATH]

Run it as root with the interpreter that has hvf installed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/, for common
from common import (
    VMMS,
    BenchError,
    Log,
    add_output_options,
    add_qemu_accel_option,
    add_qemu_options,
    add_rounds_options,
    add_verdict_options,
    build_guest,
    choose_qemu_accel,
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
    verdict,
    write_json,
)
from netns import (
    GUEST_MAC,
    TAP,
    TX_QUEUE_LEN,
    Row,
    TestNet,
    build_hostside,
    ceiling,
    measure,
    parse_rows,
    run_pair,
    why_no_network,
)

DEFAULT_ROWS = "g2h:64,g2h:1500,h2g:64,h2g:1500"
DEFAULT_FRAMES = 20000
DEFAULT_WINDOW = 512
CEILING_FRAMES = 200000
DEFAULT_ROUNDS = 3
DEFAULT_TARGET = 1.0
MEMORY_MIB = 256
SLOT = 2
#: Clocks the rates are taken by; the one --metric names decides the verdict.
METRICS = ("cpu", "wall")
_RATE_KEY = {"wall": "frames_per_s", "cpu": "frames_per_cpu_s"}


def hvf_cmd(elf: pathlib.Path, row: Row) -> list[str]:
    return hvf_command(MEMORY_MIB, elf, row.append(),
                       ["-s", f"{SLOT},virtio-net,{TAP},mac={GUEST_MAC}"])


def qemu_cmd(qemu: str, accel: str, elf: pathlib.Path, row: Row) -> list[str]:
    # romfile=: no iPXE option ROM, which SeaBIOS would run (and KVM fail on, on kvm_pvm).
    return qemu_command(qemu, accel, MEMORY_MIB, elf, row.append(), [
        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},disable-legacy=on,romfile="])


def bench(runners: dict[str, Any], host_ceiling: Any, rows: list[Row], rounds: int,
          warmup: int, log: Log) -> list[dict[str, Any]]:
    for _ in range(warmup):  # page cache, .pyc files, the CPU's frequency
        for name in VMMS:
            runners[name](Row("g2h", 64, 2000), f"{name} warm-up")
    records = []
    for r in range(rounds):
        order = VMMS if r % 2 == 0 else VMMS[::-1]
        for row in rows:
            got = {name: runners[name](row, f"{name} round {r + 1} {row.name}")
                   for name in order}
            rec = {"round": r + 1, "row": row.name, "first": order[0], **got,
                   "host": host_ceiling(row)}
            for m in METRICS:
                rec[f"{m}_ratio"] = got["hvf"][_RATE_KEY[m]] / got["qemu"][_RATE_KEY[m]]
            records.append(rec)
            log(f"  round {r + 1}/{rounds} {row.name}: hvf "
                f"{got['hvf']['frames_per_s']:.0f} frames/s, QEMU "
                f"{got['qemu']['frames_per_s']:.0f}, host side {rec['host']['frames_per_s']:.0f};"
                f" hvf/QEMU {rec['wall_ratio']:.3f} wall, {rec['cpu_ratio']:.3f} cpu")
    return records


def summarize(records: list[dict[str, Any]], rows: list[Row], target: float,
              metric: str) -> dict[str, Any]:
    keys = ("frames_per_s", "bytes_per_s", "frames_per_cpu_s", "seconds", "cpu_us_per_frame",
            "vcpu_us_per_frame", "other_us_per_frame", "hostside_us_per_frame", "startup_s")
    entries = []
    for row in rows:
        mine = [r for r in records if r["row"] == row.name]
        entry: dict[str, Any] = {
            "row": row.name, "direction": row.direction, "length": row.length,
            "frames": row.frames, **{name: medians(mine, name, keys) for name in VMMS},
            "host": medians(mine, "host", ("frames_per_s", "bytes_per_s", "cpu_us_per_frame"))}
        for m in METRICS:
            entry[m] = ratio_stats([r[f"{m}_ratio"] for r in mine])
        entries.append(judge(entry, metric, target))
    return verdict(entries, metric, target)


def report(summary: dict[str, Any], config: dict[str, Any], host: dict[str, Any]) -> str:
    q = config["qemu_label"]
    out = [
        f"bench/net: frames through a tap, hvf vs. {q}, same guest, same tap",
        "  guest:   tests/guests/virtio_net.elf `source=N len=L` (guest->host: the transmit "
        "ring kept full) or `sink=N` (host->guest: an ack every 64 frames); polled, 1 vCPU, "
        f"{MEMORY_MIB} MiB",
        f"  network: a namespace of its own, persistent tap {TAP} (txqueuelen {TX_QUEUE_LEN});"
        f" hvf `-s {SLOT},virtio-net,{TAP}`, {q} `-netdev tap,vhost=off -device "
        "virtio-net-pci,disable-legacy=on`",
        "  host:    hostside.c, AF_PACKET sockets on the tap: counts the guest's frames; "
        f"sends frames at most {config['window']} ahead of the guest's acks",
        "  timed:   by the host side, from the first frame (received batch / sent) to the "
        f"last (received / acked); {config['frames']} frames a run; cpu = the VMM's CPU "
        "time (all threads) over that span",
        f"  rounds:  {config['rounds']} after {config['warmup']} warm-up; first VMM "
        "alternating per round; host ceiling: hostside against its own peer on the tap "
        f"({config['ceiling_frames']} frames)",
        f"  machine: Linux {host['kernel']}, {host['kvm_module']}, {host['cpus']} CPUs, "
        f"{host['cpu'] or 'unknown CPU'}; load average at start {host['loadavg']}",
        f"           Python {host['python']}; {host['qemu']}",
    ]
    out += qemu_kvm_note(config)
    out += ["", f"{'':18}  {'--------- hvf ---------':>23}  {'--------- QEMU --------':>23}"
            f"  {'--- host side ---':>17}  {'-- hvf/QEMU --':>14}",
            f"{'row':18}  {'frames/s':>8} {'MB/s':>6} {'us/f':>6}  {'frames/s':>8} "
            f"{'MB/s':>6} {'us/f':>6}  {'frames/s':>9} {'MB/s':>7}  {'wall':>6} {'cpu':>6}"]
    for e in summary["rows"]:
        h, qm, c = e["hvf"], e["qemu"], e["host"]
        out.append(
            f"{e['row']:18}  {h['frames_per_s']:8.0f} {h['bytes_per_s'] / 1e6:6.2f} "
            f"{h['cpu_us_per_frame']:6.1f}  {qm['frames_per_s']:8.0f} "
            f"{qm['bytes_per_s'] / 1e6:6.2f} {qm['cpu_us_per_frame']:6.1f}  "
            f"{c['frames_per_s']:9.0f} {c['bytes_per_s'] / 1e6:7.1f}  "
            f"{e['wall']['ratio']:6.3f} {e['cpu']['ratio']:6.3f}  {e['verdict']}")
    out += ["", "  MB/s: 10^6 bytes of frames (Ethernet header included); us/f: the VMM's CPU "
            "time per frame (all threads), split into the vCPU thread (the guest's emulated "
            "instructions and exits) + the rest (device model, tap I/O):"]
    for e in summary["rows"]:
        h, qm = e["hvf"], e["qemu"]
        d = e[summary["metric"]]
        out.append(f"    {e['row']}: hvf {h['vcpu_us_per_frame']:.1f} + "
                   f"{h['other_us_per_frame']:.1f} us, QEMU {qm['vcpu_us_per_frame']:.1f} + "
                   f"{qm['other_us_per_frame']:.1f} us; host side {h['hostside_us_per_frame']:.1f}"
                   f" us/frame (its ceiling {e['host']['cpu_us_per_frame']:.1f}); run "
                   f"{h['seconds']:.2f} s / {qm['seconds']:.2f} s; hvf/QEMU by "
                   f"{summary['metric']} rounds {d['ratio_min']:.3f}-{d['ratio_max']:.3f}")
    out.append(f"  target: hvf/QEMU >= {summary['target']:.2f} on every row "
               f"({summary['metric']} clock)  ->  {summary['verdict']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/net/run.py",
        description="Frames through a tap, hvf's virtio-net against QEMU's.")
    parser.add_argument("--rows", default=DEFAULT_ROWS, metavar="DIR:LEN,...",
                        help=f"rows: g2h or h2g and the frame length (default {DEFAULT_ROWS})")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help=f"frames per run (default {DEFAULT_FRAMES})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help="host->guest: frames sent ahead of the guest's last ack "
                        f"(default {DEFAULT_WINDOW})")
    parser.add_argument("--ceiling-frames", type=int, default=CEILING_FRAMES,
                        help=f"frames per host-ceiling run (default {CEILING_FRAMES})")
    parser.add_argument("--cc", default=os.environ.get("CC", "gcc"),
                        help="C compiler for hostside.c (default $CC or gcc)")
    add_rounds_options(parser, DEFAULT_ROUNDS, "unmeasured runs per VMM first (default 1)")
    add_qemu_options(parser)
    add_qemu_accel_option(parser)
    add_verdict_options(parser, DEFAULT_TARGET, "PASS when every row's median ratio "
                        "hvf/QEMU is at least this", METRICS, "cpu")
    add_output_options(parser)
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.rows, args.frames)
    except ValueError as e:
        parser.error(f"--rows: {e}")
    if args.rounds < 1 or args.warmup < 0 or args.frames < 1000 or args.ceiling_frames < 1000:
        parser.error("--rounds must be at least 1, --warmup at least 0, --frames and "
                     "--ceiling-frames at least 1000")
    if not 64 <= args.window <= TX_QUEUE_LEN:
        parser.error(f"--window takes 64 to {TX_QUEUE_LEN} (the tap's queue)")
    log = Log("net", args.quiet)

    try:
        if (why := why_no_network()) is not None:
            raise BenchError(why)
        require_kvm()
        require_hvf()
        qemu = find_qemu(args.qemu, not args.no_install, log)
        with tempfile.TemporaryDirectory(prefix="hvf-net-bench-") as tmp, TestNet() as net:
            work = pathlib.Path(tmp)
            os.environ["HVF_RUNTIME_DIR"] = str(work / "run")  # no clash with other VMs
            elf = build_guest("virtio_net", work)
            hostside = str(build_hostside(work, args.cc))

            def run(cmd: list[str], row: Row, what: str) -> dict[str, Any]:
                return measure(run_pair(net, [hostside, *row.hostside_args(args.window)],
                                        cmd, what), row, what)

            def host_ceiling(row: Row) -> dict[str, Any]:
                args_ = [hostside, *row.hostside_args(args.window, args.ceiling_frames),
                         "peer"]
                return ceiling(run_pair(net, args_, None, f"host ceiling {row.name}"), row,
                               args.ceiling_frames)

            def probe(accel: str) -> str | None:
                row = Row("g2h", 64, 2000)
                try:
                    run(qemu_cmd(qemu, accel, elf, row), row, f"QEMU -accel {accel} probe")
                except BenchError as e:
                    return str(e).splitlines()[0]
                return None

            accel, kvm_failure = choose_qemu_accel(args.qemu_accel, probe)
            runners = {
                "hvf": lambda r, w: run(hvf_cmd(elf, r), r, w),
                "qemu": lambda r, w: run(qemu_cmd(qemu, accel, elf, r), r, w),
            }
            host = qemu_host_info(qemu)
            log.note(f"rows {args.rows}, {args.frames} frames a run; QEMU -accel {accel}; "
                     f"{args.rounds} rounds in namespace {net.name}")
            records = bench(runners, host_ceiling, rows, args.rounds, args.warmup, log)
            elf_name = pathlib.Path("virtio_net.elf")
            commands = {r.name: {"hvf": net.command(hvf_cmd(elf_name, r)),
                                 "qemu": net.command(qemu_cmd(qemu, accel, elf_name, r)),
                                 "hostside": net.command(["hostside",
                                                          *r.hostside_args(args.window)])}
                        for r in rows}
    except (BenchError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
        log.error(e)
        return 2

    config = {"rows": [r.name for r in rows], "frames": args.frames, "window": args.window,
              "ceiling_frames": args.ceiling_frames, "rounds": args.rounds,
              "warmup": args.warmup, "qemu_accel": accel, "qemu_label": f"QEMU ({accel.upper()})",
              "qemu_kvm_failure": kvm_failure if args.qemu_accel == "auto" else None}
    summary = summarize(records, rows, args.target, args.metric)
    print(report(summary, config, host))
    if args.json:
        write_json(args.json, {"benchmark": "net", **config, "host": host,
                               "commands": commands, "summary": summary,
                               "per_round": records})
    return 1 if args.strict and summary["verdict"] == "MISS" else 0


if __name__ == "__main__":
    sys.exit(main())
