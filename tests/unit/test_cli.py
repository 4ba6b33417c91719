# SPDX-License-Identifier: BSD-2-Clause
"""The command line: bhyve's syntax, messages and exit statuses (no guest runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvf.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_s_help_and_l_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "-s", "help")
    names = [line.split()[0] for line in out.splitlines()]
    assert status == 0 and {"hostbridge", "lpc", "amd_hostbridge"} <= set(names)
    status, out, _ = run(capsys, "-l", "help")
    names = [line.split()[0] for line in out.splitlines()]
    assert status == 0 and {"pc-testdev", "fwcfg", "debugcon"} <= set(names)


def test_config_dump_builds_bhyve_tree(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    toml = tmp_path / "extra.toml"
    toml.write_text('[x86]\nstrictio = true\n')
    status, out, _ = run(
        capsys, "-c", "2", "-m", "1G", "-s", "0,hostbridge", "-s", "1:2:3,hostbridge,vendor=0x8086",
        "-s", "31,lpc", "-l", "pc-testdev", "-l", "fwcfg,qemu", "-o", "memory.size=2G",
        "-k", str(toml), "--kernel", "k.elf", "--append", "a b", "-o", "config.dump=1", "vm0",
    )
    assert status == 1
    assert out.splitlines() == [
        "boot.append=a b", "boot.kernel=k.elf", "config.dump=1", "cpus=2",
        "lpc.fwcfg=qemu", "lpc.pc-testdev=true", "memory.size=2G", "name=vm0",
        "pci.0.0.0.device=hostbridge", "pci.0.31.0.device=lpc",
        "pci.1.2.3.device=hostbridge", "pci.1.2.3.vendor=0x8086", "x86.strictio=true",
    ]


@pytest.mark.parametrize(("args", "status", "message"), [
    (["-s", "99,hostbridge", "vm"], 4, 'Invalid PCI slot info field "99,hostbridge"'),
    (["-s", "3", "vm"], 4, 'Invalid PCI slot info field "3"'),
    (["-s", "1:2:3:4,lpc", "vm"], 4, 'Invalid PCI slot info field "1:2:3:4,lpc"'),
    (["-s", "3,nosuch", "vm"], 4, 'pci slot 0:3:0: unknown device "nosuch"'),
    (["-s", "3,hostbridge", "-s", "3:0,lpc", "vm"], 4, "pci slot 0:3:0 already occupied!"),
    (["-l", "com9,stdio", "vm"], 64, "invalid lpc device configuration 'com9,stdio'"),
    (["-l", "fwcfg,bhyve", "vm"], 4, "invalid lpc device configuration 'fwcfg,bhyve'"),
    (["-m", "12Q", "vm"], 64, "invalid memsize '12Q'"),
    (["-c", "cpus=x", "vm"], 64, "invalid cpu topology 'cpus=x'"),
    (["-o", "novalue", "vm"], 64, "invalid configuration option 'novalue'"),
    (["-o", "x=", "vm"], 64, "invalid configuration option 'x='"),
    (["-p", "zero", "vm"], 64, "invalid vcpu pinning configuration 'zero'"),
    (["-Z", "vm"], 64, "option -Z not recognized"),
    (["-k", "/nonexistent", "vm"], 4, "Failed to open configuration file /nonexistent"),
    (["vm", "extra"], 64, "unexpected arguments after the VM name: extra"),
    ([], 64, "no VM name given"),
])
def test_bad_command_lines(
    capsys: pytest.CaptureFixture[str], args: list[str], status: int, message: str
) -> None:
    got, out, err = run(capsys, *args)
    assert got == status
    assert message in err
    assert out == ""


def test_h_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "-h")
    assert status == 0 and out.startswith("Usage: hvf")
