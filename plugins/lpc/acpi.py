# SPDX-License-Identifier: BSD-2-Clause
"""The LPC bus in ACPI: ``Device (ISA)`` and the legacy devices behind it, the
motherboard resources, ``\\_S5`` and the FADT's fixed hardware (PM blocks, SCI,
SMI_CMD, reset register), from the constants of the devices themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvf.acpi import aml, tables
from hvf.plugins.lpc import fwcfg, kbc, pm, reset, rtc
from hvf.plugins.lpc.bridge import LpcBridge
from hvf.plugins.pci import ECAM_BASE, ECAM_SIZE, ROOT_BRIDGE

if TYPE_CHECKING:
    from hvf.acpi import AcpiBuilder
    from hvf.vm import Machine

#: The PM I/O block the motherboard device claims (0x600-0x60F).
PM_BLOCK_LENGTH = 0x10
#: Written to 0xCF9 to reset: system reset (bit 1) plus reset CPU (bit 2).
RESET_VALUE = 0x06
#: The 8259s' edge/level control registers (in KVM's PIC).
ELCR = 0x4D0
#: Legacy devices KVM emulates in the kernel: 8259 PICs and 8254 PIT.
PIC_MASTER = 0x20
PIC_SLAVE = 0xA0
PIC_CASCADE_IRQ = 2
PIT = 0x40
PIT_PORTS = 4
PIT_IRQ = 0
RTC_IRQ = 8
#: fw_cfg's selector/data and DMA registers (0x510-0x51B).
FWCFG_PORTS = fwcfg.DMA_PORT + fwcfg.DMA_LENGTH - fwcfg.SELECTOR_PORT
#: _STA: present, enabled, functioning, hidden from the user interface.
STA_HIDDEN = 0x0B


def _device(name: str, hid: str, *resources: bytes) -> bytes:
    return aml.device(name, aml.name("_HID", aml.hardware_id(hid)),
                      aml.name("_CRS", aml.resource_template(*resources)))


def _port(base: int, length: int) -> bytes:
    return aml.io(base, base, 1, length)


def legacy_devices(vm: Machine) -> list[bytes]:
    """The devices behind the ISA bridge: RTC, keyboard, PICs, PIT and, when present,
    fw_cfg (the UART plugin describes COM1-COM4)."""
    devices = [
        _device("RTC", "PNP0B00", _port(rtc.INDEX_PORT, 2), aml.irq_noflags(RTC_IRQ)),
        _device("KBD", "PNP0303", _port(kbc.DATA_PORT, 1), _port(kbc.COMMAND_PORT, 1),
                aml.irq_noflags(kbc.KEYBOARD_IRQ)),
        _device("PIC", "PNP0000", _port(PIC_MASTER, 2), _port(PIC_SLAVE, 2),
                aml.irq_noflags(PIC_CASCADE_IRQ)),
        _device("TIMR", "PNP0100", _port(PIT, PIT_PORTS), aml.irq_noflags(PIT_IRQ)),
        _device("SYSR", "PNP0C02",
                _port(pm.PM_BASE, PM_BLOCK_LENGTH),
                _port(pm.SMI_CMD, 1),
                _port(reset.RESET_CONTROL_PORT, 1),
                _port(reset.PORT_A, 1),
                _port(ELCR, 2),
                aml.memory32_fixed(ECAM_BASE, ECAM_SIZE)),
    ]
    if fwcfg.find(vm) is not None:
        devices.append(aml.device(
            "FWCF",
            aml.name("_HID", aml.hardware_id("QEMU0002")),
            aml.name("_STA", STA_HIDDEN),
            aml.name("_CRS", aml.resource_template(_port(fwcfg.SELECTOR_PORT, FWCFG_PORTS))),
        ))
    return devices


def fixed_hardware(fadt: tables.Fadt) -> None:
    """The FADT fields of the PM block, SCI, SMI_CMD, RTC century and reset register."""
    fadt.sci_int = pm.SCI_IRQ
    fadt.smi_cmd = pm.SMI_CMD
    fadt.acpi_enable = pm.ACPI_ENABLE
    fadt.acpi_disable = pm.ACPI_DISABLE
    fadt.pm1a_evt_blk, fadt.pm1_evt_len = pm.PM1A_EVT, pm.PM1A_EVT_LEN
    fadt.pm1a_cnt_blk, fadt.pm1_cnt_len = pm.PM1A_CNT, pm.PM1A_CNT_LEN
    fadt.pm_tmr_blk, fadt.pm_tmr_len = pm.PM_TMR, pm.PM_TMR_LEN
    fadt.gpe0_blk, fadt.gpe0_blk_len = pm.GPE0, pm.GPE0_LEN
    fadt.century = rtc.CENTURY
    fadt.iapc_boot_arch |= tables.BOOT_LEGACY_DEVICES | tables.BOOT_8042
    fadt.flags |= tables.FADT_TMR_VAL_EXT | tables.FADT_RESET_REG_SUP
    fadt.flags &= ~tables.FADT_PWR_BUTTON  # the PM block's fixed-feature power button
    fadt.reset_reg = tables.Gas(tables.SPACE_SYSTEM_IO, 8, reset.RESET_CONTROL_PORT,
                                tables.ACCESS_BYTE)
    fadt.reset_value = RESET_VALUE


def describe(vm: Machine, acpi: AcpiBuilder) -> None:
    """Add the ISA bridge, ``\\_S5``, the FADT's fixed hardware and the SCI override."""
    lpc = next((d for d in vm.devices if isinstance(d, LpcBridge)), None)
    if lpc is None:
        return
    _bus, slot, function = lpc.address
    acpi.dsdt(aml.device("ISA", aml.name("_ADR", slot << 16 | function), *legacy_devices(vm)),
              scope=ROOT_BRIDGE)
    acpi.dsdt(aml.name("_S5", [pm.SLP_TYP_S5, pm.SLP_TYP_S5, 0, 0]), scope="\\")
    fixed_hardware(acpi.fadt)
    # The SCI is level-triggered, active high, on its own ISA IRQ.
    acpi.madt(tables.interrupt_override(
        pm.SCI_IRQ, pm.SCI_IRQ, tables.TRIGGER_LEVEL | tables.POLARITY_HIGH))
