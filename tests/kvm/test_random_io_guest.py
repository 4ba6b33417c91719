# SPDX-License-Identifier: BSD-2-Clause
"""Random port I/O from a real guest (tests/guests/randio.c) at every built-in device:
hvf neither crashes nor logs a traceback, and the guest, having set COM1 up again after
the run reprogrammed it at random, prints its last line there and exits 0."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import run_hvf

pytestmark = pytest.mark.kvm

#: Accesses per run: ~60 us each on kvm_pvm (an exit, then the device model in Python).
ACCESSES = 50_000


@pytest.mark.parametrize("seed", [1, 0xC0FFEE])
def test_random_port_io_at_every_device(guests: dict[str, Path], tmp_path: Path,
                                        seed: int) -> None:
    com1, debug = tmp_path / "com1.out", tmp_path / "debugcon.out"  # random bytes: files
    r = run_hvf(["-s", "0,hostbridge", "-s", "2,uart", "-s", "3,virtio-rnd", "-s", "31,lpc",
                 "-l", "pc-testdev", "-l", "fwcfg", "-l", f"debugcon,{debug}",
                 "-l", f"com1,file={com1}", "--kernel", guests["randio"],
                 "--append", f"n={ACCESSES} seed={seed}", "randio"], timeout=300)
    done = f"randio done {ACCESSES} accesses"
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])  # the guest's exit 0
    assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr, r.stderr
    for path, newline in ((debug, "\n"), (com1, "\r\n")):
        text = path.read_bytes().decode("latin-1")
        match = re.search(rf"{newline}{done} \((\d+) writes\) seed {seed}{newline}$", text)
        assert match, (path.name, text[-300:])
    assert ACCESSES // 3 < int(match.group(1)) < ACCESSES * 2 // 3  # about half write
    assert "unhandled" in r.stderr  # it did reach around the devices' ranges
