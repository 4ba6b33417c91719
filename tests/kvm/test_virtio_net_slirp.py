# SPDX-License-Identifier: BSD-2-Clause
"""virtio-net on the slirp back end (libslirp user-mode networking, no privilege) with
the test guest tests/guests/virtio_net.c: its DHCP lease comes from the library, it
pings the stack's host address, and with ``tcp=PORT`` it talks to a TCP service on
the host's loopback, which the stack reaches at 10.0.2.2. Bad slirp options end hvf
with exit status 4 and a message naming them."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from test_snapshot import Hvf, ctl, suspend_exit, wait_served

from conftest import popen_hvf, run_hvf, stop, wait_for_text

try:
    from hvf.plugins.net import _slirp  # noqa: F401
except ImportError:
    pytest.skip("hvf was built without libslirp (libslirp-dev)", allow_module_level=True)

pytestmark = pytest.mark.kvm

MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev")
LEASE = re.compile(r"^net lease (\S+) mask (\S+) router (\S+) server (\S+) time (\d+)$",
                   re.MULTILINE)
PING = re.compile(r"^net ping (\d+) ok$", re.MULTILINE)


def test_lease_ping_and_a_tcp_service_on_the_host_loopback(
        guests: dict[str, Path], tmp_path: Path) -> None:
    console = tmp_path / "debugcon"
    name = "slirp-guest"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        proc = popen_hvf([*MACHINE, "-l", f"debugcon,{console}",
                          "-s", "2,virtio-net,slirp,restrict=off",
                          "--kernel", guests["virtio_net"],
                          "--append", f"ping=3 tcp={port}", name])
        try:
            listener.settimeout(240)
            conn, peer = listener.accept()
            with conn:
                conn.settimeout(60)
                hello = b""
                while not hello.endswith(b"\n"):
                    chunk = conn.recv(100)
                    assert chunk, f"the guest closed the connection after {hello!r}"
                    hello += chunk
                conn.sendall(b"hello from the host\n")
                out = wait_for_text(console, "net tcp got hello from the host", proc, 120)
                out = wait_for_text(console, "net pinged 3 of 3", proc, 120)
                stats = ctl(name, "status")["devices"]["virtio-net@pci.0.2.0"]
        finally:
            stop(proc)
    assert peer[0] == "127.0.0.1"
    assert hello == b"hvf guest\n"
    lease = LEASE.search(out)
    assert lease is not None, out
    assert lease.groups()[:4] == ("10.0.2.15", "255.255.255.0", "10.0.2.2", "10.0.2.2")
    assert f"net tcp connected {port}" in out
    assert stats["backend"] == "slirp"
    assert stats["slirp_from_guest"] >= 8 and stats["slirp_to_guest"] >= 6, stats
    assert stats["slirp_to_guest_dropped"] == 0, stats


def test_pings_carry_on_after_a_restore_onto_a_new_stack(
        guests: dict[str, Path], tmp_path: Path) -> None:
    """The stack is not saved (as in bhyve): the restored hvf starts a new one from the
    saved configuration, which learns the guest's address again, and the guest's pings
    to 10.0.2.2 carry on."""
    name, snap = "slirp-move", tmp_path / "snap"
    log, log2 = tmp_path / "guest.log", tmp_path / "guest2.log"
    args = [*MACHINE, "-l", f"debugcon,{log}", "-s", "2,virtio-net,slirp",
            "--kernel", guests["virtio_net"], "--append", "ping=0 period=0x8000000", name]
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_for_text(log, r"^net ping 3 ok$", vm.proc, 120, regex=True)
        suspend_exit(name, vm, snap)
    before = log.read_text()
    with Hvf(["-r", snap, "-l", f"debugcon,{log2}"], tmp_path, "b") as vm:
        after = wait_for_text(log2, r"(^net ping \d+ ok\n(.*\n)*){3}", vm.proc, 120, regex=True)
        stats = ctl(name, "status")["devices"]["virtio-net@pci.0.2.0"]
    assert LEASE.search(before) is not None, before
    last = max(int(n) for n in PING.findall(before))
    carried_on = [int(n) for n in PING.findall(after)]
    assert carried_on[0] > last and carried_on == sorted(carried_on), (last, carried_on)
    assert stats["backend"] == "slirp" and stats["slirp_to_guest"] >= 3, stats


@pytest.mark.parametrize(("options", "message"), [
    ("hostfwd=tcp:127.0.0.1:2222", "invalid hostfwd rule 'tcp:127.0.0.1:2222'"),
    ("hostfwd=tcp:127.0.0.1:2222-:70000",
     "invalid hostfwd rule 'tcp:127.0.0.1:2222-:70000': '70000' is not a port number"),
    ("hostfwd=icmp::1-:1", "invalid hostfwd rule 'icmp::1-:1'"),
    ("hostfwd=tcp::2222-:22,hostfw=x", "unknown slirp option hostfw"),
    ("restrict=maybe", "invalid restrict value 'maybe'"),
    ("queues=2", "the slirp back end has one queue pair, not 2"),
])
def test_bad_slirp_options_exit_4(guests: dict[str, Path], options: str, message: str) -> None:
    r = run_hvf([*MACHINE, "-s", f"2,virtio-net,slirp,{options}",
                 "--kernel", guests["virtio_net"], "slirp-bad"], timeout=60)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert f"virtio-net@pci.0.2.0: {message}" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_host_port_in_use_exits_4(guests: dict[str, Path]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run_hvf([*MACHINE, "-s", f"2,virtio-net,slirp,hostfwd=tcp:127.0.0.1:{port}-:22",
                     "--kernel", guests["virtio_net"], "slirp-busy"], timeout=60)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert (f"hostfwd rule 'tcp:127.0.0.1:{port}-:22': cannot listen on 127.0.0.1:{port} "
            f"(Address already in use)") in r.stderr
