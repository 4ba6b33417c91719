# SPDX-License-Identifier: BSD-2-Clause
"""bench/disk's pieces: the rows, the two VMMs' disk options, one timed guest run, and
the host's own rate (fio) for the same file.

A run boots the test guest with ``bench=OP buf=B depth=D n=SECTORS`` and reads its
debug console (stdout) line by line, timestamping each line and sampling the VMM's CPU
time per thread (``/proc/PID/task/*/stat``) when ``… bench go`` and ``… bench end``
arrive. The guest prints the TSC cycles between its first submission and its last
completion, which :func:`tsc_hz` turns into seconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time
from typing import Any

import attrs
from common import (
    REPO,
    BenchError,
    build_guest,
    hvf_command,
    process_cpu_s,
    qemu_command,
    reap,
    start_threads,
    thread_cpu,
)

MEMORY_MIB = 256
SLOT = 3
SECTOR = 512
SERIAL = "hvfbench"
RUN_TIMEOUT = 180.0
HERE = pathlib.Path(__file__).resolve().parent
GUESTS = REPO / "tests" / "guests"


@attrs.frozen
class Row:
    """One line of the report: ``op`` (seqread, seqwrite, randread) in requests of
    ``buf`` bytes, ``depth`` in flight, ``total`` bytes per run."""

    op: str
    buf: int
    depth: int
    total: int

    @property
    def name(self) -> str:
        return f"{self.op} {size_label(self.buf)} qd{self.depth}"

    @property
    def requests(self) -> int:
        return self.total // self.buf

    def append(self) -> str:
        return f"bench={self.op} buf={self.buf} depth={self.depth} n={self.total // SECTOR}"


@attrs.frozen
class Device:
    """A disk front end on both VMMs, and the test guest that drives it (whose lines
    begin with ``prefix``): ``tests/guests/GUEST.c``, or with ``includes`` (the test
    guests it includes) ``bench/disk/GUEST.c``."""

    name: str
    guest: str
    prefix: str
    includes: tuple[str, ...] = ()

    def source(self) -> pathlib.Path:
        return (HERE if self.includes else GUESTS) / f"{self.guest}.c"

    def build(self, out: pathlib.Path) -> pathlib.Path:
        """The guest's ELF, built into ``out``."""
        if not self.includes:
            return build_guest(self.guest, out)
        from hvf.testing.guests import GuestBuildError
        from hvf.testing.guests import build_guest as build_source
        try:
            return build_source(self.source(), out,
                                depends=[GUESTS / name for name in self.includes])
        except GuestBuildError as e:
            raise BenchError(f"building {self.source()}: {e}") from None

    def missing(self) -> str | None:
        """Why this device's guest cannot be built here, or None."""
        for path in (self.source(), *(GUESTS / name for name in self.includes)):
            if not path.exists():
                return f"{path.relative_to(REPO)} is missing"
        if "bench=" not in self.source().read_text():
            return f"{self.source().relative_to(REPO)} has no bench= mode"
        return None

    def hvf_args(self, image: pathlib.Path, aio: str = "threads") -> list[str]:
        return ["-s", f"{SLOT},{self.name},{image},nocache,aio={aio}"]

    def qemu_args(self, image: pathlib.Path) -> list[str]:
        drive = f"file={image},if=none,id=d0,format=raw,cache=none,aio=threads"
        # mdts=9: requests of up to 2 MiB, as hvf's NVMe takes (QEMU's default is 512 KiB).
        device = ("virtio-blk-pci,drive=d0,disable-legacy=on" if self.name == "virtio-blk"
                  else f"nvme,drive=d0,serial={SERIAL},mdts=9")
        return ["-drive", drive, "-device", device]


DEVICES = {
    "virtio-blk": Device("virtio-blk", "virtio_blk", "blk"),
    "nvme": Device("nvme", "nvme_bench", "nvme", ("nvme_disk.c",)),
}


