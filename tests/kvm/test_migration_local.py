# SPDX-License-Identifier: BSD-2-Clause
"""Local hand-over (``hvf ctl migrate --local unix:PATH``): another hvf process on this
host takes over a running guest, its RAM passed as a descriptor instead of copied;
and the checks a destination makes before the source stops its guest."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from hvf.control import socket_path
from hvf.cpumodel import HOST_FEATURES_ENV

from conftest import raw_pty
from test_migration import (  # noqa: F401  (dirty_guest: a fixture)
    Proc,
    ctl,
    dirty_guest,
    finished,
    listening,
    pair,
    show,
    start_migration,
)
from test_snapshot import check_counter, counter_args, lines_in, read, wait_until

pytestmark = pytest.mark.kvm


def test_a_4_gib_guest_is_handed_over_in_under_100_ms(guests: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """With ``memory.shared=true`` guest RAM is a memfd, which goes over the socket, so
    no page is copied: an upgrade of the hvf process under a running guest, under the
    same name."""
    name, out_a, out_b = "mig-local", tmp_path / "com1-a", tmp_path / "com1-b"
    sock = tmp_path / "hand-over.sock"
    with Proc(counter_args(guests["counter"], out_a, name, "-m", "4G", "-o",
                           "memory.shared=true"), tmp_path, "a") as src, \
            Proc(["--incoming", f"unix:{sock}", "-l", f"com1,file={out_b}"], tmp_path,
                 "b") as dst:
        wait_until(lambda: lines_in(out_a) >= 3, 60, "3 lines from the counter", src)
        wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
        figures = ctl(name, "migrate", "--local", f"unix:{sock}", proc=src)
        show(figures, "local hand-over of a 4 GiB guest")
        assert figures["state"] == "migrated" and figures["ram"] == "shared", figures
        assert figures["pages"] == 0 and figures["bytes"] < 1 << 20
        assert figures["total_ms"] < 100, figures
        assert src.wait(30) == 0, src.stderr
        wait_until(lambda: lines_in(out_b) >= 3, 60, "3 lines after the hand-over", dst)
        status = ctl(name, "status", proc=dst)  # the same name, now the new process's
        assert status["pid"] == dst.proc.pid and status["memory"] == 4 << 30
        ctl(name, "poweroff", proc=dst)
        assert dst.wait(30) == 1
    check_counter(read(out_a) + read(out_b))


def test_anonymous_ram_is_copied_by_a_local_migration(guests: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """Without ``memory.shared`` guest RAM is anonymous memory no other process can
    map: ``--local`` copies its pages over the socket, and the guest counts on."""
    name, out_a, out_b = "mig-anon", tmp_path / "com1-a", tmp_path / "com1-b"
    sock = tmp_path / "copy.sock"
    with Proc(counter_args(guests["counter"], out_a, name), tmp_path, "a") as src, \
            Proc(["--incoming", f"unix:{sock}", "-l", f"com1,file={out_b}"], tmp_path,
                 "b") as dst:
        wait_until(lambda: lines_in(out_a) >= 3, 60, "3 lines from the counter", src)
        wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
        figures = ctl(name, "migrate", "--local", f"unix:{sock}", proc=src)
        show(figures, "local migration of anonymous RAM")
        assert figures["state"] == "migrated" and figures["ram"] == "copy", figures
        assert figures["pages"] > 0
        assert src.wait(30) == 0, src.stderr
        assert "its pages are copied" in src.stderr
        wait_until(lambda: lines_in(out_b) >= 3, 60, "3 lines after the migration", dst)
        ctl(name, "poweroff", proc=dst)
        assert dst.wait(30) == 1
    check_counter(read(out_a) + read(out_b))


def test_a_restored_guest_hands_over_the_pages_it_changed(guests: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """A VM restored from a snapshot runs on a copy-on-write mapping of the snapshot's
    RAM file: the file is handed over, and the pages the guest changed since (which no
    descriptor carries) are copied; the count goes on from the last one printed."""
    name, snap = "mig-private", tmp_path / "snap"
    out_a, out_b, out_c = (tmp_path / f"com1-{t}" for t in "abc")
    sock = tmp_path / "hand-over.sock"
    with Proc(counter_args(guests["counter"], out_a, name), tmp_path, "a") as first:
        wait_until(lambda: lines_in(out_a) >= 3, 60, "3 lines from the counter", first)
        ctl(name, "suspend", "--exit", snap, proc=first)
        assert first.wait(30) == 0
    with Proc(["-r", snap, "-l", f"com1,file={out_b}"], tmp_path, "b") as src, \
            Proc(["--incoming", f"unix:{sock}", "-l", f"com1,file={out_c}"], tmp_path,
                 "c") as dst:
        wait_until(lambda: lines_in(out_b) >= 5, 60, "5 lines after the restore", src)
        wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
        figures = ctl(name, "migrate", "--local", f"unix:{sock}", proc=src)
        show(figures, "local hand-over of a restored guest")
        assert figures["state"] == "migrated" and figures["ram"] == "private", figures
        assert figures["pages"] > 0  # the count and the stack live in changed pages
        assert src.wait(30) == 0
        wait_until(lambda: lines_in(out_c) >= 3, 60, "3 lines after the hand-over", dst)
        ctl(name, "poweroff", proc=dst)
        assert dst.wait(30) == 1
    total, _ = check_counter(read(out_a) + read(out_b) + read(out_c))
    assert total >= lines_in(out_a) + lines_in(out_b) + 2


# ---- refused before the guest stops ----


@contextlib.contextmanager
def refused_migration(guests: dict[str, Path], tmp_path: Path, name: str, *options: object,
                      dest_args: tuple[object, ...] = (),
                      env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """A counter and a destination; yields (the migration's reply, the destination);
    afterwards the source is checked to run on, counting."""
    out_a, out_b, sock = tmp_path / "com1-a", tmp_path / "com1-b", tmp_path / "mig.sock"
    with Proc(counter_args(guests["counter"], out_a, name), tmp_path, "a") as src, \
            Proc(["--incoming", f"unix:{sock}", "-l", f"com1,file={out_b}", *dest_args],
                 tmp_path, "b", runtime=tmp_path / "run-b", env=env) as dst:
        wait_until(lambda: lines_in(out_a) >= 3, 60, "3 lines from the counter", src)
        wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
        status, reply = finished(start_migration(name, src, f"unix:{sock}", *options), 120)
        assert status == 1 and "the VM runs on here" in reply["error"], reply
        yield reply["error"], dst
        assert ctl(name, "status", proc=src)["state"] == "running"
        lines = lines_in(out_a)
        wait_until(lambda: lines_in(out_a) >= lines + 2, 30, "the source counting on", src)
        ctl(name, "poweroff", proc=src)
        assert src.wait(30) == 1
    check_counter(read(out_a))
    assert not read(out_b)


def test_a_destination_that_cannot_give_the_guest_its_cpu_refuses_it(
        guests: dict[str, Path], tmp_path: Path) -> None:
    """The destination's host lacks a feature the guest was given (HVF_HOST_CPU_FEATURES
    takes it away there; the guest has the host CPU's features): the list comes back
    before the source stops its guest."""
    flags = next((line.split(":", 1)[1].split() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                 [])
    feature = next((f for f in ("sse4_2", "popcnt", "cx16") if f in flags), None)
    if feature is None:
        pytest.skip("this host's CPU has none of sse4_2, popcnt, cx16")
    with refused_migration(guests, tmp_path, "mig-cpu",
                           env={HOST_FEATURES_ENV: f"-{feature}"}) as (error, dst):
        print(f"refused: {error}")
        assert "refused the VM" in error and "cannot give the guest the CPU" in error
        assert feature in error, error
        assert dst.wait(30) == 4 and feature in dst.stderr


def test_a_name_in_use_at_the_destination_is_refused(guests: dict[str, Path],
                                                     tmp_path: Path) -> None:
    other, out = "mig-other", tmp_path / "com1-other"
    with Proc(counter_args(guests["counter"], out, other), tmp_path, "other",
              runtime=tmp_path / "run-b") as busy:
        wait_until(lambda: (tmp_path / "run-b" / f"{other}.sock").exists(), 60,
                   "the other VM's socket", busy)
        with refused_migration(guests, tmp_path, "mig-name",
                               dest_args=(other,)) as (error, dst):
            assert f"a VM named '{other}' already runs on this host" in error, error
            assert dst.wait(30) == 4
        ctl(other, "poweroff", proc=busy)
        assert busy.wait(30) == 1


def test_local_needs_a_unix_socket(guests: dict[str, Path], tmp_path: Path) -> None:
    name, out = "mig-local-tcp", tmp_path / "com1"
    with Proc(counter_args(guests["counter"], out, name), tmp_path, "a") as src:
        wait_until(lambda: socket_path(name).exists(), 60, "the control socket", src)
        reply = ctl(name, "migrate", "--local", "tcp:127.0.0.1:1", proc=src, expect_ok=False)
        assert "--local hands guest memory over a unix: socket" in reply["error"], reply
        assert ctl(name, "status", proc=src)["state"] == "running"
        ctl(name, "poweroff", proc=src)
        assert src.wait(30) == 1


def test_progress_is_shown_on_a_terminal(dirty_guest: Path, tmp_path: Path) -> None:
    """On a terminal ``hvf ctl migrate`` shows RAM sent, the bandwidth, the dirty rate
    and the expected downtime as it goes."""
    name = "mig-progress"
    with contextlib.ExitStack() as stack:
        src, _dst, uri = pair(stack, dirty_guest, tmp_path, name, "pages=512 delay=200")
        master, slave, _ = stack.enter_context(raw_pty())
        ctl_proc = subprocess.Popen(
            [sys.executable, "-m", "hvf", "ctl", "--vm", name, "migrate", uri, "--bandwidth",
             "1", "--timeout", "6"], stdout=subprocess.PIPE, stderr=slave, env=src.env)
        shown = b""
        while ctl_proc.poll() is None or select.select([master], [], [], 0.2)[0]:
            if select.select([master], [], [], 0.2)[0]:
                shown += os.read(master, 65536)
        ctl_proc.communicate(timeout=30)
    text = shown.decode(errors="replace")
    assert re.search(rf"\rmigrate {name}: precopy, round \d+, [\d.]+ MB sent at [\d.]+ MB/s, "
                     rf"dirty [\d.]+ MB/s, expected downtime [\d.]+ ms, throttle \d+ %", text), text
