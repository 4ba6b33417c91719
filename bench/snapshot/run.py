# SPDX-License-Identifier: BSD-2-Clause
"""bench/snapshot: how long hvf takes to save a running VM and to restore one.

For each guest size (default 256 MiB, 1 GiB and 4 GiB) a ``counter`` guest
(tests/guests, ``every=1``: a COM1 line every PIT tick) runs, in two states of its RAM:

- ``clean``: as the guest left it (a few hundred KiB of data; the rest was never
  touched, so guest RAM holds no pages there);
- ``dirty``: the benchmark also fills ``--dirty`` of guest RAM (default a quarter),
  above 64 MiB where the guest never looks, with random bytes in randomly placed
  2 MiB clusters. It writes them through ``/proc/PID/mem`` at hvf's guest-RAM mapping
  (same uid), because the test guest cannot dirty gigabytes itself on this host.

**Save.** ``checkpoint`` to a new snapshot directory (the VM keeps running), sent on
the control socket exactly as ``hvf ctl checkpoint`` sends it; timed at the client
from sending the request to the reply, with the reply's own ``seconds`` (pause to
resume, measured inside hvf) beside it. One ``hvf ctl checkpoint`` command is also
timed whole (it adds the client's Python start-up). **Baseline**: the RAM file that
save wrote, copied with ``cp --sparse=always SRC DST && sync DST`` (one ``sh -c``;
``sync FILE`` fsyncs that file), as hvf fsyncs what it writes. Before each timed save
or copy the previous output is deleted and ``sync`` run, so neither pays for the other's
deferred work, and before each copy the source's data is read once, so that ``cp``
reads it from the page cache as hvf reads guest RAM from memory (hvf writes with
``O_DIRECT``, which leaves nothing of the file cached). **Target: save ≤ 1.5 × the copy** (medians), judged on the rows with at
least 16 MiB of data (with less, both take a few milliseconds and the ratio is noise).

**Restore.** ``hvf -r SNAPSHOT -l com1,file=OUT NAME`` through ``timed_hvf.py``, which
runs hvf's own ``main`` and notes (CLOCK_MONOTONIC) when the restore starts and ends
and when the vCPU threads have started. Reported: from ``Popen`` to the VM answering
``status`` with ``running`` on its control socket (polled every 2 ms), to the first
new COM1 byte, and the part inside hvf: from the start of the restore (snapshot
opened) to the vCPUs started (state file read and checked, RAM mapped copy-on-write,
machine built, every chunk loaded). The rest of the end-to-end time is Python's
start-up, hvf's imports and plugin loading. **Target: the in-hvf restore ≤ 50 ms and
nearly flat in guest size** (the 4 GiB median at most 1.5× the 256 MiB one + 5 ms).

**Save of a restored VM.** One ``checkpoint`` of the last restored VM: its RAM is the
snapshot's file mapped copy-on-write, so the save reads the file's data extents and the
pages the guest has written since (reported, no target).

    python bench/snapshot/run.py [--sizes 256M,1G,4G] [--rounds 3] [--dirty 0.25]
                                 [--dir DIR] [--json PATH] [--no-restored-save]

Run it from the repository root with the interpreter that has hvf installed.
Snapshots go to a temporary directory under ``--dir`` (default: the system's temporary
directory; its file system is what the save and the copy are measured on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/, for common
from common import (
    BenchError,
    Log,
    add_output_options,
    build_guest,
    require_kvm,
    write_json,
)

TIMED_HVF = HERE / "timed_hvf.py"
MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev")
MiB = 1 << 20
CLUSTER = 2 * MiB
DIRTY_FLOOR = 64 * MiB
SAVE_TARGET = 1.5
RESTORE_TARGET_MS = 50.0
#: Rows with less saved data than this are not judged against the copy.
JUDGE_DATA = 16 * MiB
WAIT = 120.0


def parse_size(text: str) -> int:
    units = {"M": 20, "G": 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1:] in units:
        return int(text[:-1]) << units[text[-1]]
    return int(text) << 20


def size_name(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 and n % (1 << 30) == 0 else f"{n >> 20} MiB"


# ---- the control socket, without hvf's client (so the benchmark times one thing) ----


def connect(path: Path, timeout: float) -> tuple[socket.socket, Any, dict[str, Any]] | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        reader = s.makefile("rb")
        greeting = json.loads(reader.readline() or b"null")
    except (OSError, ValueError):
        s.close()
        return None
    if not isinstance(greeting, dict) or "hvf" not in greeting:
        s.close()
        return None
    return s, reader, greeting


def call(sock: Path, command: str, timeout: float = 600, timing: list[float] | None = None,
         **args: Any) -> dict[str, Any]:
    """Run one command on a new connection; ``timing`` gets the seconds from sending the
    request to the reply (the connection and greeting not included)."""
    conn = connect(sock, timeout)
    if conn is None:
        raise BenchError(f"no VM answers on {sock}")
    s, reader, _ = conn
    with s, reader:
        t0 = time.monotonic()
        s.sendall(json.dumps({"id": 1, "command": command, "args": args}).encode() + b"\n")
        reply = json.loads(reader.readline())
        if timing is not None:
            timing.append(time.monotonic() - t0)
    if "error" in reply:
        raise BenchError(f"{command}: {reply['error']}")
    result: dict[str, Any] = reply["return"]
    return result


# ---- hvf processes ----


class Vm:
    def __init__(self, argv: list[str], name: str, work: Path, env: dict[str, str],
                 tag: str) -> None:
        self.name = name
        self.sock = Path(env["HVF_RUNTIME_DIR"]) / f"{name}.sock"
        self.err_path = work / f"{tag}.stderr"
        with open(self.err_path, "wb") as err:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=env)

    def fail(self, why: str) -> BenchError:
        self.kill()
        return BenchError(f"{self.name}: {why}; stderr: {self.err_path.read_text()[-2000:]}")

    def wait_running(self, com1: Path | None = None) -> dict[str, float]:
        """Poll until the VM says it runs (and COM1 grows); seconds from Popen."""
        got: dict[str, float] = {}
        base = com1.stat().st_size if com1 is not None and com1.exists() else 0
        deadline = self.started + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"exited with {self.proc.returncode}")
            if "status" not in got and self.sock.exists():
                try:
                    if call(self.sock, "status", timeout=5).get("state") == "running":
                        got["status"] = time.monotonic() - self.started
                except (BenchError, OSError, ValueError):
                    pass
            if com1 is not None and "output" not in got:
                try:
                    if com1.stat().st_size > base:
                        got["output"] = time.monotonic() - self.started
                except FileNotFoundError:
                    pass
            if "status" in got and (com1 is None or "output" in got):
                return got
            time.sleep(0.002)
        raise self.fail("did not come up")

    def poweroff(self) -> None:
        try:
            call(self.sock, "poweroff", timeout=10)
            self.proc.wait(30)
        except (BenchError, OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def guest_ram_of(pid: int, size: int) -> int:
    """The address of process ``pid``'s guest-RAM mapping: the one ``size`` bytes long
    (guest RAM is one mapping laid out as its RAM file, see hvf.memory)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if end - start == size:
            return start
    raise BenchError(f"no {size}-byte guest-RAM mapping in process {pid}")


