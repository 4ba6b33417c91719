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
import tempfile
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


# ---- bulk frames, a guest that stops reading ----

FRAMES = int(os.environ.get("HVF_NET_FRAMES", "100000"))
HOST_MAC = bytes.fromhex("020000770001")


def test_frame(seq: int, destination: bytes) -> bytes:
    return destination + HOST_MAC + ETH_TEST.to_bytes(2, "big") + struct.pack(">I", seq).ljust(46, b"\xa5")


test_frame.__test__ = False  # type: ignore[attr-defined]


def echo_frames(sock: socket.socket, count: int, window: int, guest: bytes,
                timeout: float) -> tuple[int, float]:
    """Send ``count`` numbered frames to the echoing guest, never more than ``window``
    unanswered (so it always has receive buffers), and check every echo comes back
    in order; returns (echoes, seconds)."""
    sock.settimeout(5)
    sent = got = 0
    started = time.monotonic()
    while got < count:
        while sent < count and sent - got < window:
            sock.send(test_frame(sent, guest))
            sent += 1
        data, address = sock.recvfrom(2048)
        if address[2] == socket.PACKET_OUTGOING or data[12:14] != ETH_TEST.to_bytes(2, "big"):
            continue
        assert data[:6] == HOST_MAC and data[6:12] == guest, data[:14].hex()
        (seq,) = struct.unpack_from(">I", data, 14)
        assert seq == got, f"echo {seq} where {got} was due"
        got += 1
        assert time.monotonic() - started < timeout, f"only {got} echoes in {timeout} s"
    return got, time.monotonic() - started


def test_frames_each_way_none_lost(guests: dict[str, Path], netns: NetNs,
                                   tmp_path: Path) -> None:
    """100,000 frames to the guest and its 100,000 echoes back, none lost while the
    guest has buffers posted; hvf's counters agree."""
    log = tmp_path / "guest.log"
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    proc = netns.hvf(guest_args(guests, log, "tap0", f"ip=10.77.0.5 ping=0 echo={FRAMES}",
                                "net-echo"), "hvf")
    netns.wait_link("tap0", proc)
    wait_for_text(log, "net mac", proc, timeout=60)
    with netns.packet_socket("tap0") as sock:
        got, seconds = echo_frames(sock, FRAMES, 128, mac, timeout=900)
    wait_for_text(log, f"net echoed {FRAMES} lost 0", proc, timeout=60)
    stats = net_stats("net-echo")
    print(f"{FRAMES} frames each way in {seconds:.1f} s: {FRAMES / seconds:.0f} frames/s "
          f"each way; hvf {stats}")
    assert stats["rx_frames"] >= FRAMES and stats["tx_frames"] >= FRAMES
    assert stats["rx_oversize"] == stats["rx_filtered"] == stats["tx_dropped"] == 0
    assert stats.get("tap_tx_dropped", 0) == 0
    # The guest never ran out of buffers (the one time: before it first posted them).
    assert stats["rx_no_buffers"] <= 1


def test_a_guest_that_stops_reading_costs_no_memory(guests: dict[str, Path], netns: NetNs,
                                                    tmp_path: Path) -> None:
    """The guest posts its receive buffers once and never takes a frame: after they
    are full hvf stops reading, 100,000 more frames leave its memory as it was, and the
    tap's drop counter (in ``hvf ctl status``) accounts for them."""
    log = tmp_path / "guest.log"
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    proc = netns.hvf(guest_args(guests, log, "tap0", "stall=1", "net-stall"), "hvf")
    netns.wait_link("tap0", proc)
    wait_for_text(log, "net stalled", proc, timeout=60)
    with netns.packet_socket("tap0") as sock:
        for seq in range(300):  # more than the guest's 256 buffers
            sock.send(test_frame(seq, mac))
        time.sleep(1)
        before = rss_kib(proc.pid)
        for seq in range(300, 300 + FRAMES):
            sock.send(test_frame(seq, mac))
    time.sleep(2)
    after = rss_kib(proc.pid)
    stats = net_stats("net-stall")
    queue = int(netns.run("cat", "/sys/class/net/tap0/tx_queue_len").stdout)
    print(f"stalled guest: hvf RSS {before} KiB before {FRAMES} more frames, {after} KiB "
          f"after; delivered {stats['rx_frames']}, tap dropped {stats['tap_tx_dropped']}, "
          f"tap queue {queue}")
    assert stats["rx_frames"] == 256 and stats["rx_no_buffers"] >= 1
    assert after - before < 4096, f"hvf grew by {after - before} KiB"
    waiting = FRAMES + 300 - stats["rx_frames"] - stats["tap_tx_dropped"]
    assert 0 <= waiting <= queue + 1, waiting  # the tap's queue and hvf's one bounce frame


