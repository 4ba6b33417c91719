# SPDX-License-Identifier: BSD-2-Clause
"""Test tooling for hvf and its plugins' authors (not part of the VMM).

* :mod:`hvf.testing.plugin`: the pytest plugin (fixtures ``hvf_guest``, ``hvf_run``,
  ``hvf_machine``, ``hvf_runtime_dir``; the ``kvm`` marker), loaded through the
  ``pytest11`` entry point wherever hvf is installed;
* :mod:`hvf.testing.guests`: building multiboot test guests, and their runtime;
* :mod:`hvf.testing.process`: running hvf as a user would (re-exported here);
* :mod:`hvf.testing.fakes`: a fake machine, and the guest's port, MMIO and PCI
  configuration accesses, for driving a device's registers from the host side;
* :mod:`hvf.testing.virtio`: the guest's side of virtio (a split virtqueue's driver,
  a virtio-pci function's registers), on top of those accesses;
* :mod:`hvf.testing.guestkit`: a real Linux guest (``python -m hvf.testing.guestkit``);
* :mod:`hvf.testing.bootdisk`: disk images and ISOs whose boot program checks the
  firmware's int 13h disk access (for a disk front end's SeaBIOS boot tests);
* :mod:`hvf.testing.grubdisk`: the demo's GRUB disk (``python -m hvf.testing.grubdisk``).
"""

from hvf.testing.process import (
    BASE_ARGS,
    popen_hvf,
    raw_pty,
    run_guest,
    run_hvf,
    stop,
    wait_for_text,
)

__all__ = ["BASE_ARGS", "popen_hvf", "raw_pty", "run_guest", "run_hvf", "stop",
           "wait_for_text"]
