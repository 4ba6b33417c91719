# SPDX-License-Identifier: BSD-2-Clause
"""Live migration on real KVM between real hvf processes, driven as a user drives it:
``hvf --incoming URI`` waits, ``hvf ctl migrate URI`` sends.

The counter guests (tests/guests/README.md) number their COM1 lines, so the output of
the source followed by that of the destination must be one sequence, nothing skipped
or repeated, wherever the guest stopped. Every hvf is a child killed on the way out of
its ``with``; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import run_hvf
from test_snapshot import Hvf, check_counter, counter_args, lines_in, read, wait_until

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def dirty_guest(guests: dict[str, Path]) -> Path:
    """tests/guests/counter_dirty.S: a counter that dirties guest pages as fast as it
    can (`pages=`, `delay=`)."""
    return guests["counter_dirty"]


# ---- processes ----

#: hvf as a child process, in a network namespace if asked (test_snapshot's).
Proc = Hvf


def ctl(name: str, *args: object, proc: Proc | None = None,
        expect_ok: bool = True) -> dict[str, Any]:
    """``hvf ctl --vm NAME --json ARGS`` (in ``proc``'s runtime directory)."""
    r = run_hvf(["ctl", "--vm", name, "--json", *map(str, args)], timeout=300,
                env=proc.env if proc is not None else None)
    if expect_ok:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    reply: dict[str, Any] = json.loads(r.stdout.splitlines()[-1])
    return reply


def start_migration(name: str, source: Proc, *args: object) -> subprocess.Popen[str]:
    """``hvf ctl migrate ARGS`` in the background."""
    return subprocess.Popen([sys.executable, "-m", "hvf", "ctl", "--vm", name, "--json",
                             "migrate", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=source.env)


def finished(migration: subprocess.Popen[str], timeout: float) -> tuple[int, dict[str, Any]]:
    out, err = migration.communicate(timeout=timeout)
    assert out.strip(), err
    return migration.returncode, json.loads(out.splitlines()[-1])


def listening(dest: Proc) -> bool:
    return "waiting for a migration on" in dest.stderr


def show(figures: dict[str, Any], what: str) -> None:
    print(f"{what}: total {figures.get('total_ms')} ms, downtime {figures.get('downtime_ms')} "
          f"ms, {figures.get('bytes')} bytes, {figures.get('rounds')} rounds, throttle "
          f"{figures.get('throttle')} %")


# ---- network namespaces ----


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def veth_pair() -> Iterator[tuple[str, str, str]]:
    """Two new network namespaces joined by a veth pair: (namespace A, namespace B,
    B's address); addresses exist only inside them. Skips where namespaces cannot be
    made."""
    if shutil.which("ip") is None:
        pytest.skip("no 'ip' command (iproute2) to make network namespaces with")
    tag = f"{os.getpid() % 100000}"
    a, b = f"hvfmig-a{tag}", f"hvfmig-b{tag}"
    net = f"10.251.{os.getpid() % 250}"
    made: list[str] = []
    try:
        for ns in (a, b):
            r = _ip("netns", "add", ns)
            if r.returncode:
                pytest.skip(f"cannot make a network namespace here: {r.stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", "vma" + tag, "netns", a, "type", "veth", "peer", "name",
                  "vmb" + tag, "netns", b),
                 ("-n", a, "addr", "add", f"{net}.1/30", "dev", "vma" + tag),
                 ("-n", b, "addr", "add", f"{net}.2/30", "dev", "vmb" + tag),
                 ("-n", a, "link", "set", "vma" + tag, "up"),
                 ("-n", b, "link", "set", "vmb" + tag, "up"),
                 ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode:
                pytest.skip(f"cannot join network namespaces with a veth pair: "
                            f"ip {' '.join(step)}: {r.stderr.strip()}")
        yield a, b, f"{net}.2"
    finally:
        for ns in made:
            _ip("netns", "del", ns)


# ---- 1. over TCP, between namespaces ----


def test_counter_smp_migrates_over_tcp_between_network_namespaces(
        guests: dict[str, Path], tmp_path: Path) -> None:
    """Two vCPUs, paging, the PIT: the guest stops in one hvf and goes on counting in
    another, across a veth pair, nothing skipped or repeated."""
    name, out_a, out_b = "mig-tcp", tmp_path / "com1-a", tmp_path / "com1-b"
    with veth_pair() as (ns_a, ns_b, address):
        uri = f"tcp:{address}:4711"
        with Proc(counter_args(guests["counter_smp"], out_a, name, "-c", "2"), tmp_path, "a",
                  netns=ns_a, runtime=tmp_path / "run-a") as src, \
                Proc(["--incoming", uri, "-l", f"com1,file={out_b}"], tmp_path, "b",
                     netns=ns_b, runtime=tmp_path / "run-b") as dst:
            wait_until(lambda: lines_in(out_a) >= 5, 60, "5 lines from counter_smp", src)
            wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
            figures = ctl(name, "migrate", uri, proc=src)
            assert figures["state"] == "migrated", figures
            show(figures, "counter_smp over TCP between namespaces")
            assert src.wait(30) == 0, src.stderr  # a migrated source exits with 0
            assert 0 < figures["downtime_ms"] <= figures["total_ms"]
            assert figures["bytes"] > 0 and figures["rounds"] >= 2
            wait_until(lambda: lines_in(out_b) >= 5, 60, "5 lines on the destination", dst)
            status = ctl(name, "status", proc=dst)
            assert status["state"] == "running" and status["cpus"] == 2
            assert ctl(name, "poweroff", proc=dst) == {"state": "stopping"}
            assert dst.wait(30) == 1
    before, _ = check_counter(read(out_a), smp=True)
    total, aps = check_counter(read(out_a) + read(out_b), smp=True)
    assert total >= before + 5
    assert aps[-1] > aps[before], f"the AP did not run after the migration: {aps}"


# ---- 2. a guest dirtying faster than the link ----


def dirty_args(guest: Path, out: Path, name: str, append: str) -> list[object]:
    return counter_args(guest, out, name, append=append)


def pair(stack: contextlib.ExitStack, guest: Path, tmp_path: Path, name: str,
         append: str) -> tuple[Proc, Proc, str]:
    """The dirtying guest running as ``name`` and a destination waiting on a unix:
    socket (its own runtime directory: as on another host), and that socket's URI."""
    out_a, out_b = tmp_path / "com1-a", tmp_path / "com1-b"
    sock = tmp_path / "mig.sock"
    src = stack.enter_context(Proc(dirty_args(guest, out_a, name, append), tmp_path, "a"))
    dst = stack.enter_context(Proc(["--incoming", f"unix:{sock}", "-l", f"com1,file={out_b}"],
                                   tmp_path, "b", runtime=tmp_path / "run-b"))
    wait_until(lambda: lines_in(out_a) >= 3, 60, "3 lines from the dirtying guest", src)
    wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
    return src, dst, f"unix:{sock}"


def migrate_dirty_guest(stack: contextlib.ExitStack, dirty_guest: Path, tmp_path: Path,
                        name: str, append: str,
                        *options: object) -> tuple[int, dict[str, Any], Proc, Proc]:
    src, dst, uri = pair(stack, dirty_guest, tmp_path, name, append)
    status, reply = finished(start_migration(name, src, uri, *options), 300)
    return status, reply, src, dst


def check_outcome(status: int, reply: dict[str, Any], src: Proc, dst: Proc, name: str,
                  tmp_path: Path) -> str:
    """Either the migration converged (the count goes on at the destination) or it
    stopped at its timeout (the source runs on, counting, and the destination exits)."""
    out_a, out_b = tmp_path / "com1-a", tmp_path / "com1-b"
    if status == 0:
        assert reply["state"] == "migrated" and reply["throttle"] > 0, reply
        show(reply, "dirtying guest converged")
        assert src.wait(30) == 0
        wait_until(lambda: lines_in(out_b) >= 3, 60, "3 lines on the destination", dst)
        ctl(name, "poweroff", proc=dst)
        assert dst.wait(30) == 1
        check_counter(read(out_a) + read(out_b))
        return "converged"
    assert "did not converge within the" in reply["error"] and "runs on here" in reply["error"]
    print(f"dirtying guest stopped at its timeout: {reply['error']}")
    assert dst.wait(30) == 4 and "the source stopped the migration" in dst.stderr
    assert ctl(name, "status", proc=src)["state"] == "running"
    lines = lines_in(out_a)
    wait_until(lambda: lines_in(out_a) >= lines + 3, 30, "the source counting on", src)
    ctl(name, "poweroff", proc=src)
    assert src.wait(30) == 1
    check_counter(read(out_a))
    assert not read(out_b)
    return "timed out"


def test_auto_converge_throttles_a_guest_that_outruns_the_link(
        dirty_guest: Path, tmp_path: Path) -> None:
    """256 pages rewritten again and again at 2 MB/s: no round ever fits 100 ms until
    the vCPU is throttled."""
    name = "mig-converge"
    with contextlib.ExitStack() as stack:
        status, reply, src, dst = migrate_dirty_guest(
            stack, dirty_guest, tmp_path, name, "pages=256 delay=200",
            "--bandwidth", 2, "--downtime-ms", 100, "--timeout", 120)
        assert check_outcome(status, reply, src, dst, name, tmp_path) == "converged"


def test_a_guest_dirtying_faster_than_the_link_stops_at_the_timeout(
        dirty_guest: Path, tmp_path: Path) -> None:
    name = "mig-timeout"
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        status, reply, src, dst = migrate_dirty_guest(
            stack, dirty_guest, tmp_path, name, "pages=1024", "--bandwidth", 2,
            "--downtime-ms", 20, "--timeout", 10)
        check_outcome(status, reply, src, dst, name, tmp_path)
        assert time.monotonic() - began < 60


# ---- 3. either side killed, or a cancel ----


def slow_migration(stack: contextlib.ExitStack, dirty_guest: Path, tmp_path: Path,
                   name: str) -> tuple[Proc, Proc, subprocess.Popen[str]]:
    """A migration at 1 MB/s of 8 MiB being dirtied, half a megabyte into it."""
    src, dst, uri = pair(stack, dirty_guest, tmp_path, name, "pages=2048")
    migration = start_migration(name, src, uri, "--bandwidth", 1)
    stack.callback(lambda: migration.poll() is None and migration.kill())
    wait_until(lambda: ctl(name, "call", "migrate", "query=true", proc=src).get("bytes", 0)
               > 500_000, 60, "half a megabyte sent", src)
    return src, dst, migration


def source_runs_on(name: str, src: Proc, out: Path) -> None:
    assert ctl(name, "status", proc=src)["state"] == "running"
    lines = lines_in(out)
    wait_until(lambda: lines_in(out) >= lines + 3, 30, "the source counting on", src)
    ctl(name, "poweroff", proc=src)
    assert src.wait(30) == 1
    check_counter(read(out))


def test_killing_the_destination_mid_migration_leaves_the_source_running(
        dirty_guest: Path, tmp_path: Path) -> None:
    name = "mig-kill-dst"
    with contextlib.ExitStack() as stack:
        src, dst, migration = slow_migration(stack, dirty_guest, tmp_path, name)
        dst.kill()
        status, reply = finished(migration, 60)
        assert status == 1 and "runs on here" in reply["error"], reply
        assert "the connection to the destination" in reply["error"], reply
        source_runs_on(name, src, tmp_path / "com1-a")


def test_killing_the_source_leaves_no_destination_vm(dirty_guest: Path,
                                                     tmp_path: Path) -> None:
    name = "mig-kill-src"
    with contextlib.ExitStack() as stack:
        src, dst, migration = slow_migration(stack, dirty_guest, tmp_path, name)
        src.kill()
        migration.communicate(timeout=60)
        assert dst.wait(60) == 4
        assert "closed the connection before the migration completed" in dst.stderr
        assert not (tmp_path / "run-b" / f"{name}.sock").exists()
        assert not read(tmp_path / "com1-b")  # the guest never ran there


def test_cancel_stops_the_migration_and_the_vm_runs_on(dirty_guest: Path,
                                                       tmp_path: Path) -> None:
    name = "mig-cancel"
    with contextlib.ExitStack() as stack:
        src, dst, migration = slow_migration(stack, dirty_guest, tmp_path, name)
        refused = ctl(name, "checkpoint", tmp_path / "snap", proc=src, expect_ok=False)
        assert "another checkpoint of this VM is in progress" in refused["error"], refused
        assert ctl(name, "migrate", "--cancel", proc=src) == {"state": "cancelling"}
        status, reply = finished(migration, 60)
        assert status == 1 and "cancelled" in reply["error"], reply
        assert dst.wait(60) == 4 and "cancelled" in dst.stderr
        assert ctl(name, "call", "migrate", "query=true", proc=src) == {"state": "none"}
        source_runs_on(name, src, tmp_path / "com1-a")