def size_label(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    """``4K``, ``1M``, ``512M``, ``1G`` or a number of bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse_rows(text: str) -> list[Row]:
    """``OP:BUF:DEPTH:TOTAL,...`` (sizes with K/M/G)."""
    rows = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 4 or parts[0] not in ("seqread", "seqwrite", "randread"):
            raise ValueError(f"{item!r} is not OP:BUF:DEPTH:TOTAL with OP seqread, "
                             "seqwrite or randread")
        buf, depth, total = parse_size(parts[1]), int(parts[2]), parse_size(parts[3])
        if buf < SECTOR or buf % SECTOR or buf > 1 << 20 or not 1 <= depth <= 32:
            raise ValueError(f"{item!r}: BUF must be whole sectors up to 1M, DEPTH 1-32")
        if total % buf or total // buf < depth or total // SECTOR >= 1 << 32:
            raise ValueError(f"{item!r}: TOTAL must be a multiple of BUF, at least DEPTH "
                             "requests, below 2 TiB")
        rows.append(Row(parts[0], buf, depth, total))
    return rows


# ---- the host's TSC and the VMM's threads ----


def tsc_hz(work: pathlib.Path, cc: str) -> float:
    """The TSC rate, measured by tsc_hz.c (built with ``cc``)."""
    exe = work / "tsc_hz"
    try:
        subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "tsc_hz.c")], check=True,
                       capture_output=True, text=True)
    except FileNotFoundError:
        raise BenchError(f"C compiler {cc!r} not found (tsc_hz.c needs one)") from None
    except subprocess.CalledProcessError as e:
        raise BenchError(f"building tsc_hz.c failed:\n{e.stderr}") from None
    return float(subprocess.run([str(exe)], check=True, capture_output=True,
                                text=True).stdout)


KVM_RUN = 0xAE80
IOCTL = 16  # x86-64


def process_threads_cpu(pid: int) -> dict[int, float]:
    """:func:`common.thread_cpu` for each live thread of ``pid``, and the whole
    process, threads that have ended included (user + system time, in clock ticks),
    as ``0``. On kvm_pvm the guest's emulated instructions are the vCPU thread's
    system time."""
    return {0: process_cpu_s(pid) or 0.0, **thread_cpu(pid)}


def vcpu_thread(pid: int) -> int | None:
    """The id of a thread of ``pid`` that is inside ``ioctl(KVM_RUN)`` now, if any
    (not KVM's own kernel threads, such as ``kvm-nx-lpage-recovery``, which show in
    the process's task list)."""
    for task in _tasks(pid):
        try:
            if (task / "comm").read_text().startswith("kvm-"):
                continue
            fields = (task / "syscall").read_text().split()
        except OSError:
            continue
        if len(fields) > 2 and fields[0] == str(IOCTL) and int(fields[2], 16) == KVM_RUN:
            return int(task.name)
    return None


def _tasks(pid: int) -> list[pathlib.Path]:
    try:
        return list(pathlib.Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


@attrs.define
class GuestRun:
    """One VMM run as the benchmark saw it (times from ``time.perf_counter()``)."""

    lines: list[tuple[float, str]]
    cpu: dict[str, dict[int, float]]  #: per-thread CPU time when go / end arrived
    vcpu: int | None  #: the vCPU thread's id
    returncode: int
    stderr: str

    def at(self, text: str) -> float | None:
        return next((t for t, line in self.lines if line == text), None)


def run_guest(cmd: list[str], prefix: str, what: str,
              timeout: float = RUN_TIMEOUT) -> GuestRun:
    """Run one VMM until it exits; sample its threads' CPU times when ``PREFIX bench
    go`` and ``PREFIX bench end`` arrive, and find its vCPU thread meanwhile."""
    marks = {f"{prefix} bench go": "go", f"{prefix} bench end": "end"}
    lines: list[tuple[float, str]] = []
    cpu: dict[str, dict[int, float]] = {}
    vcpu: list[int] = []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def read_stdout() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            now = time.perf_counter()
            line = raw.decode(errors="replace").rstrip("\n")
            if line in marks and marks[line] not in cpu:
                cpu[marks[line]] = process_threads_cpu(proc.pid)
            lines.append((now, line))

    def find_vcpu() -> None:
        while not vcpu and proc.poll() is None:
            if (tid := vcpu_thread(proc.pid)) is not None:
                vcpu.append(tid)
            time.sleep(0.002)

    errors: list[bytes] = []
    readers = start_threads(read_stdout, find_vcpu,
                            lambda: errors.append(proc.stderr.read()))  # type: ignore[union-attr]
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: did not finish within {timeout:.0f} s; stdout ended "
                         f"{[line for _, line in lines][-4:]}") from None
    finally:
        reap(proc, readers)
    return GuestRun(lines, cpu, vcpu[0] if vcpu else None, proc.returncode,
                    b"".join(errors).decode(errors="replace"))


# ---- one measured run ----


def measure(run: GuestRun, row: Row, device: Device, hz: float, what: str) -> dict[str, Any]:
    """The figures of one run, after checking that the guest did the whole row."""
    stats = f"{device.prefix} bench {row.op} {row.requests} requests {row.total // SECTOR} sectors tsc "
    found = next((line for _, line in run.lines if line.startswith(stats)), None)
    go, end = run.at(f"{device.prefix} bench go"), run.at(f"{device.prefix} bench end")
    if (run.returncode != 1 or found is None or go is None or end is None
            or run.at(f"{device.prefix} done") is None or set(run.cpu) != {"go", "end"}):
        stdout = [line for _, line in run.lines if line.startswith(device.prefix)]
        raise BenchError(f"{what}: the guest did not finish the row (exit status "
                         f"{run.returncode}, want 1)\nstdout: {stdout[-8:]}\n"
                         f"stderr: {run.stderr[-2000:]}")
    tsc, _, irqs = found[len(stats):].partition(" irqs ")
    guest_s = int(tsc, 16) / hz
    wall_s = end - go
    before, after = run.cpu["go"], run.cpu["end"]
    cpu_s = after[0] - before[0]
    grown = {tid: t - before.get(tid, 0.0) for tid, t in after.items() if tid}
    # Not seen inside KVM_RUN (a busy host may starve the sampler): the busiest thread.
    vcpu = run.vcpu if run.vcpu in grown else max(grown, key=grown.__getitem__, default=0)
    vcpu_s = grown.get(vcpu, 0.0)
    n = row.requests
    return {
        "guest_s": guest_s, "wall_s": wall_s, "cpu_s": cpu_s,
        "bytes_per_s": row.total / guest_s, "iops": n / guest_s,
        "wall_bytes_per_s": row.total / wall_s,
        "bytes_per_cpu_s": row.total / cpu_s if cpu_s else float("inf"),
        "cpu_us_per_request": cpu_s / n * 1e6,
        "vcpu_us_per_request": vcpu_s / n * 1e6,
        "other_us_per_request": (cpu_s - vcpu_s) / n * 1e6,
        # The guest's span lies inside go..end; more means its TSC is not the host's.
        "tsc_excess_s": guest_s - wall_s,
        "irqs_per_request": int(irqs or 0) / n,
        "startup_s": go - run.lines[0][0] if run.lines else 0.0,
    }


def hvf_cmd(device: Device, elf: pathlib.Path, image: pathlib.Path, row: Row,
            ram: str = "anon", aio: str = "threads") -> list[str]:
    cmd = hvf_command(MEMORY_MIB, elf, row.append(),
                      [*HVF_RAM[ram], *device.hvf_args(image, aio)])
    return [*cmd[:-1], f"bench-disk-{os.getpid()}"]  # a VM name no other benchmark uses


#: Guest RAM: each VMM's default (anonymous memory, which both ask to back with
#: transparent huge pages) or a memfd (hvf's for ``migrate --local`` and vhost-user).
HVF_RAM = {"anon": [], "memfd": ["-o", "memory.shared=true"]}
QEMU_RAM = {
    "anon": [],
    "memfd": ["-object", f"memory-backend-memfd,id=ram0,size={MEMORY_MIB}M",
              "-machine", "memory-backend=ram0"],
}


def qemu_cmd(qemu: str, accel: str, device: Device, elf: pathlib.Path,
             image: pathlib.Path, row: Row, ram: str = "anon") -> list[str]:
    return qemu_command(qemu, accel, MEMORY_MIB, elf, row.append(),
                        [*QEMU_RAM[ram], *device.qemu_args(image)])


# ---- the host's own rate ----


def fio_cmd(fio: str, image: pathlib.Path, image_size: int, row: Row) -> list[str]:
    rw = {"seqread": "read", "seqwrite": "write", "randread": "randread"}[row.op]
    return [fio, "--name=ceiling", f"--filename={image}", "--direct=1", "--ioengine=libaio",
            f"--iodepth={row.depth}", f"--rw={rw}", f"--bs={row.buf}",
            f"--size={image_size}", f"--io_size={row.total}", "--norandommap",
            "--randrepeat=0", "--output-format=json"]


def ceiling(cmd: list[str], row: Row) -> dict[str, Any]:
    """fio's rate for ``row`` on the image."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    try:
        job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]
        side = job["write" if row.op == "seqwrite" else "read"]
        rate, iops = float(side["bw_bytes"]), float(side["iops"])
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio failed (exit status {done.returncode}): "
                         f"{(done.stderr or done.stdout)[-1000:]}") from None
    return {"bytes_per_s": rate, "iops": iops}
