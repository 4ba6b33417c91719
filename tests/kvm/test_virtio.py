# SPDX-License-Identifier: BSD-2-Clause
"""virtio-rng and virtio-console on real KVM, driven by the C test guests
(tests/guests/virtio_*.c, README there): MSI-X and INTx, ptys, doorbells that never
exit to user space, interrupts through irqfds, and a suspend/restore mid-stream."""

from __future__ import annotations

import os
import re
import select
import struct
import time
from pathlib import Path

import pytest
from test_snapshot import Hvf, ctl, lines_in, poweroff, read, suspend_exit, wait_served, wait_until

from conftest import popen_hvf, raw_pty, run_guest, stop

pytestmark = pytest.mark.kvm

MIB = 1 << 20
MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev")


def pattern(port: int, length: int) -> bytes:
    """What ``virtio_console`` sends on ``port`` (tests/guests/README.md)."""
    words = ((i * 2654435761) ^ (port * 0x9E3779B9) ^ 0x5BD1E995 for i in range(length // 4))
    return struct.pack(f"<{length // 4}I", *(w & 0xFFFFFFFF for w in words))


def word_hash(data: bytes) -> int:
    """The guest's hash of what it received: FNV-1a over little-endian 32-bit words."""
    h = 0x811C9DC5
    for (word,) in struct.iter_unpack("<I", data + bytes(-len(data) % 4)):
        h = ((h ^ word) * 0x01000193) & 0xFFFFFFFF
    return h


def test_rng_over_msix_then_intx(guests: dict[str, Path]) -> None:
    r = run_guest(guests["virtio_rng"], "-s", "4,virtio-rnd", timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    phases = re.findall(r"^rng (msix|intx) bytes (\d+) irqs (\d+) requests (\d+) zerowords (\d+)$",
                        r.stdout, re.MULTILINE)
    assert [p[0] for p in phases] == ["msix", "intx"], r.stdout
    for _mode, got, irqs, requests, zero_words in phases:
        assert int(got) == MIB and int(requests) == MIB // 4096
        assert int(irqs) > 0
        assert int(zero_words) <= 2  # the first word of each of 256 buffers: random


def test_console_one_mib_each_way_on_two_ports_through_ptys(
        guests: dict[str, Path], tmp_path: Path) -> None:
    log = tmp_path / "debugcon"
    with raw_pty() as (m0, _s0, p0), raw_pty() as (m1, _s1, p1):
        proc = popen_hvf([*MACHINE, "-l", f"debugcon,{log}",
                          "-s", f"5,virtio-console,first={p0},second={p1}",
                          "--kernel", str(guests["virtio_console"]),
                          "--append", f"ports=2 tx={MIB} rx={MIB}", "vm-console"])
        try:
            to_guest = {m0: os.urandom(MIB), m1: os.urandom(MIB)}
            sent = {m0: 0, m1: 0}
            got = {m0: bytearray(), m1: bytearray()}
            deadline = time.monotonic() + 240
            while any(len(got[m]) < MIB or sent[m] < MIB for m in got):
                assert time.monotonic() < deadline and proc.poll() is None, (
                    {m: (len(got[m]), sent[m]) for m in got})
                writers = [m for m in got if sent[m] < MIB]
                readable, writable, _ = select.select(list(got), writers, [], 1)
                for m in readable:
                    got[m] += os.read(m, 65536)
                for m in writable:
                    sent[m] += os.write(m, to_guest[m][sent[m]:sent[m] + 4096])
            assert proc.wait(120) == 1
        finally:
            stop(proc)
    out = log.read_text()
    for port, master in enumerate((m0, m1)):
        assert bytes(got[master]) == pattern(port, MIB), f"port {port}: guest output differs"
        assert f"port {port} tx {MIB}" in out
        assert f"port {port} rx {MIB} hash {word_hash(to_guest[master]):08x}" in out, out
    assert "console done" in out


def test_streaming_guest_kicks_without_exits_and_survives_suspend(
        guests: dict[str, Path], tmp_path: Path) -> None:
    """``virtio_console mode=counter rng=1``: numbered lines on the console, 64 bytes of
    entropy between lines. Every queue kick is an ioeventfd (none reaches the vCPU
    loop), every interrupt an MSI-X irqfd; suspended and restored mid-stream, the
    console carries on with no line lost or repeated."""
    name, snap = "virtio-stream", tmp_path / "snap"
    out1, out2 = tmp_path / "console-a", tmp_path / "console-b"
    args = [*MACHINE, "-s", f"5,virtio-console,con=file={out1}", "-s", "6,virtio-rnd",
            "--kernel", guests["virtio_console"], "--append", "mode=counter rng=1 msix=1", name]
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_until(lambda: lines_in(out1) >= 200, 120, "200 console lines", vm)
        devices = ctl(name, "status")["devices"]
        for device in ("virtio-console@pci.0.5.0", "virtio-rnd@pci.0.6.0"):
            stats = devices[device]
            assert stats["kicks"] >= 100 and stats["kicks_through_vcpu_loop"] == 0, stats
            assert stats["msix_interrupts"] >= 100 and stats["intx_interrupts"] == 0, stats
        suspend_exit(name, vm, snap)
    first = read(out1)
    with Hvf(["-r", snap, "-o", f"pci.0.5.0.port.con.path=file={out2}"], tmp_path, "b") as vm:
        wait_served(name, vm)
        wait_until(lambda: lines_in(out2) >= 100, 120, "100 lines after the restore", vm)
        poweroff(name, vm)
    numbers = [int(n) for n in (first + read(out2)).decode().splitlines()]
    assert numbers == list(range(len(numbers))), "a line was lost or repeated"
    assert len(numbers) >= lines_in(out1) + 99
