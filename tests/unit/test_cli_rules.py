# SPDX-License-Identifier: BSD-2-Clause
"""The command line's rules (issue 14): bhyve's exit statuses (64 for a command line
that does not parse, 4 for a configuration hvf cannot run), each message naming the
argument and what is allowed; bhyve's size rule; unknown configuration keys; bhyve's
remaining options; hostile files where a kernel or configuration file is expected.

Nothing here boots: ``hvf.cli.run_vm`` is replaced by a stub that records the
configuration it would have booted (every check of the command line comes before it).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hvf import cli, exitcodes
from hvf.config import Config
from hvf.errors import ConfigError, LoaderError
from hvf.loader import load_kernel, read_image
from hvf.memory import GiB, GuestMemory, MiB, parse_size

BOOTED = 99
SNAPSHOT = Path(__file__).parent.parent / "data" / "snapshots" / "counter-v1"


@pytest.fixture
def booted(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Configurations that reached the point where hvf would build and boot the VM."""
    reached: list[Config] = []

    def stub(config: Config, plugins: Any, restore_from: str | None = None) -> int:
        reached.append(config)
        return BOOTED

    monkeypatch.setattr(cli, "run_vm", stub)
    return reached


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


# ---- bhyve's size rule (bhyverun.c vm_parse_memsize) ----


@pytest.mark.parametrize(("text", "size"), [
    ("1", MiB), ("1048575", 1048575 * MiB),          # a bare number below 1 MiB is MiB
    ("1048576", MiB), ("268435456", 256 * MiB),      # from 1 MiB on it is bytes
    ("0x10000000", 256 * MiB), ("512M", 512 * MiB), ("2g", 2 * GiB),
])
def test_memsize_bare_numbers_as_bhyve(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_memsize_given_in_bytes_reaches_the_machine(
    capsys: pytest.CaptureFixture[str], booted: list[Config]
) -> None:
    status, _, err = run(capsys, "-m", "268435456", "vm")
    assert status == BOOTED, err
    assert parse_size(booted[0].get("memory.size") or "") == 256 * MiB


def test_guest_memory_that_cannot_be_mapped_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="-m: cannot map 976.6 TiB of guest memory"):
        GuestMemory(parse_size("1000000G"))


# ---- one rule for exit statuses ----


@pytest.mark.parametrize(("args", "status", "message"), [
    # the command line does not parse: 64, as bhyve's option loop
    (["-Z", "vm"], 64, "option -Z not recognized"),
    (["-c"], 64, "option -c requires argument"),
    (["-c", "two", "vm"], 64, "invalid cpu topology 'two'"),
    (["-m", "lots", "vm"], 64, "invalid memsize 'lots'"),
    (["-p", "0-1", "vm"], 64, "invalid vcpu pinning configuration '0-1'"),
    (["-o", "cpus", "vm"], 64, "invalid configuration option 'cpus'"),
    (["-l", "nosuch", "vm"], 64, "invalid lpc device configuration 'nosuch'"),
    (["a", "b"], 64, "unexpected arguments after the VM name: b"),
    ([], 64, "no VM name given"),
    # it parses, but names a configuration hvf cannot run: 4
    (["-s", "40,hostbridge", "vm"], 4, 'Invalid PCI slot info field "40,hostbridge"'),
    (["-l", "bootrom", "vm"], 4, "invalid lpc device configuration 'bootrom'"),
    (["-c", "0", "vm"], 4, "-c: cpus=0 is out of range (1 to 255)"),
    (["-c", "300", "vm"], 4, "-c: 300 vCPUs requested but only 255 available (cpus: 1 to 255"),
    (["-c", "sockets=16,cores=16,threads=2", "vm"], 4, "makes 512 vCPUs; at most 255"),
    (["-c", "cpus=4,sockets=3", "vm"], 4,
     "-c: topology (3 sockets, 1 cores, 1 threads) does not match 4 vCPUs"),
    (["-c", "sockets=70000", "vm"], 4, "-c: sockets=70000 is out of range (1 to 65535)"),
    (["-m", "512K", "vm"], 4, "-m: invalid memsize '512K': out of range (at least 1 MiB)"),
    (["-m", "1025K", "vm"], 4, "-m: invalid memsize '1025K': not a multiple of 4 KiB"),
    (["-p", "5:0", "vm"], 4, "-p: vcpu.5.cpuset=0: vCPU 5 does not exist (the VM has "
     "vCPUs 0 to 0)"),
    (["-p", "0:4096", "vm"], 4, "-p: vcpu.0.cpuset=4096: host CPU 4096 is not one this "
     "process may use"),
    (["-U", "not-a-uuid", "vm"], 4, "-U: uuid=not-a-uuid is not a UUID"),
    (["-o", "uuid=123", "vm"], 4, "-U: uuid=123 is not a UUID"),
])
def test_exit_status_rule(
    capsys: pytest.CaptureFixture[str], booted: list[Config],
    args: list[str], status: int, message: str,
) -> None:
    got, out, err = run(capsys, *args)
    assert (got, out) == (status, ""), err
    assert message in err
    assert "Traceback" not in err and not booted


