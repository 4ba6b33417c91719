# SPDX-License-Identifier: BSD-2-Clause
"""Frames as lists of views of guest RAM (a descriptor chain's buffers): reading a few
bytes at an offset, the views past a header, patching bytes in place; and the frames
the device makes itself (a gratuitous ARP announcing the guest)."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from hvf.plugins.net.spec import BROADCAST, ETH_HEADER, ETHERTYPE_ARP

Views = Sequence[memoryview]

_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
ARP_REQUEST = 1
#: A reverse ARP "request reverse", QEMU's announcement where no IPv4 address is known.
ETHERTYPE_RARP = 0x8035
RARP_REQUEST_REVERSE = 3
MIN_FRAME = 60


def peek(views: Views, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``offset`` of the concatenated views."""
    out = bytearray()
    for view in views:
        size = len(view)
        if offset >= size:
            offset -= size
            continue
        out += view[offset : offset + length - len(out)]
        offset = 0
        if len(out) == length:
            break
    return bytes(out)


def skip(views: Views, count: int) -> list[memoryview]:
    """The views after their first ``count`` bytes."""
    rest: list[memoryview] = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        rest.append(view[count:] if count else view)
        count = 0
    return rest


def patch(views: Views, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of the concatenated views (which hold it)."""
    done = 0
    for view in views:
        size = len(view)
        if offset >= size:
            offset -= size
            continue
        count = min(size - offset, len(data) - done)
        view[offset : offset + count] = data[done : done + count]
        done += count
        offset = 0
        if done == len(data):
            return


def arp_sender(frame_head: bytes, mac: bytes) -> str | None:
    """The IPv4 address an ARP frame from ``mac`` claims as its own, or None."""
    if len(frame_head) < ETH_HEADER + _ARP.size or frame_head[6:12] != mac:
        return None
    if int.from_bytes(frame_head[12:14], "big") != ETHERTYPE_ARP:
        return None
    htype, ptype, hlen, plen, _op, sha, spa, _tha, _tpa = _ARP.unpack_from(frame_head, ETH_HEADER)
    if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4) or sha != mac or not any(spa):
        return None
    return str(ipaddress.IPv4Address(spa))


def announcement(mac: bytes, ipv4: str | None) -> bytes:
    """A broadcast frame from ``mac`` so that switches and neighbours relearn where it
    is: a gratuitous ARP request for ``ipv4``, or a RARP without one."""
    if ipv4 is None:
        body = _ARP.pack(1, 0x0800, 6, 4, RARP_REQUEST_REVERSE, mac, bytes(4), mac, bytes(4))
        kind = ETHERTYPE_RARP
    else:
        ip = ipaddress.IPv4Address(ipv4).packed
        body = _ARP.pack(1, 0x0800, 6, 4, ARP_REQUEST, mac, ip, bytes(6), ip)
        kind = ETHERTYPE_ARP
    return (BROADCAST + mac + kind.to_bytes(2, "big") + body).ljust(MIN_FRAME, b"\0")
