# SPDX-License-Identifier: BSD-2-Clause
"""Thousands of command lines generated from hvf's option grammar, valid and invalid,
run in-process through ``hvf.cli.main``: none raises, a refused one exits 64 or 4 with
a message naming the problem, and a valid one reaches the point where the guest would
boot. The machine is really built (KVM VM, guest RAM, devices, kernel loaded, control
socket); only :meth:`hvf.vm.Machine.run` is replaced, by closing the machine, so no
guest instruction runs.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvf import cli
from hvf.pluginmanager import Plugins
from hvf.vm import Machine

pytestmark = pytest.mark.kvm

BOOTED = 99
#: Examples per run: thousands, in about 20 s on a quiet host.
EXAMPLES = 2000
SNAPSHOT = Path(__file__).parent.parent / "data" / "snapshots" / "counter-v1"
HOST_CPU = min(os.sched_getaffinity(0))

#: Command-line text as argv can hold it (no NUL), from the characters the grammar uses
#: and a few it does not; bytes that are not UTF-8 arrive through surrogateescape.
ARG_TEXT = st.text(st.sampled_from(" -=,:./[]0123456789abcmxKMG_é\u2028\udcff\udc80"),
                   max_size=12)

#: No -S: wiring random memory sizes would lock real host RAM (tests/unit/test_cli_rules.py
#: covers -S).
VALID_FLAGS = ["-a", "-A", "-C", "-D", "-e", "-H", "-I", "-P", "-u", "-w", "-x", "-Y"]
VALID_OPTIONS = {
    "-c": ["1", "2", "cpus=2", "cores=2", "sockets=2,cores=1,threads=1", ""],
    "-m": ["16M", "32", "33554432", "0x2000000", "24m", "16384K"],
    "-p": [f"0:{HOST_CPU}"],
    "-U": ["6ba7b810-9dad-11d1-80b4-00c04fd430c8"],
    "-o": ["x86.strictio=false", "rtc.use_localtime=true", "bios.vendor=Example",
           "memory.colour=blue", "config.strict=false", "system.serial_number=7"],
    "-l": ["pc-testdev", "com1,pty", "com2,tcp=127.0.0.1:0", "fwcfg", "fwcfg,qemu"],
    "--append": ["console=ttyS0", "", "a b c"],
}
SLOT_DEVICES = ["hostbridge", "amd_hostbridge", "virtio-rnd", "uart", "uart,pty"]
#: Values that must be refused, per option (64 or 4, whichever the rule says).
BAD_VALUES = {
    "-c": ["0", "300", "x", "cpus=2,sockets=3", "sockets=70000", "cpus=", "1,bogus=2",
           "sockets=16,cores=16"],
    "-m": ["0", "512K", "1025K", "12Q", "1000000G", "-1G", "1.5G", "M", ""],
    "-p": ["0", "0:", ":1", "x:y", "5:0", "0:99999", "-1:0"],
    "-U": ["not-a-uuid", "123", ""],
    "-o": ["cpus", "=1", "x=", "a..b=1", "cpus=two", "x86.strictio=perhaps",
           "config.strict=true,", "virtio_msix=false", "acpi_tables=false", "uuid=1"],
    "-l": ["nosuch", "com9,pty", "com1", "com1,tcp=127.0.0.1:99999", "bootrom",
           "bootrom,/nonexistent/rom", "fwcfg,bhyve", "debugcon,a,b", "com1,nosuch=1"],
    "-s": ["40,hostbridge", "3", "1:2:3:4,lpc", "3,nosuch", "3:9,hostbridge",
           "3,virtio-blk", "3,virtio-blk,/nonexistent", "3,vhost-user-blk",
           "1:31,lpc", "30,lpc"],
    "-k": ["/nonexistent", "/dev/zero", "/"],
    "-K": ["de"],
    "-r": ["/nonexistent", str(SNAPSHOT)],
    "--kernel": ["/dev/zero", "/nonexistent", "/"],
    "--initrd": ["/dev/zero", "/nonexistent"],
}


@contextlib.contextmanager
def stopped_at_boot() -> Iterator[list[str]]:
    """``Machine.run`` closes the machine instead of starting its vCPUs (and notes its
    name); the signal handlers hvf installs before it are put back afterwards. The
    plugins are loaded once, not for every command line."""
    booted: list[str] = []
    plugins = Plugins()

    def run(self: Machine) -> int:
        booted.append(self.name)
        self.close()
        return BOOTED

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                              signal.SIGUSR1)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Machine, "run", run)
        patch.setattr(cli, "Plugins", lambda: plugins)
        try:
            yield booted
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


#: The parts of a valid command line, each a few arguments: one is drawn per option.
VALID_PARTS = [[flag] for flag in VALID_FLAGS] + [
    [option, value] for option, values in VALID_OPTIONS.items() for value in values]
NAMES = ["vm0", "a", "prop-vm", "x" * 60, "name.with-dots_and-dashes", "v\udcff"]
MUTATIONS = ["bad value", "random value", "unknown option", "missing argument",
             "extra argument", "random argv", "no name", "bad name"]


def _option(part: list[str]) -> str:
    return part[0]


@st.composite
def command_line(draw: st.DrawFn, kernel: str, disk: str) -> tuple[list[str], bool]:
    """A command line from the grammar and whether hvf must accept it: host bridge,
    LPC, a kernel and options with values it takes, then (most of the time) one
    thing made wrong, or arguments drawn at random."""
    body = ["-s", "0,hostbridge", "-s", "31,lpc", "--kernel", kernel]
    for part in draw(st.lists(st.sampled_from(VALID_PARTS), max_size=6, unique_by=_option)):
        body += part
    devices = [*SLOT_DEVICES, "virtio-blk,DISK"]
    for n, (slot, device) in enumerate(draw(st.lists(
            st.tuples(st.integers(2, 30), st.sampled_from(devices)), max_size=3,
            unique_by=lambda pair: pair[0]))):
        body += ["-s", f"{slot},{device.replace('DISK', f'{disk}{n}')}"]  # an image each
    name = draw(st.sampled_from(NAMES))
    how = draw(st.sampled_from(["valid", *MUTATIONS, *MUTATIONS]))  # 1 in 17 valid
    if how == "valid":
        return [*body, name], True
    if how == "bad value":
        option = draw(st.sampled_from(sorted(BAD_VALUES)))
        body += [option, draw(st.sampled_from(BAD_VALUES[option]))]
    elif how == "random value":
        body += [draw(st.sampled_from(["-c", "-m", "-p", "-U", "-l", "-s", "-k", "-G", "-r"])),
                 draw(ARG_TEXT)]
    elif how == "unknown option":
        body.insert(draw(st.integers(0, len(body))),
                    draw(st.sampled_from(["-Z", "-q", "--bogus", "--kernel-x", "-"])))
    elif how == "missing argument":
        return [*body, draw(st.sampled_from(["-c", "-m", "-s", "-l", "-o", "--kernel"]))], False
    elif how == "extra argument":
        return [*body, name, draw(ARG_TEXT)], False
    elif how == "random argv":
        return draw(st.lists(st.one_of(ARG_TEXT, st.sampled_from(
            ["-c", "-m", "-s", "-l", "-o", "-p", "-U", "-W", "-x", "--kernel"])),
            max_size=8)), False
    elif how == "no name":
        return body, False
    else:
        name = draw(st.sampled_from(["a/b", "..", "v" * 120, "x\udcff" * 60]))
    return [*body, name], False


def check(argv: list[str], must_boot: bool, booted: list[str]) -> str:
    """Run ``argv``; returns how it ended (for the tally)."""
    before = len(booted)
    status, out, err = run_main(argv)
    assert "Traceback" not in err, (argv, err)
    if must_boot:
        assert status == BOOTED and len(booted) == before + 1, (argv, status, err)
        return "booted"
    if status == BOOTED:
        return "booted"
    if status in (0, 1):  # -h, -s help, -l help; config.dump
        assert out, (argv, status, err)
        return "help or dump"
    assert status in (4, 64), (argv, status, err)
    assert err.startswith("hvf: ") and len(err.split("\n")[0]) > len("hvf: "), (argv, err)
    assert out == "", (argv, out)
    return str(status)


def test_generated_command_lines(guests: dict[str, Path],
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    kernel = str(guests["halt"])
    disk = tmp_path_factory.mktemp("argv") / "disk"
    for n in range(3):
        Path(f"{disk}{n}").write_bytes(bytes(1 << 20))
    tally: dict[str, int] = {}
    fds_before = len(os.listdir("/proc/self/fd"))

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(command_line(kernel, str(disk)))
    def property(case: tuple[list[str], bool]) -> None:
        argv, must_boot = case
        outcome = check(argv, must_boot, booted)
        tally[outcome] = tally.get(outcome, 0) + 1

    with stopped_at_boot() as booted:
        property()
    sys.stdout.write(f"\n{sum(tally.values())} command lines: {tally}\n")
    assert sum(tally.values()) >= EXAMPLES
    assert tally.get("booted", 0) >= EXAMPLES // 25 and tally.get("4", 0) >= EXAMPLES // 10
    assert tally.get("64", 0) >= EXAMPLES // 10
    gc.collect()  # the vCPUs' kvm_run mappings hold a descriptor until collected
    fds = os.listdir("/proc/self/fd")
    # Nothing leaks per machine built and closed. (One whose Machine.__init__ fails
    # part-way, such as -m 1000000G after the KVM VM exists, still leaks what it made.)
    assert len(fds) < fds_before + tally["booted"] // 4, \
        sorted(_described(fds).items(), key=lambda kv: -kv[1])[:6]


def _described(fds: list[str]) -> dict[str, int]:
    """What the descriptors are, by kind (``pipe``, ``anon_inode:kvm-vm``, a path)."""
    kinds: dict[str, int] = {}
    for fd in fds:
        with contextlib.suppress(OSError):
            kind = os.readlink(f"/proc/self/fd/{fd}").split("[")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
