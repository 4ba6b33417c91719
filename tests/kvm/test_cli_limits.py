# SPDX-License-Identifier: BSD-2-Clause
"""Command lines that reach the machine (issue 14): limits the host sets (KVM's vCPU
count, guest RAM, console ports, kernel files) refused with exit 4 and a message, never
a traceback; ``-p`` pins vCPU threads, seen in /proc."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BASE_ARGS, popen_hvf, run_guest, run_hvf, stop, wait_for_text

pytestmark = pytest.mark.kvm


def refused(args: list[str], *, preexec: bool = False) -> str:
    """hvf's stderr for ``args``, which must exit 4 without a traceback."""
    def limit_memory() -> None:  # a regression must not eat the host's memory
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))

    r = subprocess.run([sys.executable, "-m", "hvf", *args, "vm"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL,
                       preexec_fn=limit_memory if preexec else None)
    assert r.returncode == 4, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_guest_memory_the_host_cannot_map(guests: dict[str, Path]) -> None:
    err = refused(["-m", "1000000G", *BASE_ARGS, "--kernel", str(guests["hello"])])
    assert "-m: cannot map 976.6 TiB of guest memory" in err


def test_tcp_console_port_out_of_range(guests: dict[str, Path]) -> None:
    err = refused([*BASE_ARGS, "-l", "com1,tcp=127.0.0.1:99999", "--kernel",
                   str(guests["hello"])])
    assert "port 99999 is out of range (0 to 65535)" in err


@pytest.mark.parametrize("what", ["--kernel", "--initrd"])
def test_character_device_as_kernel_or_initrd(guests: dict[str, Path], what: str) -> None:
    args = [*BASE_ARGS, "--kernel", "/dev/zero"] if what == "--kernel" else \
        [*BASE_ARGS, "--kernel", str(guests["hello"]), "--initrd", "/dev/zero"]
    err = refused(args, preexec=True)
    assert "'/dev/zero' is a character device, not a file" in err


def _pinned_threads(pid: int) -> dict[str, int]:
    """Cpus_allowed_list → how many of the process's threads have it. KVM's own workers
    in the process (``kvm-nx-lpage-recovery``, started by the first KVM_RUN and so
    inheriting vCPU 0's affinity) are left out."""
    counts: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().startswith("kvm-"):
            continue
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus = line.split()[1]
                counts[cpus] = counts.get(cpus, 0) + 1
    return counts


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs host CPUs 0 and 1")
def test_vcpu_threads_pinned(guests: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with out.open("wb") as f:
        proc = popen_hvf(["-c", "2", "-p", "0:1", "-p", "1:0", *BASE_ARGS, "--kernel",
                          str(guests["counter"]), "--append", "debugcon=1", "pinned"], stdout=f)
    try:
        wait_for_text(out, "count 1", proc, 60)
        deadline = time.monotonic() + 10
        while (counts := _pinned_threads(proc.pid)).get("1", 0) < 1 and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert counts.get("1") == 1 and counts.get("0") == 1, counts  # one vCPU each
        assert counts.get("0-1", 0) >= 1  # the other threads are left alone
    finally:
        stop(proc)


def test_kernel_smaller_than_its_header_claims(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    image = bytearray(0x220)  # the setup header runs to 0x268
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x20F).to_bytes(2, "little")  # boot protocol 2.15
    kernel.write_bytes(bytes(image))
    r = run_hvf([*BASE_ARGS, "--kernel", str(kernel), "vm"])
    assert r.returncode == 4 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_guest_runs_with_wired_memory_in_core_dumps(guests: dict[str, Path]) -> None:
    """-S and -C with a real guest: hvf locks guest RAM and keeps it dumpable, and the
    guest runs to its end as without them."""
    plain = run_guest(guests["hello"], "-m", "64M")
    wired = run_guest(guests["hello"], "-S", "-C", "-m", "64M")
    assert wired.returncode == plain.returncode, wired.stderr
    assert wired.stdout == plain.stdout and "Traceback" not in wired.stderr
