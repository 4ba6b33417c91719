# SPDX-License-Identifier: BSD-2-Clause
"""Build hvf's own multiboot test guests.

Each guest ``NAME`` is ``tests/guests/NAME.S`` or ``tests/guests/NAME.c``, built by
:func:`hvf.testing.guests.build_guest` (with the runtime there: ``common.S``,
``guest.inc``, ``link.ld``, the C runtime) into ``out_dir/NAME.elf``.

Usable as a library (``build_guest``) or as a script::

    .venv/bin/python tests/guests/build.py OUT_DIR [NAME ...]
"""

from __future__ import annotations

import pathlib
import sys

from hvf.testing import guests
from hvf.testing.guests import GuestBuildError

__all__ = ["GUESTS", "GuestBuildError", "build_guest"]

GUEST_DIR = pathlib.Path(__file__).resolve().parent

GUESTS: tuple[str, ...] = (
    "hello",
    "io",
    "pciscan",
    "barmove",
    "smp",
    "triplefault",
    "strictio",
    "outloop",
    "halt",
    "serial_echo",
    "serial_loopback",
    "serial_tx",
    "serial_rx",
    "counter",
    "counter_smp",
    "counter_rep",
    "counter_dirty",
    "mmioexec",
    "power",
    "virtio_rng",
    "virtio_console",
    "virtio_blk",
    "lowload",
    "acpi_pmtimer",
    "com_echo",
    "randio",
    "nvme_disk",
    "virtio_net",
)

#: Guests linked somewhere other than 1 MiB.
_LINK_ADDRESSES: dict[str, int] = {"lowload": 0x8000}

# Files a guest pulls in with `.include` beyond the runtime (rebuild triggers).
_EXTRA_SOURCES: dict[str, tuple[str, ...]] = {
    name: ("serial_lib.S",)
    for name in ("serial_echo", "serial_loopback", "serial_tx", "serial_rx")
}
_EXTRA_SOURCES.update(
    {name: ("counter_lib.S",)
     for name in ("counter", "counter_smp", "counter_rep", "counter_dirty")}
)


def build_guest(name: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Build guest ``name`` into ``out_dir`` and return the ``.elf`` path.

    Nothing is rebuilt while the ``.elf`` is newer than its source, the files it
    includes, the runtime and the build code. Raises ``GuestBuildError`` (with the
    tool's output) on failure and ``ValueError`` for an unknown guest.
    """
    if name not in GUESTS:
        raise ValueError(f"unknown guest {name!r}; known: {', '.join(GUESTS)}")
    c_src = GUEST_DIR / f"{name}.c"
    source = c_src if c_src.is_file() else GUEST_DIR / f"{name}.S"
    depends = [GUEST_DIR / s for s in _EXTRA_SOURCES.get(name, ())]
    depends.append(pathlib.Path(__file__).resolve())
    return guests.build_guest(source, out_dir, depends=depends,
                              link_address=_LINK_ADDRESSES.get(name))


def main(argv: list[str]) -> int:
    if not argv:
        print(f"usage: {sys.argv[0]} OUT_DIR [NAME ...]", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(argv[0])
    for name in argv[1:] or GUESTS:
        try:
            print(build_guest(name, out_dir))
        except (GuestBuildError, ValueError) as exc:
            print(exc, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
