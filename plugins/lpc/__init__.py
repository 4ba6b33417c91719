# SPDX-License-Identifier: BSD-2-Clause
"""The LPC plugin: bhyve's ``lpc`` bridge and the legacy devices behind it (``-l``)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

import hvf
from hvf.acpi import build_for as build_acpi
from hvf.errors import ConfigError
from hvf.pluginmanager import lazy
from hvf.plugins.lpc import bridge, fwcfg
from hvf.plugins.lpc.acpi import describe as describe_acpi
from hvf.plugins.lpc.pm import PowerManagement

if TYPE_CHECKING:
    from hvf.acpi import AcpiBuilder
    from hvf.device import Device
    from hvf.registry import Registry
    from hvf.vm import Machine

#: COM1's I/O base, where the firmware's serial console goes.
COM1_PORT = 0x3F8


def _flag(name: str):  # type: ignore[no-untyped-def]
    def parse(conf: list[str]) -> dict[str, str]:
        if conf:
            raise ConfigError(f"{name} takes no options")
        return {name: "true"}

    return parse


def _when_set(key: str, module: str):  # type: ignore[no-untyped-def]
    """The factory of device module ``module``, which it imports only for a machine
    whose configuration sets ``lpc.KEY`` (the bridge asks every LPC device)."""
    create = lazy(f"{__name__}.{module}:create")

    def factory(*, vm: Machine, config: Any) -> Device | None:
        return None if config.get(f"lpc.{key}") is None else create(vm=vm, config=config)

    return factory


@hvf.hookimpl
def hvf_register_pci_devices(registry: Registry) -> None:
    registry.add("lpc", bridge.create, help="LPC (PCI-to-ISA) bridge 8086:7000, bus 0 only")


@hvf.hookimpl
def hvf_register_lpc_devices(registry: Registry) -> None:
    registry.add("bootrom", _when_set("bootrom", "bootrom"),
                 parse=lazy(f"{__name__}.bootrom:parse"),
                 help="boot firmware: bootrom,ROM[,VARS] (mapped below 4 GiB; implies fwcfg)")
    registry.add("pc-testdev", _when_set("pc-testdev", "pctestdev"), parse=_flag("pc-testdev"),
                 help="test-kernel ports: debug exit 0xF4, scratch 0xE0, IRQ lines 0x2000+n")
    registry.add("fwcfg", fwcfg.create, parse=fwcfg.parse,
                 help="QEMU's fw_cfg interface at 0x510-0x511, DMA at 0x514 (fwcfg[,qemu])")
    registry.add("debugcon", _when_set("debugcon.path", "debugcon"),
                 parse=lazy(f"{__name__}.debugcon:parse"),
                 help="debug console on port 0x402 (debugcon[,PATH|stdio])")


@hvf.hookimpl(trylast=True)
def hvf_machine_build(vm: Machine) -> None:
    bridge.attach_isa_devices(vm)  # after the PCI plugin has put the bridge on its bus


@hvf.hookimpl
def hvf_power_button(vm: Machine) -> bool | None:
    device = vm.device("pm")
    return device.press_power_button() if isinstance(device, PowerManagement) else None


def _e820_file(vm: Machine) -> bytes:
    return b"".join(struct.pack("<QQI", base, length, kind) for base, length, kind in vm.memory.e820())


@hvf.hookimpl
def hvf_machine_ready(vm: Machine) -> None:
    firmware_config = fwcfg.find(vm)
    if firmware_config is not None:
        from hvf import smbios

        firmware_config.add_file("etc/e820", lambda: _e820_file(vm))
        anchor, tables = smbios.build(vm.config)
        firmware_config.add_file("etc/smbios/smbios-anchor", anchor)
        firmware_config.add_file("etc/smbios/smbios-tables", tables)
        if vm.config.get("lpc.com1.path"):  # the firmware's console follows COM1
            firmware_config.add_file("etc/sercon-port", struct.pack("<H", COM1_PORT))
    if not any(isinstance(d, bridge.LpcBridge) for d in vm.devices):
        configured = sorted(vm.config.node("lpc"))
        devices = [name for name in configured if name in vm.plugins.lpc_devices]
        if devices:
            raise ConfigError(
                f"LPC device(s) {', '.join(devices)} configured, but there is no LPC bridge "
                "(add -s 31,lpc)"
            )


@hvf.hookimpl
def hvf_firmware_setup(vm: Machine) -> None:
    firmware_config = fwcfg.find(vm)
    if firmware_config is None:
        return
    fwcfg.add_bootorder(firmware_config, vm)
    if not vm.config.get("boot.kernel"):
        build_acpi(vm).to_fw_cfg(firmware_config)  # the firmware installs our ACPI tables


@hvf.hookimpl
def hvf_acpi_tables(vm: Machine, acpi: AcpiBuilder) -> None:
    describe_acpi(vm, acpi)
