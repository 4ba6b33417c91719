# SPDX-License-Identifier: BSD-2-Clause
"""The test device, tested as its third-party author would: with hvf.testing's fixtures
and accessors and hvf's public API only."""

from __future__ import annotations

import pytest

import hvf_testplugin
from hvf.plugins.pci import PciBus
from hvf.testing.fakes import (
    Buses,
    FakeVm,
    cfg_read,
    cfg_write,
    inp,
    mmio_read,
    mmio_write,
    outp,
)
from hvf.testing.plugin import GuestBuilder, HvfRunner, MachineFactory

BDF = (0, 3, 0)

#: Finds the device at 00:03.0, reads the magic through BAR0 (I/O), writes the register
#: there and reads it back through BAR1 (memory); returns 0 when it matched.
GUEST = """\
	.include "guest.inc"
	.text
	.globl	main
main:
	movl	$(3 << 11), %ebx		/* 00:03.0 */
	xorl	%ecx, %ecx
	call	pci_cfg_read
	PUTS_LIT "id "
	PUT_HEX	%eax, 8
	movl	$0x10, %ecx
	call	pci_cfg_read			/* BAR0: I/O */
	andl	$~3, %eax
	movl	%eax, %edx
	inl	%dx, %eax
	PUTS_LIT " magic "
	PUT_HEX	%eax, 8
	addl	$4, %edx
	movl	$0x5a5aa5a5, %eax
	outl	%eax, %dx
	movl	$0x14, %ecx
	call	pci_cfg_read			/* BAR1: 32-bit memory */
	andl	$~0xf, %eax
	movl	4(%eax), %eax
	PUTS_LIT " register "
	PUT_HEX	%eax, 8
	PUTS_LIT "\\n"
	subl	$0x5a5aa5a5, %eax
	ret
"""


def bars(vm: Buses) -> tuple[int, int]:
    """The I/O port and memory address the device's BARs were given."""
    return cfg_read(vm, BDF, 0x10, 4) & ~0x3, cfg_read(vm, BDF, 0x14, 4) & ~0xF


def check_registers(vm: Buses) -> None:
    assert cfg_read(vm, BDF, 0x00, 4) == 0x0001_1DD1
    assert cfg_read(vm, BDF, 0x08, 4) >> 8 == 0xFF0000
    io, mem = bars(vm)
    assert inp(vm, io, 4) == mmio_read(vm, mem, 4) == hvf_testplugin.MAGIC
    assert inp(vm, io, 2) == hvf_testplugin.MAGIC & 0xFFFF
    outp(vm, io + 4, 4, 0x1234_5678)
    assert mmio_read(vm, mem + 4, 4) == 0x1234_5678
    mmio_write(vm, mem + 4, 4, 0xCAFE_F00D)
    assert inp(vm, io + 4, 4) == 0xCAFE_F00D
    cfg_write(vm, BDF, 0x04, 2, 0)  # decoding off: the BARs answer no more
    assert vm.pio.lookup(io) is None and vm.mmio.lookup(mem) is None


def test_registers_on_a_fake_machine() -> None:
    vm = FakeVm()
    bus = PciBus()
    vm.attach(bus)
    bus.add(BDF, hvf_testplugin.create(vm=vm, slot=BDF, config={}))
    bus.assign_resources(enable_decoding=True)
    check_registers(vm)


def test_the_register_starts_as_configured() -> None:
    vm = FakeVm({"pci.0.3.0.register": "0x5a5a"})
    bus = PciBus()
    vm.attach(bus)
    bus.add(BDF, hvf_testplugin.create(vm=vm, slot=BDF, config={}))
    bus.assign_resources(enable_decoding=True)
    assert inp(vm, bars(vm)[0] + 4, 4) == 0x5A5A


def test_hvf_builds_it_from_the_command_line(hvf_machine: MachineFactory) -> None:
    vm = hvf_machine(["-s", "0,hostbridge", "-s", "3,testdev"])
    assert isinstance(vm.device("testdev@pci.0.3.0"), hvf_testplugin.TestDevice)
    check_registers(vm)


def test_hvf_builds_it_from_a_config_tree(hvf_machine: MachineFactory) -> None:
    slots = {"0": {"0": {"device": "hostbridge"}}, "3": {"0": {"device": "testdev"}}}
    vm = hvf_machine(config={"pci": {"0": slots}})
    check_registers(vm)


@pytest.mark.kvm
def test_a_guest_drives_it(hvf_guest: GuestBuilder, hvf_run: HvfRunner) -> None:
    elf = hvf_guest(GUEST, name="testdev")
    r = hvf_run.guest(elf, "-s", "3,testdev")
    assert r.stdout == "id 00011dd1 magic 21465648 register 5a5aa5a5\n", r.stderr
    assert r.returncode == 1  # main returned 0: (0 << 1) | 1


def test_hvf_lists_it(hvf_run: HvfRunner) -> None:
    r = hvf_run(["-s", "help"])
    assert r.returncode == 0
    assert "testdev" in r.stdout
