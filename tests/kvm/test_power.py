# SPDX-License-Identifier: BSD-2-Clause
"""Power and reset, as bhyve reports them: 0 reset, 1 power off, and SIGTERM's button."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BASE_ARGS, popen_hvf, run_guest, stop, wait_for_text

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize(("action", "status", "how"), [
    (1, 0, "reset control register 0xCF9"),
    (2, 0, "keyboard controller reset line"),
    (3, 0, "system control port A"),
    (4, 1, "ACPI S5"),
])
def test_reset_and_poweroff(guests: dict[str, Path], action: int, status: int, how: str) -> None:
    r = run_guest(guests["power"], append=f"action={action}")
    assert r.stdout == f"action {action}\n", how
    assert r.returncode == status, f"{how}: {r.stderr}"


def test_sigterm_presses_the_acpi_power_button(guests: dict[str, Path]) -> None:
    proc = popen_hvf([*BASE_ARGS, "--kernel", str(guests["power"]), "--append", "action=5",
                      "powerbutton"])
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"action 5\n"
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 1  # the guest saw the button and powered off
        assert proc.stdout.read() == b"power button\n"
    finally:
        stop(proc)


def test_sigterm_without_acpi_stops_the_vm(guests: dict[str, Path], tmp_path: Path) -> None:
    """A guest that never enabled ACPI cannot hear the button: hvf stops (128 + SIGTERM)."""
    console = tmp_path / "com1.log"
    proc = popen_hvf([*BASE_ARGS, "-l", f"com1,file={console}", "--kernel",
                      str(guests["counter"]), "noacpi"], stdout=subprocess.DEVNULL)
    try:
        wait_for_text(console, "count 1", proc, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        stop(proc)