def test_rule_is_written_down() -> None:
    """exitcodes.py says which errors are which (the rule the tests above hold to)."""
    doc = exitcodes.__doc__ or ""
    assert "64" in doc and "USAGE" in doc and "ERROR" in doc and "-s" in doc


# ---- findings: tracebacks on ordinary bad input ----


def test_vm_name_too_long_for_a_socket_path(
    capsys: pytest.CaptureFixture[str], booted: list[Config]
) -> None:
    status, _, err = run(capsys, "v" * 200)
    assert status == 4 and not booted
    assert f"VM name '{'v' * 24}...' is 200 bytes long; at most" in err


def test_config_file_not_utf8(
    capsys: pytest.CaptureFixture[str], booted: list[Config], tmp_path: Path
) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_bytes(b"name=\xff\xfe\n")
    status, _, err = run(capsys, "-k", str(conf), "vm")
    assert status == 4 and not booted
    assert f"-k {conf}: not UTF-8 text" in err


def test_config_file_endless() -> None:
    r = _run_limited("""
        from hvf.cli import main
        print(main(["-k", "/dev/zero", "-o", "config.dump=1", "vm"]))
    """)
    assert r.returncode == 0 and r.stdout == "4\n", r.stderr
    assert "-k /dev/zero: larger than" in r.stderr


def _closed_pipe_stdout(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "hvf", *args], stdout=write_end,
                              stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["snapshot", "info", str(SNAPSHOT)], ["-s", "help"], ["-h"]])
def test_output_into_a_closed_pipe_ends_quietly(args: list[str]) -> None:
    """``hvf snapshot info DIR | head``: as a C tool, hvf dies of SIGPIPE, silently."""
    r = _closed_pipe_stdout(args)
    assert r.stderr == b""
    assert r.returncode == -signal.SIGPIPE


# ---- unbounded reads ----


