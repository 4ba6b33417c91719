# SPDX-License-Identifier: BSD-2-Clause
"""The ``hostbridge`` PCI device (and bhyve's ``amd_hostbridge`` alias)."""

from __future__ import annotations

from typing import Any

from hvf.errors import ConfigError
from hvf.plugins.pci.device import PciDevice

CLASS_HOST_BRIDGE = 0x060000
PCIE_CAPABILITY = 0x10
#: PCI Express capability: version 2, device/port type "root port" (4).
PCIE_FLAGS_ROOT_PORT_V2 = (4 << 4) | 2
PCIE_CAPABILITY_LENGTH = 60


def _id(config: dict[str, Any], key: str, legacy: str, default: int) -> int:
    value = config.get("pcireg", {}).get(key) if isinstance(config.get("pcireg"), dict) else None
    value = value if value is not None else config.get(legacy)
    if value is None:
        return default
    try:
        number = int(value, 0)
    except (TypeError, ValueError):
        raise ConfigError(f"hostbridge: invalid {key} '{value}'") from None
    if not 0 <= number <= 0xFFFF:
        raise ConfigError(f"hostbridge: {key} '{value}' is not a 16-bit ID")
    return number


class HostBridge(PciDevice):
    """A host bridge with a PCI Express root-port capability, as bhyve's."""

    def __init__(self, name: str, vendor: int, device: int) -> None:
        super().__init__(name)
        self.set_identity(vendor, device, CLASS_HOST_BRIDGE)
        body = bytearray(PCIE_CAPABILITY_LENGTH - 2)
        body[0:2] = PCIE_FLAGS_ROOT_PORT_V2.to_bytes(2, "little")
        self.add_capability(PCIE_CAPABILITY, bytes(body))


def create(*, vm: Any, slot: tuple[int, int, int], config: dict[str, Any]) -> HostBridge:
    name = "hostbridge@pci.{}.{}.{}".format(*slot)
    return HostBridge(
        name, _id(config, "vendor", "vendor", 0x1275), _id(config, "device", "devid", 0x1275)
    )


def create_amd(*, vm: Any, slot: tuple[int, int, int], config: dict[str, Any]) -> HostBridge:
    name = "hostbridge@pci.{}.{}.{}".format(*slot)
    return HostBridge(
        name, _id(config, "vendor", "vendor", 0x1022), _id(config, "device", "devid", 0x7432)
    )
