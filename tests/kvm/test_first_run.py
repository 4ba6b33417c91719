# SPDX-License-Identifier: BSD-2-Clause
"""A first run that ends in success: the README's first example, run as written, boots
the guest that ``python -m hvf.testing.guests hello`` builds; the demo says what it
shows and how to leave, and hvf's log stays out of its console."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PVM

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"


def readme_blocks() -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)


@pytest.fixture
def venv() -> Path:
    if not (VENV_BIN / "hvf").exists():
        pytest.skip("the README's example runs hvf from .venv/bin, and there is none here")
    return VENV_BIN


def test_the_readme_first_example_runs_as_written(venv: Path, tmp_path: Path) -> None:
    script, expected = readme_blocks()[:2]
    assert 'export PATH="$PWD/.venv/bin:$PATH"' in script
    assert "python -m hvf.testing.guests hello" in script
    # The suite runs once setup has been done; everything after it runs as written.
    script = script.replace("scripts/setup\n", "")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path),
           "PATH": "/usr/local/bin:/usr/bin:/bin"}  # no .venv/bin: the script adds it
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    elf = tmp_path / "hvf" / "guests" / "hello.elf"
    assert r.returncode == 1, r.stderr  # the guest's exit value 0: "powered off"
    assert r.stdout == expected.replace("/home/you/.cache", str(tmp_path)), r.stderr
    assert elf.is_file()


def test_building_guests_by_name_or_file(venv: Path, tmp_path: Path) -> None:
    python = str(venv / "python")
    r = subprocess.run([python, "-m", "hvf.testing.guests", "hello", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, f"{tmp_path / 'hello.elf'}\n"), r.stderr
    source = tmp_path / "mine.S"
    source.write_text('\t.include "guest.inc"\n\t.text\n\t.globl main\nmain:\n\tret\n')
    r = subprocess.run([python, "-m", "hvf.testing.guests", str(source), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, f"{tmp_path / 'out' / 'mine.elf'}\n"), r.stderr
    r = subprocess.run([python, "-m", "hvf.testing.guests", "nosuch"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no sample guest 'nosuch' (samples: hello)" in r.stderr


@pytest.mark.skipif(not PVM, reason="off kvm_pvm the demo boots Debian's kernel, which "
                    "it fetches with apt; this test drives the SeaBIOS demo")
def test_the_demo_says_what_it_shows_and_how_to_leave(
    venv: Path, hvf_runtime_dir: Path,
) -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([str(ROOT / "scripts" / "demo")], stdin=slave, stdout=slave,
                                stderr=slave, env={**os.environ})
    finally:
        os.close(slave)
    terminal = bytearray()
    quit_sent = False
    ctl: subprocess.CompletedProcess[str] | None = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the demo and hvf are gone
                    break
                terminal += data
            if not quit_sent and b"GNU GRUB" in terminal:  # GRUB's menu, from the disk
                ctl = subprocess.run([str(venv / "hvf"), "ctl", "--vm", "demo", "status"],
                                     capture_output=True, text=True, timeout=60)
                os.write(master, b"\x01x")  # Ctrl-A x, as the demo says
                quit_sent = True
            if proc.poll() is not None and not select.select([master], [], [], 0.1)[0]:
                break
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = terminal.decode(errors="replace").replace("\r\n", "\n")
    flat = " ".join(text.split())  # the demo's messages are folded to the terminal
    assert quit_sent, text
    assert ctl is not None and ctl.returncode == 0, ctl
    assert ctl.stdout.startswith("demo: running"), ctl  # the name the demo tells of
    assert status == 130, text
    assert "to leave at any time: Ctrl-A x" in flat
    assert "hvf ctl --vm demo poweroff" in flat
    assert "from a virtio-blk disk just built from Debian's GRUB" in flat
    assert f"log messages go to {hvf_runtime_dir / 'demo.log'}" in flat
    assert "unhandled" not in text  # in the log file instead
    assert "unhandled" in (hvf_runtime_dir / "demo.log").read_text()
    assert "hvf exited with status 130: you quit with Ctrl-A x." in flat
