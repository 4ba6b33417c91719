# SPDX-License-Identifier: BSD-2-Clause
"""The slirp back end: user-mode networking through libslirp, as bhyve (FreeBSD 14.1).

``-s 2,virtio-net,slirp[,hostfwd=RULE[;RULE...]][,restrict=off]`` gives the guest
libslirp's network, which needs no privilege: 10.0.2.0/24 with the host (gateway) at
10.0.2.2, DHCP leases from 10.0.2.15 and a DNS forwarder at 10.0.2.3, all answered by
the library. A guest connection to 10.0.2.2 reaches the host's loopback. Each
``hostfwd`` rule, ``[tcp|udp]:HOSTADDR:HOSTPORT-GUESTADDR:GUESTPORT`` (bhyve's and
QEMU's form; an empty host address means any, an empty guest address the DHCP
address), makes the stack listen on the host and forward what arrives to the guest.

As in bhyve the stack is *restricted* by default: the guest reaches the stack's own
services (DHCP) and answers forwarded connections, but opens none itself, not even to
the host. ``restrict=off`` lifts that (QEMU's option): the guest's TCP and UDP then go
out through host sockets, to 10.0.2.2 (the host's loopback), DNS through 10.0.2.3, and
the rest of the world.

libslirp (chosen over passt: it is what bhyve and QEMU use, it runs inside hvf with no
daemon to start and supervise, and its addresses and ``hostfwd`` rules are bhyve's) is
driven by one thread of its own, ``hvf slirp``, in the C loop of ``_slirp_build.py``.
Frames cross between that thread and the device through an AF_UNIX datagram socket
pair, one frame per datagram, as in bhyve: the device's end is :meth:`fileno`. While
the guest takes no frames they wait in the pair, up to its socket buffer (1 MiB asked
for, which the kernel doubles and caps at ``net.core.wmem_max``; about 2,700 small
frames), then are dropped and counted (``slirp_to_guest_dropped``): memory stays
bounded, and TCP sends again what was lost.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any

import attrs

from hvf.errors import ConfigError
from hvf.plugins.net.backend import NetBackend, Views, register_backend

log = logging.getLogger("hvf.net.slirp")

NETWORK = ipaddress.IPv4Network("10.0.2.0/24")
HOST = ipaddress.IPv4Address("10.0.2.2")
NAMESERVER = ipaddress.IPv4Address("10.0.2.3")
DHCP_START = ipaddress.IPv4Address("10.0.2.15")
DEFAULT_MTU = 1500
#: libslirp's largest interface MTU (IF_MTU_MAX); a device MTU above it is lowered to it.
MAX_MTU = 65521
#: Socket buffer asked for each direction of the frame pair (the kernel caps it).
FRAME_BUFFER = 1 << 20
#: The options the slirp back end reads from the device's configuration.
OPTIONS = ("hostfwd", "restrict")
RULE_FORM = "[tcp|udp]:HOSTADDR:HOSTPORT-GUESTADDR:GUESTPORT"

_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


@attrs.frozen
class HostForward:
    """One ``hostfwd`` rule: host ``host_addr:host_port`` to guest
    ``guest_addr:guest_port`` (``guest_addr`` None: the DHCP address)."""

    rule: str
    udp: bool
    host_addr: ipaddress.IPv4Address
    host_port: int
    guest_addr: ipaddress.IPv4Address | None
    guest_port: int


def _endpoint(text: str, rule: str, side: str, where: str) -> tuple[ipaddress.IPv4Address | None,
                                                                     int]:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: invalid hostfwd rule '{rule}': {why} "
                           f"(expected {RULE_FORM})")

    addr_text, sep, port_text = text.rpartition(":")
    if not sep:
        raise bad(f"no port in the {side} part '{text}'")
    try:
        addr = ipaddress.IPv4Address(addr_text) if addr_text else None
    except ValueError:
        raise bad(f"'{addr_text}' is not an IPv4 address") from None
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
            and 0 < int(port_text) < 65536):
        raise bad(f"'{port_text}' is not a port number (1-65535)")
    return addr, int(port_text)


def parse_hostfwd(spec: str, where: str) -> list[HostForward]:
    """The rules of a ``hostfwd`` value (separated by ``;``)."""
    rules = []
    for rule in spec.split(";"):
        proto, sep, rest = rule.partition(":")
        host, dash, guest = rest.partition("-")
        if proto not in ("tcp", "udp") or not sep or not dash:
            raise ConfigError(f"{where}: invalid hostfwd rule '{rule}' (expected {RULE_FORM})")
        host_addr, host_port = _endpoint(host, rule, "host", where)
        guest_addr, guest_port = _endpoint(guest, rule, "guest", where)
        if guest_addr is not None and (guest_addr not in NETWORK or guest_addr in (
                NETWORK.network_address, NETWORK.broadcast_address, HOST, NAMESERVER)):
            raise ConfigError(f"{where}: invalid hostfwd rule '{rule}': the guest address "
                              f"must be a guest's in {NETWORK} (not .0, .2, .3 or .255)")
        rules.append(HostForward(rule, proto == "udp", host_addr or ipaddress.IPv4Address(0),
                                 host_port, guest_addr, guest_port))
    return rules


def _bool_option(values: dict[str, str], key: str, default: bool, where: str) -> bool:
    value = values.get(key)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{where}: invalid {key} value '{value}' (on or off)")


def _library() -> Any:
    try:
        from hvf.plugins.net import _slirp
    except ImportError as e:
        raise ConfigError(f"the slirp network back end is not available: hvf was built "
                          f"without libslirp ({e}); install libslirp-dev and reinstall hvf") \
            from None
    return _slirp


class SlirpBackend(NetBackend):
    """A libslirp stack on its own thread; frames cross through a socket pair."""

    def __init__(self, forwards: list[HostForward], *, restricted: bool, mtu: int,
                 where: str) -> None:
        super().__init__("slirp", 1)
        self._module = _library()
        lib, ffi = self._module.lib, self._module.ffi
        self._device_end, self._stack_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stack: Any = ffi.NULL
        try:
            for end in (self._device_end, self._stack_end):
                end.setblocking(False)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FRAME_BUFFER)
            self._stack = lib.hvf_slirp_new(
                self._stack_end.fileno(), self._wake, int(restricted), int(NETWORK.network_address),
                int(NETWORK.netmask), int(HOST), int(DHCP_START), int(NAMESERVER), mtu)
            if self._stack == ffi.NULL:
                raise ConfigError(f"{where}: libslirp could not start its network")
            for forward in forwards:
                self._add_forward(forward, where)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._run, name="hvf slirp", daemon=True)
        self._thread.start()

    def _add_forward(self, forward: HostForward, where: str) -> None:
        guest = forward.guest_addr or DHCP_START
        if self._module.lib.hvf_slirp_add_hostfwd(self._stack, int(forward.udp),
                                                  int(forward.host_addr), forward.host_port,
                                                  int(guest), forward.guest_port) < 0:
            code = self._module.ffi.errno
            raise ConfigError(f"{where}: hostfwd rule '{forward.rule}': cannot listen on "
                              f"{forward.host_addr}:{forward.host_port} ({os.strerror(code)})")

    def _run(self) -> None:
        lib = self._module.lib
        failed = False
        while True:
            woken = lib.hvf_slirp_poll(self._stack)
            if woken < 0:
                if not failed:
                    log.error("slirp: poll failed: %s; retrying", os.strerror(-woken))
                failed = True
                time.sleep(0.1)
            elif woken and self._closing:
                return

    def fileno(self, pair: int) -> int:
        return self._device_end.fileno()

    def receive(self, pair: int, views: Views) -> int:
        return self._device_end.recvmsg_into(views, 0, socket.MSG_TRUNC)[0]

    def send(self, pair: int, views: Views) -> None:
        self._device_end.sendmsg(views)

    def stats(self) -> dict[str, Any]:
        stack = self._stack
        if stack == self._module.ffi.NULL:
            return {}
        counters: dict[str, Any] = {
            "slirp_to_guest": stack.to_guest,
            "slirp_to_guest_dropped": stack.to_guest_dropped,
            "slirp_from_guest": stack.from_guest,
            "slirp_from_guest_dropped": stack.from_guest_dropped,
            "slirp_guest_errors": stack.guest_errors,
        }
        if stack.guest_errors:
            counters["slirp_last_guest_error"] = self._module.ffi.string(
                stack.last_guest_error).decode(errors="replace")
        return counters

    def close(self) -> None:
        if self._thread is not None:
            self._closing = True
            os.eventfd_write(self._wake, 1)
            self._thread.join()
            self._thread = None
        if self._stack != self._module.ffi.NULL:
            self._module.lib.hvf_slirp_free(self._stack)
            self._stack = self._module.ffi.NULL
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
        self._device_end.close()
        self._stack_end.close()


def open_slirp(name: str, values: dict[str, str], pairs: int, where: str) -> SlirpBackend:
    """The slirp back end for a device configured with ``values`` (the device's own
    checked by the device: ``mtu`` is a number from 68)."""
    from hvf.plugins.net.options import DEVICE_KEYS  # options imports this module

    unknown = sorted(set(values) - DEVICE_KEYS - set(OPTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown slirp option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)} (slirp takes {', '.join(OPTIONS)})")
    if pairs != 1:
        raise ConfigError(f"{where}: the slirp back end has one queue pair, not {pairs}")
    spec = values.get("hostfwd")
    forwards = parse_hostfwd(spec, where) if spec is not None else []
    restricted = _bool_option(values, "restrict", True, where)
    mtu = min(int(values.get("mtu", DEFAULT_MTU)), MAX_MTU)
    return SlirpBackend(forwards, restricted=restricted, mtu=mtu, where=where)


register_backend("slirp", open_slirp)
