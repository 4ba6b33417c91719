# SPDX-License-Identifier: BSD-2-Clause
"""Boot order: which devices the firmware tries first, from their ``bootindex=N``.

A device the firmware can boot from (a disk front end, say) takes ``bootindex=N`` in its
configuration and answers :meth:`hvf.device.Device.boot_entries` with a
:class:`BootEntry`: the index and the device's OpenFirmware-style path, the way SeaBIOS
names the drives it finds. For a PCI function that is :func:`pci_path` plus, for
controllers with several drives, the drive's own nodes:

* virtio-blk: ``pci_path(bdf, "scsi", "disk@0,0")``; SeaBIOS looks for
  ``/pci@i0cf8/*@S``;
* NVMe: ``pci_path(bdf, "nvme", "namespace@1,0")``; SeaBIOS looks for ``/pci@i0cf8/*@S``;
* AHCI, the disk or CD on port P: ``pci_path(bdf, "sata", f"drive@{P:x}", "disk@0")``;
  SeaBIOS looks for ``/pci@i0cf8/*@S/drive@P/disk@0``.

(S is the slot in hex, ``,F`` follows it for a function other than 0; SeaBIOS's ``*``
matches any node name, and a bootorder line matches when the pattern is a prefix of it
ending at a ``/``, so the drive's nodes after a PCI-only pattern do no harm.)

The LPC plugin's fw_cfg turns every entry into SeaBIOS's ``bootorder`` file
(:func:`bootorder_file`): one path per line, lowest index first. Listed devices come
first; the firmware tries the rest after them, in its own order (there is no ``HALT``
line: as QEMU without ``-boot strict=on``). Among hard disks SeaBIOS boots the first one
listed (it becomes drive 0x80).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from hvf.errors import ConfigError

#: The root of PCI bus 0 in OpenFirmware device paths (config mechanism #1 at 0xCF8).
PCI_ROOT = "/pci@i0cf8"
#: Largest ``bootindex`` (QEMU's: a non-negative 32-bit int).
MAX_BOOTINDEX = (1 << 31) - 1


@attrs.frozen
class BootEntry:
    """One bootable device: its ``bootindex``, its device path and its name (for
    messages)."""

    index: int = attrs.field(validator=attrs.validators.in_(range(MAX_BOOTINDEX + 1)))
    path: str = attrs.field()
    owner: str

    @path.validator
    def _check_path(self, attribute: object, path: str) -> None:
        if not path.startswith("/") or not path.isascii() or not path.isprintable() \
                or " " in path:
            raise ValueError(f"boot path {path!r}: printable ASCII from '/', no spaces")


def parse_bootindex(value: str | None, where: str) -> int | None:
    """The ``bootindex`` option's value (None when not given); ``ConfigError`` naming
    ``where`` for anything but a decimal from 0 to 2^31-1."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or int(value) > MAX_BOOTINDEX:
        raise ConfigError(f"{where}: bootindex '{value}' is not a number from 0 to "
                          f"{MAX_BOOTINDEX}")
    return int(value)


def pci_path(bdf: tuple[int, int, int], name: str, *nodes: str) -> str:
    """The path of PCI function ``bdf`` (bus, slot, function) as ``name@S[,F]``, then
    ``nodes`` below it: ``pci_path((0, 4, 0), "scsi", "disk@0,0")`` is
    ``/pci@i0cf8/scsi@4/disk@0,0``. A root bus other than 0 is ``/pci@i0cf8,B``."""
    bus, slot, function = bdf
    root = PCI_ROOT if bus == 0 else f"{PCI_ROOT},{bus:x}"
    unit = f"{slot:x}" if function == 0 else f"{slot:x},{function:x}"
    return "/".join((root, f"{name}@{unit}", *nodes))


def bootorder_file(entries: Iterable[BootEntry]) -> bytes:
    """SeaBIOS's ``bootorder``: the paths by index, one a line, NUL-terminated (as
    QEMU writes it); empty for no entries. Two devices with one index are refused
    (``ConfigError`` naming both)."""
    by_index: dict[int, BootEntry] = {}
    for entry in entries:
        other = by_index.setdefault(entry.index, entry)
        if other is not entry:
            raise ConfigError(f"bootindex {entry.index} is given to both {other.owner} "
                              f"and {entry.owner}")
    if not by_index:
        return b""
    lines = [by_index[index].path for index in sorted(by_index)]
    return "\n".join(lines).encode("ascii") + b"\0"
