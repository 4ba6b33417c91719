# SPDX-License-Identifier: BSD-2-Clause
"""The virtio-net device's own state (the transport saves the queues): its address,
link status, the queue pairs in use, the receive filter the driver set through the
control queue, and the IPv4 address the guest was seen using (for announcing it)."""

from __future__ import annotations

import ipaddress

import attrs

from hvf.plugins.net.spec import S_ANNOUNCE, S_LINK_UP, format_mac, is_multicast, parse_mac
from hvf.snapshot_api import Fields, check_fields, field_flags, field_int

#: Addresses per MAC filter table; more turn the table into "accept all" (overflow).
MAC_TABLE_ENTRIES = 64


@attrs.define
class RxFilter:
    """Which received frames the driver wants (§5.1.6.5.1, .5.2). After reset the
    device is promiscuous, as QEMU's is: a driver without CTRL_RX cannot ask."""

    promisc: bool = True
    allmulti: bool = False
    unicast: list[bytes] = attrs.Factory(list)
    multicast: list[bytes] = attrs.Factory(list)
    unicast_overflow: bool = False
    multicast_overflow: bool = False

    def accepts(self, destination: bytes, mac: bytes) -> bool:
        if self.promisc or destination == mac:
            return True
        if is_multicast(destination):
            return (destination == b"\xff" * 6 or self.allmulti or self.multicast_overflow
                    or destination in self.multicast)
        return self.unicast_overflow or destination in self.unicast

    def set_tables(self, unicast: list[bytes], multicast: list[bytes]) -> None:
        self.unicast_overflow = len(unicast) > MAC_TABLE_ENTRIES
        self.multicast_overflow = len(multicast) > MAC_TABLE_ENTRIES
        self.unicast = [] if self.unicast_overflow else unicast
        self.multicast = [] if self.multicast_overflow else multicast


@attrs.define
class NetState:
    """Everything of the device's own that a snapshot carries."""

    mac: bytes
    status: int = S_LINK_UP
    active_pairs: int = 1
    rx_filter: RxFilter = attrs.Factory(RxFilter)
    #: The guest's IPv4 address, learnt from its ARP frames (None: not seen yet).
    guest_ipv4: str | None = None

    def to_fields(self) -> Fields:
        f = self.rx_filter
        return {"mac": format_mac(self.mac), "status": self.status,
                "active_pairs": self.active_pairs, "promisc": f.promisc,
                "allmulti": f.allmulti, "unicast": [format_mac(m) for m in f.unicast],
                "multicast": [format_mac(m) for m in f.multicast],
                "unicast_overflow": f.unicast_overflow,
                "multicast_overflow": f.multicast_overflow, "guest_ipv4": self.guest_ipv4}

    @classmethod
    def from_fields(cls, fields: Fields, max_pairs: int) -> NetState:
        """Rebuild for a device of ``max_pairs`` queue pairs; ``ValueError`` names a bad
        field."""
        check_fields(fields, ("mac", "status", "active_pairs", "promisc", "allmulti",
                              "unicast", "multicast", "unicast_overflow",
                              "multicast_overflow", "guest_ipv4"))
        mac = _mac(fields["mac"], "mac")
        if is_multicast(mac) or not any(mac):
            raise ValueError("saved field 'mac' is not a unicast address")
        status = field_flags(fields, "status", 16, S_LINK_UP | S_ANNOUNCE)
        pairs = field_int(fields, "active_pairs", 16)
        if not 1 <= pairs <= max_pairs:
            raise ValueError(f"saved field 'active_pairs' ({pairs}) is not 1 to {max_pairs}")
        flags = {}
        for name in ("promisc", "allmulti", "unicast_overflow", "multicast_overflow"):
            if type(fields[name]) is not bool:
                raise ValueError(f"saved field {name!r} is not a bool")
            flags[name] = fields[name]
        tables = {}
        for name in ("unicast", "multicast"):
            value = fields[name]
            if not isinstance(value, list) or len(value) > MAC_TABLE_ENTRIES:
                raise ValueError(f"saved field {name!r} is not a list of at most "
                                 f"{MAC_TABLE_ENTRIES} addresses")
            tables[name] = [_mac(m, name) for m in value]
        ipv4 = fields["guest_ipv4"]
        if ipv4 is not None:
            try:
                ipaddress.IPv4Address(ipv4)
            except (ValueError, TypeError):
                raise ValueError("saved field 'guest_ipv4' is not an IPv4 address") from None
        return cls(mac, status, pairs, RxFilter(**flags, **tables), ipv4)


def _mac(value: object, name: str) -> bytes:
    mac = parse_mac(value) if isinstance(value, str) else None
    if mac is None:
        raise ValueError(f"saved field {name!r} holds {value!r}, not a MAC address")
    return mac
