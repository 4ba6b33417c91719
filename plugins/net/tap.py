# SPDX-License-Identifier: BSD-2-Clause
"""The tap back end: a Linux tap interface through ``/dev/net/tun``.

The tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (and IFF_MULTI_QUEUE, one
descriptor per queue pair, for ``queues=N``) and a 12-byte vnet header
(TUNSETVNETHDRSZ: virtio 1.x's ``virtio_net_hdr`` with ``num_buffers``), so checksum
and segmentation offloads pass both ways: the guest's partial checksums and TSO
frames go to the kernel as they are, and TUNSETOFFLOAD tells the kernel which the
guest takes in return (GUEST_CSUM, GUEST_TSO4/6; offered only when the tap accepts
them). A tap that does not exist is created, brought up as bhyve does, and goes away
when hvf closes it; a tap that exists (persistent, made with ``ip tuntap add``) is
attached to and stays. The kernel keeps a frame queue per descriptor
(``txqueuelen`` frames): while the guest posts no receive buffers hvf stops reading
and the kernel drops, counting them in the tap's ``tx_dropped``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from pathlib import Path
from typing import Any

from hvf.errors import ConfigError
from hvf.plugins.net.backend import NetBackend, Views, register_backend
from hvf.plugins.net.spec import (
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_HOST_TSO4,
    F_HOST_TSO6,
    HEADER_SIZE,
)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")

#: virtio feature bits and the TUNSETOFFLOAD flags that let the kernel send them.
_GUEST_OFFLOADS = ((F_GUEST_CSUM, TUN_F_CSUM), (F_GUEST_TSO4, TUN_F_TSO4),
                   (F_GUEST_TSO6, TUN_F_TSO6))


def valid_ifname(name: str) -> bool:
    """Whether Linux accepts ``name`` for an interface (dev_valid_name)."""
    return (0 < len(name.encode()) < IFNAMSIZ and name not in (".", "..")
            and not any(c in name for c in "/:") and not any(c.isspace() for c in name))


def interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class TapBackend(NetBackend):
    """An attached tap interface, one non-blocking descriptor per queue pair."""

    vnet_header = True
    frame_fd = True
    host_offloads = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6

    def __init__(self, ifname: str, fds: list[int], *, created: bool) -> None:
        super().__init__(f"tap {ifname}", len(fds))
        self.ifname = ifname
        self.fds = fds
        #: hvf made the interface (it disappears once the last descriptor closes).
        self.created = created
        self._attached = [True] * len(fds)
        self.guest_offloads = self._probe_offloads()
        self.set_offloads(0)

    def _probe_offloads(self) -> int:
        """The F_GUEST_* bits the kernel's tap can send (TUNSETOFFLOAD accepts)."""
        offered = 0
        flags = 0
        for feature, flag in _GUEST_OFFLOADS:
            try:
                fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, flags | flag)
            except OSError:
                break
            flags |= flag
            offered |= feature
        return offered

    def fileno(self, pair: int) -> int:
        return self.fds[pair]

    def receive(self, pair: int, views: Views) -> int:
        return os.readv(self.fds[pair], views)

    def send(self, pair: int, views: Views) -> None:
        os.writev(self.fds[pair], views)

    def set_offloads(self, guest_features: int) -> None:
        flags = sum(flag for feature, flag in _GUEST_OFFLOADS if guest_features & feature)
        fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, flags)

    def set_active_pairs(self, count: int) -> None:
        if len(self.fds) == 1:
            return
        for pair, fd in enumerate(self.fds):
            attach = pair < count
            if attach != self._attached[pair]:
                flag = IFF_ATTACH_QUEUE if attach else IFF_DETACH_QUEUE
                fcntl.ioctl(fd, TUNSETQUEUE, _IFREQ.pack(b"", flag))
                self._attached[pair] = attach

    def stats(self) -> dict[str, Any]:
        counters = {}
        base = Path("/sys/class/net") / self.ifname / "statistics"
        for name in ("tx_dropped", "rx_dropped"):  # the host's view: tx is towards hvf
            try:
                counters[f"tap_{name}"] = int((base / name).read_text())
            except (OSError, ValueError):
                pass
        return counters

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _set_up(ifname: str) -> None:
    """Bring the interface up (IFF_UP), as bhyve does; left alone when not allowed."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = _IFREQ.pack(ifname.encode(), 0)
        flags = _IFREQ.unpack(fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        if not flags & IFF_UP:
            try:
                fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _IFREQ.pack(ifname.encode(), flags | IFF_UP))
            except PermissionError:
                pass


def _open_queue(ifname: str, flags: int, where: str, existed: bool) -> int:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{where}: {TUN_DEVICE} does not exist (is the tun module "
                          f"loaded?)") from None
    except PermissionError as e:
        raise ConfigError(f"{where}: no permission to open {TUN_DEVICE} ({e.strerror}); "
                          f"a tap needs root or CAP_NET_ADMIN") from None
    try:
        features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
        if not features & IFF_VNET_HDR or (flags & IFF_MULTI_QUEUE
                                           and not features & IFF_MULTI_QUEUE):
            raise ConfigError(f"{where}: this kernel's tap lacks vnet headers or multiqueue")
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(ifname.encode(), flags))
    except OSError as e:
        os.close(fd)
        raise ConfigError(_refusal(ifname, e.errno, where, existed,
                                   bool(flags & IFF_MULTI_QUEUE))) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(ifname: str, code: int | None, where: str, existed: bool, multi: bool) -> str:
    if code == errno.EBUSY:
        return f"{where}: tap '{ifname}' is busy (another process has it open)"
    if code == errno.EPERM:
        return (f"{where}: no permission to {'attach to' if existed else 'create'} tap "
                f"'{ifname}' (needs CAP_NET_ADMIN, or to be the tap's owner)")
    if code == errno.EINVAL and existed:
        return (f"{where}: '{ifname}' exists but is not a tap that can be opened "
                f"{'multi' if multi else 'single'}-queue")
    return f"{where}: cannot open tap '{ifname}': {os.strerror(code or 0)}"


def open_tap(name: str, values: dict[str, str], pairs: int, where: str) -> TapBackend:
    """The tap ``name`` with ``pairs`` queues, created when missing."""
    if not valid_ifname(name):
        raise ConfigError(f"{where}: unknown network back end '{name}' (not a tap "
                          f"interface name, nor slirp)")
    existed = interface_exists(name)
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if pairs > 1 else 0)
    fds: list[int] = []
    try:
        for _ in range(pairs):
            fds.append(_open_queue(name, flags, where, existed))
        fcntl.ioctl(fds[0], TUNSETVNETHDRSZ, struct.pack("i", HEADER_SIZE))
        _set_up(name)
        return TapBackend(name, fds, created=not existed)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


register_backend("tap", open_tap)