def _run_limited(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``code`` in a child limited to 3 GiB of address space (a regression must not eat
    the host's memory)."""
    prelude = textwrap.dedent("""\
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, hard))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom"])
def test_character_device_kernel_refused(path: str) -> None:
    r = _run_limited(f"""
        from hvf.loader import read_image
        from hvf.errors import LoaderError
        try:
            read_image({path!r}, "kernel")
        except LoaderError as e:
            print(e)
    """)
    assert r.returncode == 0, r.stderr
    assert f"kernel '{path}' is a character device, not a file" in r.stdout


def test_fifo_and_directory_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[str] = []

    def read() -> None:
        try:
            read_image(str(fifo), "kernel")
        except LoaderError as e:
            result.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the open before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("read_image blocked on a FIFO")
    assert result == [f"kernel '{fifo}' is a FIFO, not a file"]
    with pytest.raises(LoaderError, match="is a directory, not a file"):
        read_image(str(tmp_path), "initramfs")


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize(("head", "message"), [
    (b"", "is not a kernel hvf can boot"),
    # a valid multiboot header: the size is checked before the rest is read
    ((0x1BADB002).to_bytes(4, "little") + (0).to_bytes(4, "little")
     + (-0x1BADB002 & 0xFFFFFFFF).to_bytes(4, "little"), "is 1 GiB, larger than the guest's 256 MiB of RAM"),
])
def test_sparse_kernel_refused_after_its_header(tmp_path: Path, head: bytes, message: str) -> None:
    kernel = tmp_path / "sparse.img"
    with kernel.open("wb") as f:
        f.write(head)
        f.truncate(GiB)
    vm = SimpleNamespace(memory=SimpleNamespace(size=256 * MiB))
    before = _bytes_read()
    with pytest.raises(LoaderError, match=message):
        load_kernel(vm, str(kernel), initrd=None, cmdline="")  # type: ignore[arg-type]
    assert _bytes_read() - before < MiB


def test_truncated_bzimage_refused(tmp_path: Path) -> None:
    image = bytearray(0x220)  # the setup header runs to 0x268
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x20F).to_bytes(2, "little")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(image)
    vm = SimpleNamespace(memory=SimpleNamespace(size=256 * MiB))
    with pytest.raises(LoaderError, match="truncated"):
        load_kernel(vm, str(kernel), initrd=None, cmdline="")  # type: ignore[arg-type]


# ---- unknown configuration keys ----


def test_unknown_key_warned(capsys: pytest.CaptureFixture[str], booted: list[Config]) -> None:
    status, _, err = run(capsys, "-o", "memory.colour=blue", "-s", "3,hostbridge,anything=1",
                         "-l", "com1,stdio", "-o", "lpc.com1.path=pty", "vm")
    assert status == BOOTED
    assert err.count("unknown configuration variable") == 1
    assert "unknown configuration variable 'memory.colour'" in err


def test_unknown_key_refused_when_strict(
    capsys: pytest.CaptureFixture[str], booted: list[Config], tmp_path: Path
) -> None:
    conf = tmp_path / "vm.toml"
    conf.write_text('[x86]\nstritcio = true\n')
    status, _, err = run(capsys, "-o", "config.strict=true", "-k", str(conf), "vm")
    assert status == 4 and not booted
    assert "unknown configuration variable 'x86.stritcio'" in err
    assert "did you mean 'x86.strictio'" in err


def test_plugins_declare_their_keys(capsys: pytest.CaptureFixture[str],
                                    booted: list[Config]) -> None:
    """Keys of the built-in plugins' devices and bhyve_config(5)'s variables are known."""
    status, _, err = run(capsys, "-o", "config.strict=true", "-s", "0,hostbridge",
                         "-s", "31,lpc", "-l", "com1,stdio", "-l", "bootrom,/rom",
                         "-o", "lpc.pcireg.vendor=host", "-o", "rtc.use_localtime=false",
                         "-o", "system.serial_number=42", "-o", "vcpu.0.cpuset=0", "vm")
    assert status == BOOTED, err


# ---- bhyve's other options ----


@pytest.mark.parametrize("flag", ["-A", "-a", "-D", "-H", "-P", "-Y", "-C", "-S", "-I"])
def test_flags_accepted(capsys: pytest.CaptureFixture[str], booted: list[Config], flag: str) -> None:
    status, _, err = run(capsys, flag, "vm")
    assert status == BOOTED, err


@pytest.mark.parametrize(("args", "message"), [
    (["-W"], "-W: virtio devices using MSI instead of MSI-X is not implemented"),
    (["-K", "de"], "-K: keyboard layouts are for bhyve's VNC framebuffer"),
    (["-o", "acpi_tables=false"], "acpi_tables=false: hvf always builds ACPI tables"),
    (["-o", "x86.mptable=true"], "x86.mptable=true: hvf builds no MP table"),
])
def test_options_refused_clearly(capsys: pytest.CaptureFixture[str], booted: list[Config],
                                 args: list[str], message: str) -> None:
    status, _, err = run(capsys, *args, "vm")
    assert status == 4 and message in err and not booted


def test_help_has_a_line_for_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    described = {line.split()[0].rstrip(":") for line in out.splitlines()
                 if line.startswith("  -")}
    letters = {f"-{c}" for c in cli.SHORT_OPTS.replace(":", "")}
    longs = {f"--{o.rstrip('=')}" for o in cli.LONG_OPTS}
    assert letters | longs <= described, sorted((letters | longs) - described)


def test_wired_memory_is_locked() -> None:
    def locked_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmLck:"):
                return int(line.split()[1])
        raise AssertionError("no VmLck")

    before = locked_kib()
    mem = GuestMemory(16 * MiB, wired=True)
    try:
        assert locked_kib() - before >= 16 * 1024
    finally:
        mem.close()


def _without_ipc_lock() -> None:
    """In the child before exec: 1 MiB of locked memory at most, and no CAP_IPC_LOCK
    (dropped from the bounding set, so the new program lacks it) to override that."""
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (MiB, MiB))
    if os.getuid() == 0:
        pr_capbset_drop, cap_ipc_lock = 24, 14  # <linux/prctl.h>, <linux/capability.h>
        if ctypes.CDLL(None, use_errno=True).prctl(pr_capbset_drop, cap_ipc_lock, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_wired_memory_beyond_rlimit_memlock() -> None:
    code = """
        from hvf.memory import GuestMemory
        from hvf.errors import ConfigError
        try:
            GuestMemory(16 << 20, wired=True)
        except ConfigError as e:
            print(e)
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=60, preexec_fn=_without_ipc_lock)
    assert r.returncode == 0, r.stderr
    assert "-S: cannot wire 16 MiB of guest memory" in r.stdout
    assert "RLIMIT_MEMLOCK is 1 MiB" in r.stdout


def test_wired_memory_beyond_host_ram() -> None:
    """Refused before mlock, which with CAP_IPC_LOCK would fault pages in until the OOM
    killer came (the mapping itself is sparse)."""
    host_ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(ConfigError, match="-S: cannot wire .* of guest memory: the host has"):
        GuestMemory(2 * host_ram, wired=True)


def vm_flags(mem: GuestMemory) -> set[str]:
    start = f"{mem.host_addr:x}-"
    lines = Path("/proc/self/smaps").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(start))
    flags = next(line for line in lines[at:] if line.startswith("VmFlags:"))
    return set(flags.split()[1:])


def test_guest_memory_left_out_of_core_dumps_unless_asked() -> None:
    mem, in_core = GuestMemory(4 * MiB), GuestMemory(4 * MiB, in_core=True)
    try:
        assert "dd" in vm_flags(mem)
        assert "dd" not in vm_flags(in_core)
    finally:
        mem.close()
        in_core.close()


def test_argument_bytes_that_are_not_utf8_go_back_out_unchanged() -> None:
    """``-o name=$'\\xff' -o config.dump=1`` under a strict UTF-8 stdout (an en_US.UTF-8
    locale): the byte comes back, not a UnicodeEncodeError."""
    r = subprocess.run([sys.executable, "-m", "hvf", "-o", os.fsdecode(b"name=\xff"),
                        "-o", "config.dump=1"], capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert (r.returncode, r.stderr) == (1, b"")
    assert b"name=\xff\n" in r.stdout


def test_a_plugin_declares_its_keys() -> None:
    import hvf
    from hvf import preflight
    from hvf.pluginmanager import Plugins

    class Declares:
        @hvf.hookimpl
        def hvf_config_keys(self) -> list[str]:
            return ["example.level", "example.rules.**"]

    config = Config({"name": "vm", "example.level": "3", "example.rules.a.b": "x",
                     "example.colour": "red"})
    warnings = preflight.check(config, Plugins(extra=(Declares(),)))
    assert warnings == ["unknown configuration variable 'example.colour' (did you mean "
                        "'example.level'?)"]


@pytest.mark.parametrize(("flag", "line"), [
    ("-H", "-H: on KVM a vCPU that executes HLT always sleeps"),
    ("-P", "-P: KVM's pause-loop exiting"),
    ("-D", "-D: a KVM VM lives only as long as its hvf process"),
])
def test_flags_that_kvm_makes_moot_say_so(capsys: pytest.CaptureFixture[str],
                                          booted: list[Config], caplog: pytest.LogCaptureFixture,
                                          flag: str, line: str) -> None:
    with caplog.at_level("INFO", logger="hvf"):
        status, _, _ = run(capsys, flag, "vm")
    assert status == BOOTED
    assert sum(r.getMessage().startswith(line) for r in caplog.records) == 1  # one line
