# SPDX-License-Identifier: BSD-2-Clause
"""Helpers shared by the benchmarks in ``bench/*/run.py``.

Each ``run.py`` runs as a script and puts this folder on ``sys.path`` to import it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
GUEST_BUILD = REPO / "tests" / "guests" / "build.py"


class BenchError(RuntimeError):
    """The benchmark cannot be run, or a run did not do what it should."""


class Log:
    """Progress on stderr (silenced by ``--quiet``) and errors (always)."""

    def __init__(self, prog: str, quiet: bool) -> None:
        self.prog, self.quiet = prog, quiet

    def __call__(self, msg: str) -> None:
        """Write a progress line as it is."""
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        """Write a progress line headed by the benchmark's name."""
        self(f"{self.prog}: {msg}")

    def error(self, msg: object) -> None:
        """Write an error, headed by the benchmark's name, even when quiet."""
        print(f"{self.prog}: {msg}", file=sys.stderr, flush=True)


# ---- setting up ----


def require_kvm() -> None:
    """Raise BenchError unless /dev/kvm can be opened read-write."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not readable and writable")


def require_hvf() -> None:
    """Raise BenchError unless this interpreter can import hvf (it runs ``-m hvf``)."""
    probe = subprocess.run([sys.executable, "-c", "import hvf"], capture_output=True)
    if probe.returncode != 0:
        raise BenchError(
            f"{sys.executable} cannot import hvf; run this with the interpreter that has "
            "hvf installed (.venv/bin/python)"
        )


def build_guest(name: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Build test guest ``name`` (tests/guests) into ``out_dir``; its ``.elf`` path."""
    spec = importlib.util.spec_from_file_location("hvf_guest_build", GUEST_BUILD)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {GUEST_BUILD}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return pathlib.Path(module.build_guest(name, out_dir))
    except module.GuestBuildError as e:
        raise BenchError(f"building the {name} guest: {e}") from None


def find_qemu(name: str, install: bool, log: Log) -> str:
    """The QEMU binary; installs Debian's qemu-system-x86 when missing, root and allowed."""
    found = shutil.which(name)
    if found:
        return found
    how = "install it with `apt-get install -y qemu-system-x86` (as root) or pass --qemu PATH"
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(f"{name} not found; {how}")
    log.note(f"{name} not found, installing qemu-system-x86 with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install_cmd = ["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86"]
    for cmd in (install_cmd, ["apt-get", "update"], install_cmd):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if cmd is install_cmd and done.returncode == 0:
            break
    found = shutil.which(name)
    if not found:
        raise BenchError(f"installing qemu-system-x86 failed; {how}\n{done.stderr[-2000:]}")
    return found


# ---- running ----


def process_cpu_s(pid: int) -> float | None:
    """User + system time so far of process ``pid``, all its threads (KVM accounts guest
    time, and its in-kernel emulation, to the vCPU thread); None once it is gone."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_threads(*targets: Callable[[], object]) -> list[threading.Thread]:
    """Start a daemon thread for each of ``targets`` (readers of a child's pipes)."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def reap(proc: subprocess.Popen[bytes], readers: list[threading.Thread]) -> int | None:
    """Kill ``proc`` if it still runs, wait for it and its pipe readers, close its pipes;
    returns its exit status if it had exited by itself, else None."""
    exited = proc.poll()
    if exited is None:
        proc.kill()
    proc.wait()
    for t in readers:
        t.join(10)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    return exited


# ---- reporting ----


def ratio_stats(ratios: list[float]) -> dict[str, float]:
    """Median, least and greatest of per-round ratios."""
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def host_info(**extra: Any) -> dict[str, Any]:
    """The host: kernel, KVM module, CPU, Python; then ``extra``."""
    cpu = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kvm = next(
        (m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.exists(f"/sys/module/{m}")),
        "unknown",
    )
    return {
        "kernel": platform.release(), "kvm_module": kvm, "cpu": cpu, "cpus": os.cpu_count(),
        "python": platform.python_version(), "python_executable": sys.executable, **extra,
    }


def qemu_host_info(qemu: str) -> dict[str, Any]:
    """host_info with QEMU's version and path and the load average."""
    return host_info(qemu=version_line(qemu), qemu_path=qemu,
                     loadavg=" ".join(f"{x:.2f}" for x in os.getloadavg()))


def version_line(tool: str) -> str:
    """The first line of ``tool --version``; empty if that fails."""
    try:
        return subprocess.run([tool, "--version"], capture_output=True,
                              text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return ""


def write_json(path: pathlib.Path, doc: dict[str, Any], indent: int = 2) -> None:
    """Write ``doc`` to ``path`` (its folder created if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent) + "\n")


# ---- command line ----


def add_rounds_options(parser: argparse.ArgumentParser, rounds: int,
                       warmup_help: str = "unmeasured rounds first (default 1)") -> None:
    """--rounds and --warmup."""
    parser.add_argument("--rounds", type=int, default=rounds,
                        help=f"measured rounds (default {rounds})")
    parser.add_argument("--warmup", type=int, default=1, help=warmup_help)


def add_verdict_options(parser: argparse.ArgumentParser, target: float, target_help: str,
                        metrics: tuple[str, ...], metric: str) -> None:
    """--target (``target_help`` is followed by the default) and --metric."""
    parser.add_argument("--target", type=float, default=target,
                        help=f"{target_help} (default {target})")
    parser.add_argument("--metric", choices=metrics, default=metric,
                        help=f"the clock the verdict uses (default {metric}; both are "
                        "reported)")


def add_qemu_options(parser: argparse.ArgumentParser) -> None:
    """--qemu and --no-install."""
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install qemu-system-x86 when QEMU is missing")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json, --strict and -q/--quiet."""
    parser.add_argument("--json", metavar="PATH", type=pathlib.Path,
                        help="also write the results as JSON to PATH")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 on MISS (default: 0 for PASS and MISS)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