def dirty(pid: int, size: int, fraction: float, seed: int) -> int:
    """Fill ``fraction`` of the guest's RAM above 64 MiB with random 2 MiB clusters."""
    rng = random.Random(seed)
    clusters = list(range(DIRTY_FLOOR // CLUSTER, size // CLUSTER))
    chosen = sorted(rng.sample(clusters, min(len(clusters), int(size * fraction) // CLUSTER)))
    pool = os.urandom(64 * MiB)
    base = guest_ram_of(pid, size)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        for i, c in enumerate(chosen):
            off = (i * CLUSTER * 7 + rng.randrange(0, 1024) * 4096) % (len(pool) - CLUSTER)
            os.pwrite(fd, pool[off:off + CLUSTER], base + c * CLUSTER)
    finally:
        os.close(fd)
    return len(chosen) * CLUSTER


def read_data(path: Path) -> None:
    """Read a sparse file's data once (into the page cache), skipping its holes."""
    from hvf.extents import file_extents

    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in file_extents(fd, os.fstat(fd).st_size):
            while start < end:
                start += len(os.pread(fd, min(8 * MiB, end - start), start)) or end
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def ram_file(snap: Path) -> Path:
    (ram,) = [p for p in snap.iterdir() if p.name.startswith("ram-")]
    return ram


def state_info(snap: Path) -> dict[str, Any]:
    from hvf.plugins.snapshot.statefile import read_state

    st = read_state(snap / "state")
    return {"data_bytes": st.ram.get("data_bytes", 0), "state_bytes": (snap / "state").stat().st_size}


# ---- one guest size, one RAM state ----


def bench_case(guest: Path, size: int, dirty_fraction: float, rounds: int, work: Path,
               env: dict[str, str], restored_save: bool, log: Log) -> dict[str, Any]:
    kind = "dirty" if dirty_fraction else "clean"
    tag = f"{size >> 20}m-{kind}"
    case: dict[str, Any] = {"size": size, "ram": kind, "dirty_fraction": dirty_fraction}
    com1 = work / f"{tag}.com1"
    name = f"bench-{tag}"
    vm = Vm([sys.executable, "-m", "hvf", "-m", f"{size >> 20}M", *MACHINE, "-l",
             f"com1,file={com1}", "--kernel", str(guest), "--append", "every=1", name],
            name, work, env, tag)
    try:
        vm.wait_running(com1)
        if dirty_fraction:
            t0 = time.monotonic()
            case["dirtied_bytes"] = dirty(vm.proc.pid, size, dirty_fraction, seed=size)
            log.note(f"{tag}: wrote {case['dirtied_bytes'] >> 20} MiB into guest RAM "
                     f"in {time.monotonic() - t0:.1f} s")

        saves, inside = [], []
        snap = work / f"{tag}.snap"
        for i in range(rounds):
            remove(snap)
            reply = call(vm.sock, "checkpoint", timing=saves, path=str(snap))
            inside.append(float(reply["seconds"]))
            log.note(f"{tag}: save {i + 1}/{rounds}: {saves[-1]:.3f} s")
        case.update(state_info(snap))
        case["save_s"], case["save_reply_s"] = saves, inside

        copies = []
        dst = work / f"{tag}.copy"
        for i in range(rounds):
            remove(dst)
            read_data(ram_file(snap))
            t0 = time.monotonic()
            subprocess.run(["sh", "-c", 'cp --sparse=always "$1" "$2" && sync "$2"', "sh",
                            str(ram_file(snap)), str(dst)], check=True)
            copies.append(time.monotonic() - t0)
            log.note(f"{tag}: cp+sync {i + 1}/{rounds}: {copies[-1]:.3f} s")
        case["copy_s"] = copies
        case["copy_allocated"] = dst.stat().st_blocks * 512
        remove(dst)

        cli_snap = work / f"{tag}.cli"
        remove(cli_snap)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "hvf", "ctl", "--vm", name, "checkpoint",
                            str(cli_snap)], env=env, capture_output=True, text=True)
        case["ctl_command_s"] = time.monotonic() - t0
        if r.returncode != 0:
            raise BenchError(f"hvf ctl checkpoint failed: {r.stderr}")
        remove(cli_snap)
    finally:
        vm.poweroff()

    restores: list[dict[str, float]] = []
    last: Vm | None = None
    for i in range(rounds):
        marks_path = work / f"{tag}.marks{i}"
        out = work / f"{tag}.com1-r{i}"
        rname = f"{name}-r{i}"
        rvm = Vm([sys.executable, str(TIMED_HVF), "-r", str(snap), "-l", f"com1,file={out}",
                  rname], rname, work, {**env, "HVF_BENCH_MARKS": str(marks_path)}, f"{tag}-r{i}")
        try:
            got = rvm.wait_running(out)
            deadline = time.monotonic() + 10  # "running" is answered just before the
            while not marks_path.exists() and time.monotonic() < deadline:  # vCPUs start
                time.sleep(0.005)
            marks = json.loads(marks_path.read_text())
            got.update({
                "python_start": marks["exec"] - rvm.started,
                "startup": marks["restore_start"] - rvm.started,
                "restore": marks["restore_end"] - marks["restore_start"],
                "in_hvf": marks["vcpus_started"] - marks["restore_start"],
                "running": marks["vcpus_started"] - rvm.started,
                **{k: v for k, v in marks.items() if k.startswith("t_")},
            })
            restores.append(got)
            log.note(f"{tag}: restore {i + 1}/{rounds}: in hvf {got['in_hvf'] * 1e3:.1f} ms, "
                     f"status {got['status'] * 1e3:.0f} ms")
        finally:
            if i < rounds - 1 or not restored_save:
                rvm.poweroff()
            else:
                last = rvm
    case["restore"] = restores
    if last is not None:
        try:
            rsnap = work / f"{tag}.rsave"
            remove(rsnap)
            t0 = time.monotonic()
            call(last.sock, "checkpoint", timeout=3600, path=str(rsnap))
            case["restored_save_s"] = time.monotonic() - t0
            log.note(f"{tag}: save of a restored VM: {case['restored_save_s']:.2f} s")
            remove(rsnap)
        finally:
            last.poweroff()
    remove(snap)
    return case


# ---- summary and report ----


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    rows = []
    for c in cases:
        r = c["restore"]
        rows.append({
            "size": c["size"], "ram": c["ram"], "data_bytes": c["data_bytes"],
            "save_ms": med(c["save_s"]) * 1e3, "save_reply_ms": med(c["save_reply_s"]) * 1e3,
            "copy_ms": med(c["copy_s"]) * 1e3,
            "ratio": med(c["save_s"]) / med(c["copy_s"]),
            "ctl_command_ms": c["ctl_command_s"] * 1e3,
            "restore_in_hvf_ms": med([x["in_hvf"] for x in r]) * 1e3,
            "restore_load_ms": med([x["restore"] for x in r]) * 1e3,
            "restore_status_ms": med([x["status"] for x in r]) * 1e3,
            "restore_output_ms": med([x["output"] for x in r]) * 1e3,
            "startup_ms": med([x["startup"] for x in r]) * 1e3,
            "restore_steps_ms": {k: med([x.get(k, 0.0) for x in r]) * 1e3 for k in (
                "t_load_state", "t_open_ram", "t_machine_init", "t_build", "t_restore_chunks")},
            "restored_save_s": c.get("restored_save_s"),
        })
    # With almost no data both sides take a few ms and the ratio is noise: judged only
    # where there is data to write.
    judged = [r for r in rows if r["data_bytes"] >= JUDGE_DATA]
    save_ok = bool(judged) and all(r["ratio"] <= SAVE_TARGET for r in judged)
    restore_ok = all(r["restore_in_hvf_ms"] <= RESTORE_TARGET_MS for r in rows)
    flat = []
    for kind in ("clean", "dirty"):
        sel = sorted((r for r in rows if r["ram"] == kind), key=lambda r: r["size"])
        if len(sel) >= 2:
            small, big = sel[0]["restore_in_hvf_ms"], sel[-1]["restore_in_hvf_ms"]
            flat.append(big <= 1.5 * small + 5)
    return {"rows": rows, "save_verdict": "PASS" if save_ok else "MISS",
            "restore_verdict": "PASS" if restore_ok and all(flat) else "MISS",
            "restore_flat": all(flat)}


def host_info(work: Path) -> dict[str, Any]:
    fs = subprocess.run(["df", "-T", str(work)], capture_output=True, text=True).stdout
    kvm = "kvm_pvm" if Path("/sys/module/kvm_pvm").exists() else "kvm"
    return {"kernel": platform.release(), "kvm": kvm, "cpus": os.cpu_count(),
            "loadavg": os.getloadavg()[0],
            "python": platform.python_version(),
            "filesystem": fs.splitlines()[-1].split()[1] if fs else "?", "dir": str(work)}


def report(summary: dict[str, Any], host: dict[str, Any], rounds: int) -> str:
    out = [f"hvf snapshot benchmark: guest tests/guests/counter (every=1); {rounds} rounds, "
           f"medians",
           f"host: Linux {host['kernel']} ({host['kvm']}), {host['cpus']} CPUs, "
           f"load {host['loadavg']:.1f}, Python {host['python']}; snapshots on {host['filesystem']} ({host['dir']})",
           "",
           "                   |               save (checkpoint)                |"
           "            restore (hvf -r)             | restored",
           "size    RAM    data| client  in-hvf  cp+sync  save/cp  ctl-cmd |"
           " in-hvf  (load)  status  COM1   startup | VM save",
           "                MiB|     ms      ms       ms               ms |"
           "     ms      ms      ms    ms        ms |       s"]
    for r in summary["rows"]:
        rs = f"{r['restored_save_s']:7.2f}" if r["restored_save_s"] is not None else "      -"
        out.append(
            f"{size_name(r['size']):>7} {r['ram']:<5} {r['data_bytes'] / MiB:5.0f}|"
            f"{r['save_ms']:7.0f} {r['save_reply_ms']:7.0f} {r['copy_ms']:8.0f} "
            f"{r['ratio']:8.2f} {r['ctl_command_ms']:8.0f} |"
            f"{r['restore_in_hvf_ms']:7.1f} {r['restore_load_ms']:7.1f} "
            f"{r['restore_status_ms']:7.0f} {r['restore_output_ms']:5.0f} "
            f"{r['startup_ms']:9.0f} | {rs}")
    out += ["", "restore steps inside hvf (ms): read+check snapshot / open RAM file / "
            "KVM VM+RAM+vCPUs / build devices / load chunks"]
    for r in summary["rows"]:
        st = r["restore_steps_ms"]
        out.append(f"{size_name(r['size']):>7} {r['ram']:<5}  " + " / ".join(
            f"{st[k]:.1f}" for k in ("t_load_state", "t_open_ram", "t_machine_init", "t_build",
                                     "t_restore_chunks")))
    out += ["",
            "client: request to reply on the control socket; in-hvf: the reply's 'seconds'; "
            "cp+sync: cp --sparse=always of the saved RAM file + sync FILE;",
            "ctl-cmd: a whole 'hvf ctl checkpoint' command; restore in-hvf: restore start to "
            "vCPUs started ((load): to the machine restored);",
            "status / COM1: from Popen to 'running' on the control socket / to the first new "
            "COM1 byte; startup: Popen to the restore's start (Python, imports, plugins).",
            "",
            f"save:    target client time <= {SAVE_TARGET} x cp+sync for every row with at "
            f"least {JUDGE_DATA >> 20} MiB of data: {summary['save_verdict']}",
            f"restore: target in-hvf <= {RESTORE_TARGET_MS:.0f} ms for every row and flat in "
            f"size (largest <= 1.5 x smallest + 5 ms): {summary['restore_verdict']}"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256M,1G,4G")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dirty", type=float, default=0.25,
                   help="fraction of guest RAM to fill for the dirty case (0: skip it)")
    p.add_argument("--dir", default=None, help="where snapshots are written")
    p.add_argument("--no-restored-save", action="store_true")
    add_output_options(p)
    args = p.parse_args(argv)
    log = Log("snapshot bench", args.quiet)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    try:
        require_kvm()
    except BenchError as e:
        log.error(e)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="hvf-snapbench-", dir=args.dir))
    try:
        guest = build_guest("counter", tmp / "guests")
        env = {**os.environ, "HVF_RUNTIME_DIR": str(tmp / "run")}
        cases = []
        for fraction in ([0.0, args.dirty] if args.dirty else [0.0]):
            for size in sizes:
                cases.append(bench_case(guest, size, fraction, args.rounds, tmp, env,
                                        not args.no_restored_save, log))
        host = host_info(tmp)
        summary = summarize(cases)
        sys.stdout.write(report(summary, host, args.rounds))
        if args.json:
            write_json(args.json, {"host": host, "rounds": args.rounds, "summary": summary,
                                   "cases": cases}, indent=1)
    except (BenchError, subprocess.CalledProcessError, OSError) as e:
        log.error(e)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verdicts = (summary["save_verdict"], summary["restore_verdict"])
    return 1 if args.strict and "MISS" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
