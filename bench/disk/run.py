# SPDX-License-Identifier: BSD-2-Clause
"""bench/disk: a test guest's disk throughput through hvf's and QEMU's disk devices,
on the same image, with the host's own rate for that file as the ceiling.

Both VMMs boot the same multiboot guest with the same command line
``bench=OP buf=B depth=D n=SECTORS``: the guest sets the device up, then keeps D
requests of B bytes in flight (sequential reads, sequential writes or random reads,
the data never touched) until N sectors have moved, and prints the TSC cycles from
its first submission to its last completion. For virtio-blk that is
``tests/guests/virtio_blk.c`` (MSI-X, a wake-up per interrupt); for NVMe
``bench/disk/nvme_bench.c``, the driver of ``tests/guests/nvme_disk.c`` (one I/O
queue pair, polled, doorbell buffers where offered) with a bench ``main``. Same image
file, opened with ``O_DIRECT`` by both::

    hvf:  python -m hvf -m 256M -c 1 -s 0,hostbridge -s 31,lpc -l pc-testdev
            -l debugcon,stdio -s 3,virtio-blk,IMG,nocache,aio=threads --kernel virtio_blk.elf
            --append "bench=OP buf=B depth=D n=N" bench
    QEMU: qemu-system-x86_64 -accel kvm -m 256 -smp 1 -nodefaults ...
            -drive file=IMG,if=none,id=d0,format=raw,cache=none,aio=threads
            -device virtio-blk-pci,drive=d0,disable-legacy=on -kernel virtio_blk.elf
            -append "..."
    host: fio --direct=1 --ioengine=libaio --iodepth=D --rw=... --bs=B on IMG

(NVMe: ``-s 3,nvme,IMG,nocache,aio=threads`` and ``-device nvme,drive=d0,serial=hvfbench,mdts=9``:
requests of up to 2 MiB on both, QEMU's default being 512 KiB.)
Throughput is bytes / the guest's own elapsed time (TSC cycles / the host's TSC rate,
which tsc_hz.c measures: KVM guests read the host's TSC). Also reported: the host's
wall time between the guest's ``go`` and ``end`` lines (which includes printing one
line), and the VMM's CPU time over that span per request, split into the vCPU thread
(on kvm_pvm: the guest's emulated instructions and exits) and every other thread (the
device model and its I/O). One round runs each row on both VMMs (the first
alternating) and fio once; the verdict uses each row's median per-round ratio
hvf/QEMU by the guest's clock (``--metric``). Target: at least 1.0 on every row.

    python bench/disk/run.py [--rows OP:BUF:DEPTH:TOTAL,...] [--devices virtio-blk,nvme]
                             [--rounds R] [--image-mib M] [--dir DIR] [--json PATH]
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
    choose_qemu_accel,
    find_qemu,
    find_tool,
    judge,
    medians,
    qemu_host_info,
    qemu_kvm_note,
    ratio_stats,
    require_hvf,
    require_kvm,
    verdict,
    version_line,
    write_json,
)
from vmm import (
    DEVICES,
    Device,
    Row,
    ceiling,
    fio_cmd,
    hvf_cmd,
    measure,
    parse_rows,
    qemu_cmd,
    run_guest,
    tsc_hz,
)

DEFAULT_ROWS = "seqread:1M:8:1G,seqwrite:1M:8:1G,randread:4K:16:64M"
WARMUP = Row("seqread", 1 << 20, 4, 64 << 20)
DEFAULT_ROUNDS = 3
DEFAULT_TARGET = 1.0
METRICS = ("guest", "wall", "cpu")
_RATE_KEY = {"guest": "bytes_per_s", "wall": "wall_bytes_per_s", "cpu": "bytes_per_cpu_s"}


def make_image(work: pathlib.Path, mib: int) -> pathlib.Path:
    """A fully allocated image of non-zero data (holes would read faster than data)."""
    image = work / "disk.img"
    chunk = os.urandom(1 << 20)
    with image.open("wb") as f:
        for _ in range(mib):
            f.write(chunk)
        os.fsync(f.fileno())
    return image


def bench(runners: dict[str, Any], fio: Any, devices: list[Device], rows: list[Row],
          rounds: int, warmup: int, log: Log) -> list[dict[str, Any]]:
    for _ in range(warmup):  # page cache, .pyc files, the CPU's frequency
        for device in devices:
            for name in VMMS:
                runners[name](device, WARMUP, f"{name} {device.name} warm-up")
    records = []
    for r in range(rounds):
        order = VMMS if r % 2 == 0 else VMMS[::-1]
        for device in devices:
            for row in rows:
                got = {name: runners[name](device, row, f"{name} {device.name} round "
                                           f"{r + 1} {row.name}") for name in order}
                rec = {"round": r + 1, "device": device.name, "row": row.name,
                       "first": order[0], **got, "host": fio(row)}
                for m in METRICS:
                    key = _RATE_KEY[m]
                    rec[f"{m}_ratio"] = got["hvf"][key] / got["qemu"][key]
                records.append(rec)
                log(f"  round {r + 1}/{rounds} {device.name} {row.name}: hvf "
                    f"{got['hvf']['bytes_per_s'] / 1e6:.1f} MB/s, QEMU "
                    f"{got['qemu']['bytes_per_s'] / 1e6:.1f} MB/s, host "
                    f"{rec['host']['bytes_per_s'] / 1e6:.1f} MB/s; hvf/QEMU "
                    f"{rec['guest_ratio']:.3f}")
    return records


def summarize(records: list[dict[str, Any]], devices: list[Device], rows: list[Row],
              target: float, metric: str) -> dict[str, Any]:
    keys = ("bytes_per_s", "iops", "wall_bytes_per_s", "bytes_per_cpu_s", "guest_s",
            "wall_s", "cpu_us_per_request", "vcpu_us_per_request", "other_us_per_request",
            "tsc_excess_s", "startup_s", "irqs_per_request")
    entries = []
    for device in devices:
        for row in rows:
            mine = [r for r in records if r["device"] == device.name and r["row"] == row.name]
            entry: dict[str, Any] = {"device": device.name, "row": row.name, "op": row.op,
                                     "buf": row.buf, "depth": row.depth, "bytes": row.total,
                                     **{name: medians(mine, name, keys) for name in VMMS},
                                     "host": medians(mine, "host", ("bytes_per_s", "iops"))}
            for m in METRICS:
                entry[m] = ratio_stats([r[f"{m}_ratio"] for r in mine])
            entries.append(judge(entry, metric, target))
    return verdict(entries, metric, target)


def report(summary: dict[str, Any], config: dict[str, Any], host: dict[str, Any]) -> str:
    q = config["qemu_label"]
    out = [
        f"bench/disk: test-guest disk throughput, hvf vs. {q}, same guest, same image",
        "  guest:   `bench=OP buf=B depth=D n=N` (D requests in flight, data untouched; "
        "1 vCPU, 256 MiB): virtio-blk tests/guests/virtio_blk.c (MSI-X, halts between "
        "interrupts), NVMe bench/disk/nvme_bench.c (nvme_disk.c's driver, polled, doorbell "
        "buffers; QEMU `mdts=9` as hvf's 2 MiB)",
        f"  image:   {config['image_mib']} MiB of data on {config['fs']} ({config['dir']}); "
        "O_DIRECT on all three: hvf `nocache`, QEMU `cache=none,aio=threads`, fio "
        "`--direct=1 --ioengine=libaio --iodepth=D`",
        "  RAM:     " + ("both a memfd (hvf `memory.shared=true`, QEMU "
                         "`-object memory-backend-memfd`; 4 KiB pages unless the host's "
                         "shmem THP allows more)" if config["ram"] == "memfd"
                         else "both their default, anonymous memory with transparent huge "
                         "pages where the host gives them (`--ram memfd` for a memfd)"),
        f"  engine:  hvf `aio={config['aio']}`",
        f"  timed:   the guest's TSC from first submission to last completion / "
        f"{config['tsc_hz'] / 1e6:.1f} MHz (host TSC); wall = host time between the guest's "
        "go and end lines; cpu = the VMM's CPU time (all threads) over that span",
        f"  rounds:  {config['rounds']} after {config['warmup']} warm-up; first VMM "
        "alternating per round",
        f"  host:    Linux {host['kernel']}, {host['kvm_module']}, {host['cpus']} CPUs, "
        f"{host['cpu'] or 'unknown CPU'}; load average at start {host['loadavg']}",
        f"           Python {host['python']}; {host['qemu']}; {host['fio']}",
    ]
    out += qemu_kvm_note(config)
    for line in config.get("missing", []):
        out.append(f"  MISSING: {line}")
    out += ["", f"{'':27}  {'------- hvf -------':>19}  {'------ QEMU -------':>19}  "
            f"{'-- host --':>10}  {'---- hvf/QEMU ----':>20}",
            f"{'device':10} {'row':16}  {'MB/s':>6} {'IOPS':>6} {'us/rq':>5}  "
            f"{'MB/s':>6} {'IOPS':>6} {'us/rq':>5}  {'MB/s':>6} {'':>3}  "
            f"{'guest':>6} {'wall':>6} {'cpu':>6}"]
    for e in summary["rows"]:
        h, qm, c = e["hvf"], e["qemu"], e["host"]
        out.append(
            f"{e['device']:10} {e['row']:16}  {h['bytes_per_s'] / 1e6:6.1f} {h['iops']:6.0f} "
            f"{h['cpu_us_per_request']:5.0f}  {qm['bytes_per_s'] / 1e6:6.1f} {qm['iops']:6.0f} "
            f"{qm['cpu_us_per_request']:5.0f}  {c['bytes_per_s'] / 1e6:6.1f} {'':>3}  "
            f"{e['guest']['ratio']:6.3f} {e['wall']['ratio']:6.3f} {e['cpu']['ratio']:6.3f}"
            f"  {e['verdict']}")
    out += ["", "  us/rq: the VMM's CPU time per request (all threads); split into the vCPU "
            "thread (guest instructions, exits) + the rest (device model, I/O):"]
    for e in summary["rows"]:
        h, qm = e["hvf"], e["qemu"]
        d = e[summary["metric"]]
        out.append(f"    {e['device']} {e['row']}: hvf {h['vcpu_us_per_request']:.0f} + "
                   f"{h['other_us_per_request']:.0f} us, {h['irqs_per_request']:.2f} irq/rq; "
                   f"QEMU {qm['vcpu_us_per_request']:.0f} + {qm['other_us_per_request']:.0f} "
                   f"us, {qm['irqs_per_request']:.2f} irq/rq; run {h['guest_s']:.2f} s / "
                   f"{qm['guest_s']:.2f} s; hvf/QEMU by {summary['metric']} rounds "
                   f"{d['ratio_min']:.3f}-{d['ratio_max']:.3f}")
    out.append(f"  target: hvf/QEMU >= {summary['target']:.2f} on every row "
               f"({summary['metric']} clock)  ->  {summary['verdict']}")
    return "\n".join(out)


def file_system(path: pathlib.Path) -> str:
    """The type of the file system ``path`` is on, from /proc/self/mounts."""
    best, kind = "", "?"
    for line in pathlib.Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        point = fields[1].replace("\\040", " ")
        if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/disk/run.py",
        description="Disk throughput of a test guest, hvf against QEMU, fio as the ceiling.")
    parser.add_argument("--rows", default=DEFAULT_ROWS, metavar="OP:BUF:DEPTH:TOTAL,...",
                        help=f"rows (default {DEFAULT_ROWS})")
    parser.add_argument("--devices", default="virtio-blk,nvme",
                        help="front ends, those whose guest has a bench mode (default "
                        "virtio-blk,nvme)")
    parser.add_argument("--image-mib", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--dir", type=pathlib.Path, default=None,
                        help="where the image goes; not a tmpfs (no O_DIRECT there) "
                        "(default: the temporary folder)")
    parser.add_argument("--ram", choices=("anon", "memfd"), default="anon",
                        help="both VMMs' guest RAM: their default, anonymous memory they back "
                        "with transparent huge pages where they can, or a memfd (default "
                        "anon)")
    parser.add_argument("--aio", choices=("threads", "io_uring"), default="threads",
                        help="hvf's block engine, its disks' aio= (default threads)")
    parser.add_argument("--fio", default="fio", help="the fio binary (default fio)")
    parser.add_argument("--cc", default=os.environ.get("CC", "gcc"),
                        help="C compiler for tsc_hz.c (default $CC or gcc)")
    add_rounds_options(parser, DEFAULT_ROUNDS, "unmeasured runs per device and VMM first "
                       "(default 1)")
    add_qemu_options(parser)
    add_qemu_accel_option(parser)
    add_verdict_options(parser, DEFAULT_TARGET, "PASS when every row's median ratio "
                        "hvf/QEMU is at least this", METRICS, "guest")
    add_output_options(parser)
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.rows)
    except ValueError as e:
        parser.error(f"--rows: {e}")
    wanted = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not wanted or any(d not in DEVICES for d in wanted):
        parser.error(f"--devices: choose from {', '.join(DEVICES)}")
    if args.rounds < 1 or args.warmup < 0 or args.image_mib < 16:
        parser.error("--rounds must be at least 1, --warmup at least 0, --image-mib 16")
    log = Log("disk", args.quiet)
    missing = [f"{d}: {why}; no {d} rows" for d in wanted
               if (why := DEVICES[d].missing()) is not None]
    devices = [DEVICES[d] for d in wanted if DEVICES[d].missing() is None]
    for line in missing:
        log.note(line)

    try:
        if not devices:
            raise BenchError("no device's test guest has a bench mode")
        require_kvm()
        require_hvf()
        fio = find_tool(args.fio, "fio", not args.no_install, log)
        qemu = find_qemu(args.qemu, not args.no_install, log)
        with tempfile.TemporaryDirectory(prefix="hvf-disk-bench-", dir=args.dir) as tmp:
            work = pathlib.Path(tmp)
            fs = file_system(work)
            if fs == "tmpfs":
                raise BenchError(f"{work} is on a tmpfs, which cannot do O_DIRECT; use --dir")
            hz = tsc_hz(work, args.cc)
            elves = {d.name: d.build(work) for d in devices}
            log.note(f"writing a {args.image_mib} MiB image in {work} ({fs})")
            image = make_image(work, args.image_mib)

            def run(cmd: list[str], device: Device, row: Row, what: str) -> dict[str, Any]:
                return measure(run_guest(cmd, device.prefix, what), row, device, hz, what)

            def probe(accel: str) -> str | None:
                device = devices[0]
                try:
                    run(qemu_cmd(qemu, accel, device, elves[device.name], image,
                                 WARMUP, args.ram), device, WARMUP,
                        f"QEMU -accel {accel} probe")
                except BenchError as e:
                    return str(e).splitlines()[0]
                return None

            accel, kvm_failure = choose_qemu_accel(args.qemu_accel, probe)
            runners = {
                "hvf": lambda d, r, w: run(hvf_cmd(d, elves[d.name], image, r, args.ram,
                                                   args.aio), d, r, w),
                "qemu": lambda d, r, w: run(qemu_cmd(qemu, accel, d, elves[d.name],
                                                     image, r, args.ram), d, r, w),
            }
            image_size = args.image_mib << 20
            host = qemu_host_info(qemu)
            host["fio"] = version_line(fio)
            log.note(f"rows {args.rows}; devices {', '.join(d.name for d in devices)}; "
                     f"QEMU -accel {accel}; TSC {hz / 1e6:.1f} MHz; {args.rounds} rounds")
            records = bench(runners, lambda r: ceiling(fio_cmd(fio, image, image_size, r), r),
                            devices, rows, args.rounds, args.warmup, log)
            commands = {d.name: {"hvf": hvf_cmd(d, pathlib.Path(f"{d.guest}.elf"),
                                                pathlib.Path("IMG"), rows[0], args.ram,
                                                args.aio),
                                 "qemu": qemu_cmd(qemu, accel, d, pathlib.Path(f"{d.guest}.elf"),
                                                  pathlib.Path("IMG"), rows[0], args.ram)}
                        for d in devices}
            commands["fio"] = fio_cmd(fio, pathlib.Path("IMG"), image_size, rows[0])
    except (BenchError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
        log.error(e)
        return 2

    config = {"rows": [r.name for r in rows], "rounds": args.rounds, "warmup": args.warmup,
              "image_mib": args.image_mib, "dir": str(args.dir or tempfile.gettempdir()),
              "fs": fs, "tsc_hz": hz, "qemu_accel": accel, "ram": args.ram, "aio": args.aio,
              "qemu_label": f"QEMU ({accel.upper()})", "missing": missing,
              "qemu_kvm_failure": kvm_failure if args.qemu_accel == "auto" else None}
    summary = summarize(records, devices, rows, args.target, args.metric)
    print(report(summary, config, host))
    if args.json:
        write_json(args.json, {"benchmark": "disk", **config, "host": host,
                               "commands": commands, "summary": summary,
                               "per_round": records})
    return 1 if args.strict and summary["verdict"] == "MISS" else 0


if __name__ == "__main__":
    sys.exit(main())
