# SPDX-License-Identifier: BSD-2-Clause
"""Pages that device back ends write (virtqueue buffers, the used ring) are invisible to
KVM's dirty log: hvf marks them itself, so that a guest migrated in the middle of its
I/O finds every completion at the destination."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_migration import Proc, ctl, listening, show
from test_snapshot import MACHINE, lines_in, read, wait_until

pytestmark = pytest.mark.kvm


def test_a_streaming_virtio_guest_migrates_mid_io(guests: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """``virtio_console mode=counter rng=1``: a numbered line on the console, 64 bytes
    from virtio-rng between two, each waited for; the migration runs at 1 MB/s so that
    the back ends complete requests (writing buffers and used rings) between rounds.
    The numbers go on at the destination with none lost or repeated."""
    name, sock = "mig-virtio", tmp_path / "mig.sock"
    out_a, out_b = tmp_path / "console-a", tmp_path / "console-b"
    args = [*MACHINE, "-s", f"5,virtio-console,con=file={out_a}", "-s", "6,virtio-rnd",
            "--kernel", guests["virtio_console"], "--append", "mode=counter rng=1 msix=1", name]
    with Proc(args, tmp_path, "a") as src, \
            Proc(["--incoming", f"unix:{sock}", "-o", f"pci.0.5.0.port.con.path=file={out_b}"],
                 tmp_path, "b", runtime=tmp_path / "run-b") as dst:
        wait_until(lambda: lines_in(out_a) >= 100, 120, "100 console lines", src)
        wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
        figures = ctl(name, "migrate", f"unix:{sock}", "--bandwidth", 1, proc=src)
        show(figures, "virtio guest mid-I/O")
        assert figures["state"] == "migrated" and figures["rounds"] >= 2, figures
        assert src.wait(30) == 0
        wait_until(lambda: lines_in(out_b) >= 100, 120, "100 lines after the migration", dst)
        devices = ctl(name, "status", proc=dst)["devices"]
        assert devices["virtio-rnd@pci.0.6.0"]["kicks"] > 0, devices
        ctl(name, "poweroff", proc=dst)
        assert dst.wait(30) == 1
    numbers = [int(n) for n in (read(out_a) + read(out_b)).decode().splitlines()]
    assert numbers == list(range(len(numbers))), "a line was lost or repeated"
