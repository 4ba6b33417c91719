# SPDX-License-Identifier: BSD-2-Clause
"""-G [w][bind:]port: Debian's gdb against the stub, on real guests.

gdb runs in batch mode (``gdb -batch -ex ...``) with the guest's ELF for symbols; a
small client speaks the protocol itself where gdb cannot be scripted (holding a running
guest, Ctrl-C, hostile input)."""

from __future__ import annotations

import random
import re
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BASE_ARGS, PVM, PVM_REASON, popen_hvf, run_hvf, stop, wait_for_text
from hvf import gdbstub_x86 as x86
from hvf.gdbstub_protocol import Packet, PacketReader, frame

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")]
GUESTS = Path(__file__).parent.parent / "guests"


@pytest.fixture(scope="module")
def target(hvf_guest) -> Path:  # type: ignore[no-untyped-def]
    return hvf_guest(GUESTS / "gdb_target.S")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def symbol(elf: Path, name: str) -> int:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return int(re.search(rf"^([0-9a-f]+) \w {name}$", out, re.M)[1], 16)  # type: ignore[index]


def gdb(elf: Path, port: int, *commands: str, timeout: float = 120,
        architecture: str | None = None) -> str:
    args = ["gdb", "-nx", "-batch", "-ex", "set tcp connect-timeout 60"]
    if architecture is not None:
        args += ["-ex", f"set architecture {architecture}"]
    args += ["-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        args += ["-ex", command]
    r = subprocess.run([*args, str(elf)], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return r.stdout + r.stderr


class Client:
    """A minimal remote-protocol client: one packet out, its reply back."""

    def __init__(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.reader = PacketReader()
        self.replies: list[bytes] = []

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        while not self.replies:
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.replies += [e.payload for e in self.reader.feed(data) if isinstance(e, Packet)]
        return self.replies.pop(0)

    def __call__(self, payload: bytes) -> bytes:
        self.raw(frame(payload))
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop(proc)


def start(running: list[subprocess.Popen[bytes]], tmp_path: Path, *args: object,
          name: str = "gdbvm") -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "out.txt"
    proc = popen_hvf([*BASE_ARGS[:-2], "-l", f"debugcon,file={out}", *map(str, args), name],
                     stdout=subprocess.DEVNULL)
    running.append(proc)
    return proc, out


def test_gdb_reads_registers_breaks_steps_and_the_guest_finishes(
        target: Path, tmp_path: Path, running: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    proc, out = start(running, tmp_path, "-c", "2", "-G", f"w127.0.0.1:{port}",
                      "--kernel", target)
    log = gdb(target, port,
              "info registers eip eflags cs", "p/x $cr0",
              "info threads", "thread 2", "p/x $eip", "thread 1",
              "break gdb_tick", "continue", "x/wx &gdb_ticks", "continue", "x/wx &gdb_ticks",
              "delete", "break gdb_step_here", "continue", "stepi", "p/x $eax",
              "info symbol $pc", "hbreak gdb_hw_here", "continue",
              "set {int}&gdb_value = 0x2a", "continue")
    # -G w: stopped before the first instruction, the multiboot entry point
    assert re.search(r"^eip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <_start>", log, re.M), log
    assert re.search(r"^cs\s+0x10\s", log, re.M), log
    assert re.search(r"^\$1 = 0x(1|11)$", log, re.M), log  # CR0.PE, paging off
    assert re.search(r"\* 1\s+Thread 1 \(vCPU 0\).*\n\s+2\s+Thread 2 \(vCPU 1\)", log), log
    assert "$2 = 0xfff0" in log  # the AP still waits for INIT/SIPI
    assert log.count("in gdb_tick ()") >= 2, log
    assert re.search(r"0x101008:\s+0x00000000\n.*\n.*\n0x101008:\s+0x00000001", log), log
    assert "Breakpoint 2, 0x00100024 in gdb_step_here ()" in log, log
    assert "$3 = 0x1234" in log and "gdb_step_here + 5 in section .text" in log, log
    assert re.search(r"Breakpoint 3, 0x[0-9a-f]+ in gdb_hw_here \(\)", log), log
    assert "[Inferior 1 (Remote target) exited with code 01]" in log, log
    assert proc.wait(60) == 1
    assert out.read_text().splitlines() == [
        "gdb_target start", "gdb_target ticks 3", "gdb_target value 0000002a",
        "gdb_target done"]


def test_gdb_in_64_bit_code_through_the_guests_page_tables(
        hvf_guest, tmp_path: Path,  # type: ignore[no-untyped-def]
        running: list[subprocess.Popen[bytes]]) -> None:
    elf = hvf_guest(GUESTS / "gdb_long.S")
    port = free_port()
    proc, out = start(running, tmp_path, "-G", str(port), "--kernel", elf, name="gdblong")
    wait_for_text(out, "gdb_long waiting\n", proc, 60)
    alias = 0x40000000 + symbol(elf, "gdb_value")  # linear alias of gdb_value's page
    log = gdb(elf, port, "info registers rip cs efer", "set {int}&gdb_go = 1",
              f"set {{int}}{alias:#x} = 0x77", "x/wx &gdb_value", f"x/wx {alias:#x}",
              "break gdb_long_here", "continue", "stepi", "p/x $rax", "info symbol $pc",
              "continue", architecture="i386:x86-64")  # the ELF file is a 32-bit one
    assert re.search(r"^rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <gdb_long_wait", log, re.M), log
    assert re.search(r"^cs\s+0x18\s", log, re.M), log
    assert re.search(r"^efer\s+0x500\s", log, re.M), log  # LME and LMA
    assert re.search(rf"^0x{symbol(elf, 'gdb_value'):x}.*:\s+0x00000077$", log, re.M), log
    assert re.search(rf"^{alias:#x}:\s+0x00000077$", log, re.M), log
    assert "Breakpoint 1, 0x00000000001000" in log and "in gdb_long_here ()" in log, log
    assert "$1 = 0x1122334455667788" in log, log  # all 64 bits of RAX
    assert "gdb_long_next in section .text" in log, log
    assert "[Inferior 1 (Remote target) exited with code 01]" in log, log
    assert proc.wait(60) == 1
    assert out.read_text().splitlines()[-1] == "gdb_long value 00000077"


def test_every_vcpu_stays_stopped_while_the_debugger_holds_the_guest(
        guests: dict[str, Path], tmp_path: Path,
        running: list[subprocess.Popen[bytes]]) -> None:
    elf = guests["counter_smp"]
    counter = symbol(elf, "ap_counter")
    port = free_port()
    proc, out = start(running, tmp_path, "-c", "2", "-G", str(port), "--kernel", elf,
                      "--append", "debugcon=1 every=5", name="gdbhold")
    wait_for_text(out, r"^count 2 ap [1-9]", proc, 60, regex=True)
    gdbc = Client(port)
    assert gdbc(b"qSupported:swbreak+") .startswith(b"PacketSize=")
    assert gdbc(b"?") == b"T05thread:1;"  # stopped on connecting
    assert gdbc(b"qfThreadInfo") == b"m1,2" and gdbc(b"qsThreadInfo") == b"l"
    xml = gdbc(b"qXfer:features:read:target.xml:0,3fff")
    assert xml[:1] == b"l"
    # long mode, but 32-bit code (compatibility mode), as the ELF file is
    assert ET.fromstring(xml[1:]).findtext("architecture") == "i386"

    def ap_counter() -> int:
        return int.from_bytes(bytes.fromhex(gdbc(b"m%x,4" % counter).decode()), "little")

    lines = out.read_text().count("\n")
    held = ap_counter()
    time.sleep(1.0)
    assert ap_counter() == held  # through the AP's page tables (4-level paging)
    assert gdbc(b"Hg2") == b"OK"
    assert len(gdbc(b"g")) == 2 * x86.I386.size
    assert out.read_text().count("\n") == lines  # nor did the BSP print
    gdbc.raw(frame(b"vCont;c"))
    time.sleep(1.0)
    gdbc.raw(b"\x03")
    assert re.fullmatch(rb"T02thread:[12];", gdbc.reply())
    assert ap_counter() > held
    assert gdbc(b"D") == b"OK"
    gdbc.close()
    after = out.read_text().count("\n")
    wait_for_text(out, rf"^count {after + 1} ap", proc, 60, regex=True)  # it runs on

    again = Client(port)  # a second debugger stops it again ...
    assert again(b"?") == b"T05thread:1;"
    held = int.from_bytes(bytes.fromhex(again(b"m%x,4" % counter).decode()), "little")
    again.raw(frame(b"c") + frame(b"?") * 100)  # ... and is dropped for flooding it
    received = b""
    try:
        while chunk := again.sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    assert set(received) <= set(b"+")  # acks, no reply, then the stub hung up
    again.close()
    after = out.read_text().count("\n")
    wait_for_text(out, rf"^count {after + 1} ap", proc, 60, regex=True)  # running on
    # gdb itself, with the 32-bit ELF file, on the guest in compatibility mode
    log = gdb(elf, port, "x/wx &ap_counter", "info threads", "detach")
    assert "rejected" not in log and "too long" not in log, log
    value = re.search(rf"^0x{counter:x}(?: <ap_counter>)?:\s+0x([0-9a-f]+)$", log, re.M)
    assert value and int(value[1], 16) > held, log
    assert re.search(r"2\s+Thread 2 \(vCPU 1\) 0x[0-9a-f]+ in \w+", log), log
    assert proc.poll() is None


def test_a_checkpoint_taken_while_debugging_keeps_no_breakpoint(
        target: Path, tmp_path: Path, running: list[subprocess.Popen[bytes]]) -> None:
    port, tick = free_port(), symbol(target, "gdb_tick")
    proc, out = start(running, tmp_path, "-G", f"w{port}", "--kernel", target, name="gdbck")
    gdbc = Client(port)
    original = gdbc(b"m%x,1" % tick)
    assert gdbc(b"Z0,%x,1" % tick) == b"OK"
    assert gdbc(b"m%x,1" % tick) == original  # hidden from reads
    r = run_hvf(["ctl", "--vm", "gdbck", "--json", "checkpoint", tmp_path / "ck"])
    assert r.returncode == 0, r.stderr
    (ram,) = (tmp_path / "ck").glob("ram-*")
    with ram.open("rb") as f:  # low RAM lies at its guest-physical address in the file
        f.seek(tick)
        assert f.read(1).hex().encode() == original != b"cc"
    assert gdbc(b"c") == b"T05thread:1;swbreak:;"  # planted again after the save
    assert gdbc(b"z0,%x,1" % tick) == b"OK" and gdbc(b"D") == b"OK"
    gdbc.close()
    assert proc.wait(60) == 1
    assert "gdb_target done" in out.read_text()


def test_hardware_watchpoint(target: Path, tmp_path: Path,
                             running: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    proc, out = start(running, tmp_path, "-G", f"w{port}", "--kernel", target)
    log = gdb(target, port, "watch *(int*)&gdb_result", "continue", "p/x $eip", "delete",
              "continue")
    assert "Hardware watchpoint 1: *(int*)&gdb_result" in log, log
    assert proc.wait(60) == 1
    if PVM and "New value" not in log:
        pytest.skip(f"{PVM_REASON}: its emulator runs the guest's kernel code and does "
                    "not check data breakpoints, so watchpoints never trigger")
    assert re.search(r"Old value = 0\s+New value = 4660", log), log
    assert "gdb_hw_here" in log, log


def test_hostile_packets_get_errors_and_the_stub_carries_on(
        target: Path, tmp_path: Path, running: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    proc, out = start(running, tmp_path, "-G", f"w{port}", "--kernel", target)
    gdbc = Client(port)
    rng = random.Random(14)
    gdbc.raw(bytes(rng.randrange(256) for _ in range(5000)).replace(b"\x03", b""))
    gdbc.raw(b"$" + b"m" * 100_000 + b"#00")  # far over PacketSize, bad checksum
    gdbc.raw(b"$g#00")  # bad checksum: the stub asks again, no reply
    gdbc.replies.clear()
    time.sleep(0.2)
    gdbc.reader = PacketReader()
    gdbc.sock.setblocking(False)
    try:
        while gdbc.sock.recv(65536):
            pass
    except BlockingIOError:
        pass
    gdbc.sock.setblocking(True)
    for bad, reply in [(b"m10,zz", b"E16"), (b"mffffffff00000000,10", b"E0e"),
                       (b"Z0,ffffffff00000000,1", b"E0e"), (b"p999", b"E16"),
                       (b"P0=01", b"E16"), (b"G00", b"E16"), (b"Hg99", b"E16"),
                       (b"Z2,1003,4", b"E16"), (b"vCont;r0,1", b"E16"),
                       (b"qXfer:features:read:other.xml:0,100", b"E16"),
                       (b"vFlashWrite:0:x", b""), (b"c100", b"E16")]:
        assert gdbc(bad) == reply, bad
    assert gdbc(b"?") == b"T05thread:1;"
    assert gdbc(b"D") == b"OK"
    gdbc.close()
    assert proc.wait(60) == 1
    assert "gdb_target done" in out.read_text()


def test_fuzzed_packets_on_a_stopped_machine(hvf_machine) -> None:  # type: ignore[no-untyped-def]
    """Every packet gets a reply (or, for k and resumes, none), whatever its arguments,
    against a real machine's vCPUs and RAM (built, not running)."""
    stub = hvf_machine(["-G", str(free_port())]).gdb

    @settings(max_examples=500, deadline=None)
    @given(st.sampled_from([b"g", b"G", b"p", b"P", b"m", b"M", b"X", b"Z0,", b"Z1,", b"Z2,",
                            b"z0,", b"Hg", b"Hc", b"T", b"qThreadExtraInfo,", b"vCont;", b"?",
                            b"qXfer:features:read:target.xml:", b"qC", b""]),
           st.binary(max_size=80) | st.text("0123456789abcdef,:;=-x", max_size=40).map(
               str.encode))
    def check(head: bytes, rest: bytes) -> None:
        reply = stub.handle(head + rest)
        assert reply is None or (isinstance(reply, bytes) and b"\n" not in reply)

    check()


def test_bad_ports_are_configuration_errors(target: Path) -> None:
    r = run_hvf([*BASE_ARGS, "-G", "70000", "--kernel", target, "badport"])
    assert r.returncode == 4 and "gdb.port 70000 is out of range" in r.stderr, r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_hvf([*BASE_ARGS, "-G", f"127.0.0.1:{port}", "--kernel", target, "busyport"])
    assert r.returncode == 4 and f"gdb: cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
