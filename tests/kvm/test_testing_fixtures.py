# SPDX-License-Identifier: BSD-2-Clause
"""hvf.testing's fixtures on real KVM: machines built in-process, guests built from
source and booted."""

from __future__ import annotations

import pytest

from hvf.memory import MiB
from hvf.testing.fakes import cfg_read
from hvf.testing.plugin import GuestBuilder, HvfRunner, MachineFactory

pytestmark = pytest.mark.kvm

C_GUEST = """\
#include "libc.h"

int main(void)
{
	con_puts("hello from C\\n");
	return 3;
}
"""


def test_a_machine_from_a_command_line_and_a_config_tree(hvf_machine: MachineFactory) -> None:
    vm = hvf_machine(["-m", "64M", "-s", "0,hostbridge", "-s", "31,lpc"],
                     config={"memory": {"size": "128M"}, "cpus": 2})
    assert vm.memory.size == 128 * MiB and len(vm.vcpus) == 2
    assert cfg_read(vm, (0, 31, 0), 0, 4) == 0x7000_8086  # the LPC bridge
    assert vm.config.get("boot.kernel", "").endswith("exit.elf")  # none given
    assert hvf_machine().name != vm.name  # each its own control socket


def test_a_c_guest_from_text_runs(hvf_guest: GuestBuilder, hvf_run: HvfRunner) -> None:
    r = hvf_run.guest(hvf_guest(C_GUEST, suffix=".c"))
    assert (r.returncode, r.stdout) == ((3 << 1) | 1, "hello from C\n"), r.stderr
