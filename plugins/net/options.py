# SPDX-License-Identifier: BSD-2-Clause
"""``-s S,virtio-net,BACKEND[,mac=xx:xx:xx:xx:xx:xx][,mtu=N][,queues=N]``: bhyve's
syntax and bhyve_config(5)'s names (``pci.B.S.F.backend``, ``.mac``, ``.mtu``; hvf
adds ``.queues`` and bhyve's optional ``.type``), and the device made from them.

Without ``mac=`` the address is bhyve's stable one: the FreeBSD Foundation's OUI
58:9c:fc followed by the first three bytes of MD5("SLOT-FUNC-VMNAME") (older bhyve
used NetApp's 00:a0:98), so a VM keeps its address across runs and restores.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from hvf.errors import ConfigError
from hvf.plugins.net import slirp, tap  # noqa: F401  (register their back ends)
from hvf.plugins.net.backend import open_backend
from hvf.plugins.net.device import VirtioNet
from hvf.plugins.net.spec import is_multicast, parse_mac

if TYPE_CHECKING:
    from hvf.vm import Machine

OUI = bytes.fromhex("589cfc")
MIN_MTU, MAX_MTU = 68, 65535
MAX_QUEUE_PAIRS = 16
#: The device's own keys; a back end may take others (slirp's hostfwd, say).
DEVICE_KEYS = frozenset({"device", "backend", "type", "mac", "mtu", "queues"})


def parse(conf: list[str]) -> dict[str, str]:
    """``BACKEND[,KEY=VALUE...]`` as configuration values (``backend``, ``mac``, ...)."""
    if not conf or not conf[0] or "=" in conf[0]:
        raise ConfigError("virtio-net needs a back end first (e.g. virtio-net,tap0)")
    values = {"backend": conf[0]}
    for option in conf[1:]:
        key, sep, value = option.partition("=")
        if not sep or not key or "." in key:
            raise ConfigError(f"virtio-net: '{option}' is not KEY=VALUE")
        values[key] = value
    return values


def default_mac(vm_name: str, slot: int, function: int) -> bytes:
    """bhyve's generated address for the function at ``slot``.``function`` of ``vm_name``."""
    digest = hashlib.md5(f"{slot}-{function}-{vm_name}".encode(), usedforsecurity=False)
    return OUI + digest.digest()[:3]


def _number(values: dict[str, str], key: str, low: int, high: int, where: str) -> int | None:
    text = values.get(key)
    if text is None:
        return None
    if not text.isdigit() or not low <= int(text) <= high:
        raise ConfigError(f"{where}: {key}= takes {low} to {high}, not '{text}'")
    return int(text)


def create(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> VirtioNet:
    where = "virtio-net@pci.{}.{}.{}".format(*slot)
    values = {k: v for k, v in config.items() if isinstance(v, str)}
    text = values.get("mac")
    if text is None:
        mac = default_mac(vm.config.get("name") or "", slot[1], slot[2])
    else:
        parsed = parse_mac(text)
        if parsed is None or is_multicast(parsed) or not any(parsed):
            raise ConfigError(f"{where}: invalid MAC address '{text}' (give a unicast "
                              f"xx:xx:xx:xx:xx:xx)")
        mac = parsed
    mtu = _number(values, "mtu", MIN_MTU, MAX_MTU, where)
    pairs = _number(values, "queues", 1, MAX_QUEUE_PAIRS, where) or 1
    backend = open_backend(values, pairs, where)
    try:
        return VirtioNet(where, backend, mac, mtu=mtu)
    except BaseException:
        backend.close()
        raise
