# SPDX-License-Identifier: BSD-2-Clause
"""Numbers from the virtio 1.x network device (§5.1) and Ethernet that the device, its
back ends and its tests share."""

from __future__ import annotations

import re
import struct

TYPE_NET = 1

# Feature bits (§5.1.3).
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_CTRL_RX = 1 << 18
F_GUEST_ANNOUNCE = 1 << 21
F_MQ = 1 << 22
F_CTRL_MAC_ADDR = 1 << 23

# Configuration status bits.
S_LINK_UP = 1
S_ANNOUNCE = 2

#: struct virtio_net_config as offered: mac, status, max_virtqueue_pairs, mtu.
CONFIG = struct.Struct("<6sHHH")

#: struct virtio_net_hdr (VERSION_1: num_buffers always present): flags, gso_type,
#: hdr_len, gso_size, csum_start, csum_offset, num_buffers.
HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size  # 12
NUM_BUFFERS_OFFSET = 10

HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
GSO_ECN = 0x80

# Control queue (§5.1.6.5): class, command, data..., then the ack byte.
CTRL_OK, CTRL_ERR = 0, 1
CTRL_RX = 0
CTRL_RX_PROMISC, CTRL_RX_ALLMULTI = 0, 1
CTRL_MAC = 1
CTRL_MAC_TABLE_SET, CTRL_MAC_ADDR_SET = 0, 1
CTRL_ANNOUNCE = 3
CTRL_ANNOUNCE_ACK = 0
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0

# Ethernet.
ETH_HEADER = 14
VLAN_TAG = 4
ETH_ADDR = 6
ETHERTYPE_ARP = 0x0806
BROADCAST = b"\xff" * 6
#: The largest frame a segmentation offload produces (64 KiB plus headers).
MAX_GSO_FRAME = 65536 + ETH_HEADER + VLAN_TAG


_MAC_TEXT = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}")


def is_multicast(mac: bytes) -> bool:
    """Whether an Ethernet address is a group address (broadcast included)."""
    return bool(mac[0] & 1)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes | None:
    """``xx:xx:xx:xx:xx:xx`` as six bytes, or None when it is not one."""
    if not _MAC_TEXT.fullmatch(text):
        return None
    return bytes(int(p, 16) for p in text.split(":"))
