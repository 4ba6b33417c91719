# SPDX-License-Identifier: BSD-2-Clause
"""virtio-net on a real tap with the test guest tests/guests/virtio_net.c.

Each test makes its own network: a network namespace (``ip netns add``) where hvf
itself runs (``ip netns exec NS python -m hvf``), so the tap it creates or attaches to
lives there, with Debian's dnsmasq as the DHCP server on the tap's host side. Every
address is inside the namespace, and the namespace goes when the test ends. Frames
are sent and captured on the host side through AF_PACKET sockets made inside the
namespace. Tests skip, saying why, where namespaces, taps or dnsmasq are missing.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import stop, wait_for_text

pytestmark = pytest.mark.kvm

MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev")
HOST_IP = "10.77.0.1"
GUEST_MAC = "02:00:00:77:00:05"
ETH_TEST = 0x88B5
ETH_P_ALL = 0x0003
CLONE_NEWNET = 0x40000000
LEASE = re.compile(r"^net lease (\S+) mask (\S+) router (\S+) server (\S+) time (\d+)$",
                   re.MULTILINE)


def _why_no_network() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and taps need root"
    if not shutil.which("ip"):
        return "iproute2's ip is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    probe = f"hvfprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_NO_NETWORK = _why_no_network()
_libc = ctypes.CDLL(None, use_errno=True)


class NetNs:
    """A network namespace of the test's own, and the processes it started there."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True,
                              text=True, check=check, timeout=60)

    def popen(self, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd],
                                stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def hvf(self, args: Sequence[str | os.PathLike[str]], tag: str) -> subprocess.Popen[bytes]:
        """hvf inside the namespace; its stderr in ``tmp/TAG.stderr``."""
        with open(self.tmp / f"{tag}.stderr", "wb") as err:
            return self.popen([sys.executable, "-m", "hvf", *map(str, args)],
                              stdout=subprocess.DEVNULL, stderr=err)

    def has_link(self, name: str) -> bool:
        return self.run("ip", "link", "show", name, check=False).returncode == 0

    def wait_link(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.has_link(name):
            assert proc.poll() is None, f"hvf exited with {proc.returncode} before {name} appeared"
            assert time.monotonic() < deadline, f"{name} did not appear"
            time.sleep(0.1)

    def address(self, tap: str, ip: str = HOST_IP) -> None:
        self.run("ip", "addr", "add", f"{ip}/24", "dev", tap)
        self.run("ip", "link", "set", tap, "up")

    def dnsmasq(self, tap: str) -> subprocess.Popen[bytes]:
        if not shutil.which("dnsmasq"):
            pytest.skip("dnsmasq is not installed (scripts/setup installs dnsmasq-base)")
        with open(self.tmp / "dnsmasq.log", "wb") as log:
            return self.popen(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                               f"--interface={tap}", "--bind-interfaces", "--no-ping",
                               "--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,1h",
                               f"--dhcp-leasefile={self.tmp / 'leases'}", "--pid-file="],
                              stdout=log, stderr=subprocess.STDOUT)

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block (this thread) inside the namespace: sockets made there stay."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns")
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET):
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(home)
            os.close(target)

    def packet_socket(self, tap: str) -> socket.socket:
        """An AF_PACKET socket on ``tap`` (every frame, both ways)."""
        with self.entered():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((tap, 0))
        return s

    def close(self) -> None:
        for proc in self.procs:
            stop(proc, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[NetNs]:
    if _NO_NETWORK:
        pytest.skip(_NO_NETWORK)
    name = f"hvft{os.getpid()}x{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    ns = NetNs(name, tmp_path)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        ns.close()


def ctl(vm: str, *args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "hvf", "ctl", "--json", "--vm", vm, *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def net_stats(vm: str) -> dict[str, int]:
    status = ctl(vm, "status")
    devices = status["devices"]
    assert isinstance(devices, dict)
    return devices["virtio-net@pci.0.2.0"]


def guest_args(guests: dict[str, Path], log: Path, backend: str, append: str,
               name: str) -> list[str | os.PathLike[str]]:
    return [*MACHINE, "-l", f"debugcon,{log}", "-s", f"2,virtio-net,{backend},mac={GUEST_MAC}",
            "--kernel", guests["virtio_net"], "--append", append, name]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hvf_pid(wrapper: subprocess.Popen[bytes]) -> int:
    """The pid of hvf under ``ip netns exec`` (which execs it: the same process)."""
    return wrapper.pid


# ---- DHCP, ping both ways ----


def test_dhcp_lease_and_ping_both_ways(guests: dict[str, Path], netns: NetNs,
                                       tmp_path: Path) -> None:
    """The guest gets a lease from dnsmasq on a tap hvf created, pings the host and
    answers its pings; the tap goes when hvf does."""
    log = tmp_path / "guest.log"
    assert not netns.has_link("tap0")
    proc = netns.hvf(guest_args(guests, log, "tap0", "ping=3", "net-dhcp"), "hvf")
    netns.wait_link("tap0", proc)
    netns.address("tap0")
    netns.dnsmasq("tap0")
    text = wait_for_text(log, "net pinged 3 of 3", proc, timeout=120)
    lease = LEASE.search(text)
    assert lease, text
    guest_ip = lease.group(1)
    assert lease.groups()[1:4] == ("255.255.255.0", HOST_IP, HOST_IP)
    assert guest_ip.startswith("10.77.0.")
    assert f"net mac {GUEST_MAC}" in text
    ping = netns.run("ping", "-c", "3", "-W", "5", guest_ip, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "3 received" in ping.stdout
    text = wait_for_text(log, f"net answered ping 3 from {HOST_IP}", proc, timeout=60)
    stats = net_stats("net-dhcp")
    assert stats["backend"] == "tap tap0" and stats["mac"] == GUEST_MAC
    assert stats["rx_frames"] >= 5 and stats["tx_frames"] >= 6
    assert stats["tx_dropped"] == stats["rx_oversize"] == 0
    stop(proc, timeout=30)
    assert not netns.has_link("tap0"), "the tap hvf created outlived it"