# ---- suspend and restore onto another tap ----


def suspend_and_restore(guests: dict[str, Path], netns: NetNs, tmp_path: Path,
                        append: str, name: str) -> tuple[str, str, list[bytes]]:
    """A guest pinging the host on tap0 (hvf's own), suspended, restored onto tap1 (a
    persistent tap with the host's address); the guest's output before and after and
    the ARP frames the guest's MAC sent on tap1 in the first seconds."""
    log, log2, snap = tmp_path / "guest.log", tmp_path / "guest2.log", tmp_path / "snap"
    proc = netns.hvf(guest_args(guests, log, "tap0", append, name), "hvf")
    netns.wait_link("tap0", proc)
    netns.address("tap0")
    netns.dnsmasq("tap0")
    wait_for_text(log, r"^net ping 3 ok$", proc, timeout=120, regex=True)
    out = subprocess.run([sys.executable, "-m", "hvf", "ctl", "--vm", name, "suspend", "--exit",
                          str(snap)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert proc.wait(60) == 0, (tmp_path / "hvf.stderr").read_text()
    before = log.read_text()
    assert not netns.has_link("tap0")
    netns.run("ip", "tuntap", "add", "tap1", "mode", "tap")
    netns.address("tap1")
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    with netns.packet_socket("tap1") as sock:
        restored = netns.hvf(["-r", snap, "-l", f"debugcon,{log2}", "-s", "2,virtio-net,tap1"],
                             "restored")
        sock.settimeout(1)
        arp: list[bytes] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not arp:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                assert restored.poll() is None, (tmp_path / "restored.stderr").read_text()
                continue
            if data[6:12] == mac and data[12:14] == b"\x08\x06":
                arp.append(data)
    last = max(int(n) for n in re.findall(r"^net ping (\d+) ok$", before, re.MULTILINE))
    after = wait_for_text(log2, r"(^net ping \d+ ok\n(.*\n)*){3}", restored, timeout=120,
                          regex=True)
    carried_on = [int(n) for n in re.findall(r"^net ping (\d+) ok$", after, re.MULTILINE)]
    assert carried_on[0] > last and carried_on == sorted(carried_on), (last, carried_on)
    stats = net_stats(name)
    assert stats["backend"] == "tap tap1"
    stop(restored, timeout=30)
    assert netns.has_link("tap1"), "a persistent tap must outlive hvf"
    return before, after, arp


def gratuitous(frame: bytes, ip: str) -> bool:
    """Whether ``frame`` is an ARP request for ``ip`` from ``ip`` (a gratuitous ARP)."""
    packed = socket.inet_aton(ip)
    return frame[20:22] == b"\x00\x01" and frame[28:32] == packed == frame[38:42]


@pytest.mark.parametrize("announce", [1, 0], ids=["guest-announces", "hvf-announces"])
def test_suspend_and_restore_onto_another_tap(guests: dict[str, Path], netns: NetNs,
                                              tmp_path: Path, announce: int) -> None:
    """Pings carry on after a restore onto a different tap (``-r`` with
    ``-s 2,virtio-net,tap1``), and the guest is announced there: by the guest
    (VIRTIO_NET_S_ANNOUNCE) or, where it did not negotiate GUEST_ANNOUNCE, by hvf."""
    name = f"net-move{announce}"
    before, after, arp = suspend_and_restore(guests, netns, tmp_path,
                                             f"ping=0 period=0x8000000 announce={announce}", name)
    lease = LEASE.search(before)
    assert lease, before
    assert arp and gratuitous(arp[0], lease.group(1)), [a.hex() for a in arp]
    assert ("net announce" in after) == bool(announce)


# ---- refusals ----


def refused(args: Sequence[str | os.PathLike[str]], netns: NetNs | None = None,
            *, prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> str:
    """Run hvf (in ``netns`` when given) expecting exit 4; its stderr."""
    cmd = [*prefix, sys.executable, "-m", "hvf", *map(str, args)]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns.name, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, env=env)
    assert out.returncode == 4, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr


@pytest.mark.parametrize("spec, message", [
    ("tap0,mac=02:00:00:00:00", "invalid MAC address '02:00:00:00:00'"),
    ("tap0,mac=01:00:5e:00:00:01", "invalid MAC address '01:00:5e:00:00:01'"),
    ("netmap:em0", "unknown network back end 'netmap:em0'"),
    ("vde:/tmp/switch", "unknown network back end 'vde:/tmp/switch'"),
    ("tap0,mtu=70000", "mtu= takes 68 to 65535"),
])
def test_bad_network_options_exit_4(guests: dict[str, Path], spec: str, message: str) -> None:
    stderr = refused([*MACHINE, "-s", f"2,virtio-net,{spec}", "--kernel", guests["virtio_net"],
                      "net-bad"])
    assert message in stderr


def test_a_busy_tap_and_a_persistent_one(guests: dict[str, Path], netns: NetNs,
                                         tmp_path: Path) -> None:
    """A tap another hvf holds is refused (exit 4, naming it); a persistent tap that
    exists is attached to and stays after hvf."""
    netns.run("ip", "tuntap", "add", "tapp", "mode", "tap")
    log = tmp_path / "guest.log"
    proc = netns.hvf(guest_args(guests, log, "tapp", "stall=1", "net-first"), "hvf")
    wait_for_text(log, "net stalled", proc, timeout=60)
    stderr = refused(guest_args(guests, tmp_path / "second.log", "tapp", "stall=1",
                                "net-second"), netns)
    assert "tap 'tapp' is busy" in stderr
    stop(proc, timeout=30)
    assert netns.has_link("tapp")


def test_no_permission_for_dev_net_tun(guests: dict[str, Path], netns: NetNs,
                                       tmp_path: Path) -> None:
    """hvf as an unprivileged user (with a /dev/kvm of its own in a private mount
    namespace) cannot open /dev/net/tun: exit 4, saying so."""
    if not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("util-linux's unshare and setpriv are needed")
    base = Path(tempfile.mkdtemp(prefix="hvf-noperm-", dir="/tmp"))  # reachable by nobody
    try:
        base.chmod(0o755)
        private = base / "private"
        private.mkdir(mode=0o777)
        private.chmod(0o777)
        kvm = os.stat("/dev/kvm").st_rdev
        script = (f"mount --make-rprivate / && mount -t tmpfs -o mode=1777 none {private} && "
                  f"mknod -m 666 {private}/kvm c {os.major(kvm)} {os.minor(kvm)} && "
                  f"mount --bind {private}/kvm /dev/kvm && exec setpriv --reuid=65534 "
                  f"--regid=65534 --clear-groups \"$@\"")
        guest = base / "virtio_net.elf"
        shutil.copy(guests["virtio_net"], guest)
        guest.chmod(0o644)
        stderr = refused([*MACHINE, "-s", "2,virtio-net,tap0", "--kernel", guest, "net-noperm"],
                         netns, prefix=["unshare", "-m", "sh", "-c", script, "sh"],
                         env={**os.environ, "HVF_RUNTIME_DIR": str(private)})
    finally:
        shutil.rmtree(base)
    assert "no permission to open /dev/net/tun" in stderr
