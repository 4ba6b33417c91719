# SPDX-License-Identifier: BSD-2-Clause
"""The virtio-net control queue (§5.1.6.5), I/O thread, device lock held.

Each chain is a command: ``class``, ``command`` and its data (device-readable), then
one ``ack`` byte (device-writable) that gets VIRTIO_NET_OK or VIRTIO_NET_ERR. Served:
receive modes (CTRL_RX: promiscuous, all-multicast), the MAC filter tables and the
address (CTRL_MAC), the announcement acknowledgement (GUEST_ANNOUNCE) and the number
of queue pairs (MQ); a command whose feature was not negotiated, or whose data has the
wrong size, gets ERR.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hvf.plugins.net.spec import (
    CTRL_ANNOUNCE,
    CTRL_ANNOUNCE_ACK,
    CTRL_ERR,
    CTRL_MAC,
    CTRL_MAC_ADDR_SET,
    CTRL_MAC_TABLE_SET,
    CTRL_MQ,
    CTRL_MQ_VQ_PAIRS_SET,
    CTRL_OK,
    CTRL_RX,
    CTRL_RX_ALLMULTI,
    CTRL_RX_PROMISC,
    ETH_ADDR,
    F_CTRL_MAC_ADDR,
    F_CTRL_RX,
    F_GUEST_ANNOUNCE,
    F_MQ,
    S_ANNOUNCE,
    is_multicast,
)

if TYPE_CHECKING:
    from hvf.plugins.net.device import VirtioNet
    from hvf.plugins.virtio.queue import SplitQueue

#: The longest command taken (two full MAC tables and more fit).
MAX_COMMAND = 8192


def serve(device: VirtioNet, queue: SplitQueue) -> None:
    """Answer every command the driver made available."""
    served = False
    while True:
        queue.disable_notifications()
        while (chain := queue.pop()) is not None:
            served = True
            device.counters.ctrl_commands += 1
            if not chain.writable_length or chain.readable_length > MAX_COMMAND:
                device.counters.ctrl_errors += 1
                queue.push(chain, 0)
                continue
            command = b"".join(bytes(v) for v in chain.readable)
            ack = execute(device, command)
            if ack != CTRL_OK:
                device.counters.ctrl_errors += 1
            next(v for v in chain.writable if len(v))[0] = ack
            queue.push(chain, 1)
        if not queue.enable_notifications():
            break
    if served:
        device.interrupt_queue(device.control_index)


def execute(device: VirtioNet, command: bytes) -> int:
    """Carry out one command (class, command, data); the ack."""
    if len(command) < 2:
        return CTRL_ERR
    kind, code, data = command[0], command[1], command[2:]
    negotiated = device.negotiated
    if kind == CTRL_RX and negotiated & F_CTRL_RX:
        return _rx_mode(device, code, data)
    if kind == CTRL_MAC:
        if code == CTRL_MAC_TABLE_SET and negotiated & F_CTRL_RX:
            return _mac_tables(device, data)
        if code == CTRL_MAC_ADDR_SET and negotiated & F_CTRL_MAC_ADDR:
            if len(data) != ETH_ADDR or is_multicast(data) or not any(data):
                return CTRL_ERR
            device.net.mac = bytes(data)
            device.config_changed()
            return CTRL_OK
    if kind == CTRL_ANNOUNCE and code == CTRL_ANNOUNCE_ACK and negotiated & F_GUEST_ANNOUNCE:
        device.net.status &= ~S_ANNOUNCE
        device.config_changed()
        return CTRL_OK
    if kind == CTRL_MQ and code == CTRL_MQ_VQ_PAIRS_SET and negotiated & F_MQ:
        if len(data) != 2:
            return CTRL_ERR
        pairs = int.from_bytes(data, "little")
        if not 1 <= pairs <= device.pairs:
            return CTRL_ERR
        device.set_active_pairs(pairs)
        return CTRL_OK
    return CTRL_ERR


def _rx_mode(device: VirtioNet, code: int, data: bytes) -> int:
    if code not in (CTRL_RX_PROMISC, CTRL_RX_ALLMULTI) or len(data) != 1:
        return CTRL_ERR
    setattr(device.net.rx_filter, "promisc" if code == CTRL_RX_PROMISC else "allmulti",
            bool(data[0]))
    return CTRL_OK


def _mac_tables(device: VirtioNet, data: bytes) -> int:
    """Two tables, each a le32 count then that many addresses, filling ``data``."""
    tables: list[list[bytes]] = []
    offset = 0
    for _ in range(2):
        if offset + 4 > len(data):
            return CTRL_ERR
        (count,) = struct.unpack_from("<I", data, offset)
        offset += 4
        end = offset + count * ETH_ADDR
        if end > len(data):
            return CTRL_ERR
        tables.append([bytes(data[o : o + ETH_ADDR]) for o in range(offset, end, ETH_ADDR)])
        offset = end
    if offset != len(data):
        return CTRL_ERR
    device.net.rx_filter.set_tables(tables[0], tables[1])
    return CTRL_OK
