# SPDX-License-Identifier: BSD-2-Clause
"""The gdb stub's packet framing and parsing, its register layouts and its breakpoint
bookkeeping on guest RAM (no KVM: the vCPU is a stand-in that translates 1:1)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvf import gdbstub_x86 as x86
from hvf.gdbstub_protocol import (
    ALL_THREADS, MAX_READ, PACKET_SIZE, BadPacket, Breakpoint, Interrupt, Packet,
    PacketError, PacketReader, Query, ReadFeatures, ReadMemory, ReadRegister, Resume,
    SetThread, ThreadQuery, Unsupported, WriteMemory, WriteRegister, WriteRegisters,
    checksum, escape, frame, parse, unescape,
)
from hvf.gdbstub_target import INT3, GuestDebug
from hvf.memory import GuestMemory

COMMAND_HEADS = [b"?", b"g", b"G", b"p", b"P", b"m", b"M", b"X", b"Z", b"z", b"c", b"s",
                 b"C", b"S", b"vCont;", b"vCont?", b"Hg", b"Hc", b"T", b"D", b"k", b"qC",
                 b"qSupported:", b"qXfer:features:read:", b"qThreadExtraInfo,",
                 b"qfThreadInfo", b"QStartNoAckMode", b"vKill;"]


def feed_all(data: bytes) -> list[object]:
    return PacketReader().feed(data)


# ---- framing ----

def test_frame_has_the_checksum_of_the_escaped_body() -> None:
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"a#b") == b"$a}\x03b#%02x" % checksum(b"a}\x03b")


def test_reader_returns_packets_interrupts_and_skips_acks() -> None:
    events = feed_all(b"+$g#67-\x03junk$m0,4#fd")
    assert events == [Packet(b"g"), Interrupt(), Packet(b"m0,4")]


def test_bad_checksum_asks_for_the_packet_again() -> None:
    assert feed_all(b"$g#00") == [BadPacket("bad checksum", retry=True)]
    assert feed_all(b"$g#zz") == [BadPacket("bad checksum", retry=True)]


def test_a_packet_split_across_reads_is_put_together() -> None:
    reader = PacketReader()
    data = frame(b"qSupported:multiprocess+")
    events = [e for i in range(len(data)) for e in reader.feed(data[i : i + 1])]
    assert events == [Packet(b"qSupported:multiprocess+")]


def test_a_dollar_restarts_a_packet() -> None:
    assert feed_all(b"$garbage$g#67") == [Packet(b"g")]


def test_an_oversized_packet_is_refused_without_growing() -> None:
    body = b"M0," + b"0" * (PACKET_SIZE * 4)
    events = feed_all(b"$" + body + b"#%02x" % checksum(body))
    assert events == [BadPacket(f"packet longer than {PACKET_SIZE} bytes")]


def test_binary_data_is_unescaped() -> None:
    raw = bytes(range(256))
    body = b"X100,100:" + escape(raw)
    (event,) = feed_all(b"$" + body + b"#%02x" % checksum(body))
    assert isinstance(event, Packet)
    assert parse(event.payload) == WriteMemory(0x100, raw)


@given(st.binary(max_size=300))
def test_escape_round_trips(data: bytes) -> None:
    assert unescape(escape(data)) == data
    assert not set(escape(data)) & set(b"#$*")


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    reader = PacketReader()
    for chunk in chunks:
        for event in reader.feed(chunk):
            assert isinstance(event, (Packet, BadPacket, Interrupt))
            if isinstance(event, Packet):
                assert len(event.payload) <= PACKET_SIZE
                try_parse(event.payload)


@given(st.binary(max_size=PACKET_SIZE))
def test_every_packet_round_trips_through_the_reader(payload: bytes) -> None:
    assert feed_all(frame(payload)) == [Packet(payload)]


# ---- parsing ----

def try_parse(payload: bytes) -> object:
    try:
        return parse(payload)
    except PacketError as e:
        assert e.reply.startswith(b"E") and len(e.reply) == 3
        return e


@settings(max_examples=500)
@given(st.sampled_from(COMMAND_HEADS), st.binary(max_size=60))
def test_malformed_commands_raise_only_packet_errors(head: bytes, rest: bytes) -> None:
    try_parse(head + rest)


@settings(max_examples=300)
@given(st.sampled_from(COMMAND_HEADS),
       st.text(alphabet="0123456789abcdefABCDEF,:;=-p.xt", max_size=40))
def test_nearly_valid_commands_raise_only_packet_errors(head: bytes, rest: str) -> None:
    try_parse(head + rest.encode())


@pytest.mark.parametrize(("payload", "command"), [
    (b"?", Query("?")),
    (b"g", Query("g")),
    (b"qSupported:multiprocess+;swbreak+", Query("qSupported")),
    (b"D;1", Query("D")),
    (b"vKill;1", Query("k")),
    (b"G0102", WriteRegisters(b"\x01\x02")),
    (b"p1a", ReadRegister(0x1A)),
    (b"P10=efbeadde", WriteRegister(0x10, b"\xef\xbe\xad\xde")),
    (b"m100000,40", ReadMemory(0x100000, 0x40)),
    (b"mffffffffffffffff,10000000", ReadMemory(2**64 - 1, MAX_READ)),
    (b"M1000,2:abcd", WriteMemory(0x1000, b"\xab\xcd")),
    (b"X1000,0:", WriteMemory(0x1000, b"")),
    (b"Z0,100077,1", Breakpoint(True, 0, 0x100077, 1)),
    (b"z1,100077,1;X1,00", Breakpoint(False, 1, 0x100077, 1)),
    (b"Z2,101000,4", Breakpoint(True, 2, 0x101000, 4)),
    (b"c", Resume((("c", ALL_THREADS),), legacy=True)),
    (b"s", Resume((("s", ALL_THREADS),), legacy=True)),
    (b"C05", Resume((("c", ALL_THREADS),), legacy=True)),
    (b"vCont;s:2;c", Resume((("s", 2), ("c", ALL_THREADS)))),
    (b"vCont;C05:1;S02:p1.2", Resume((("c", 1), ("s", 2)))),
    (b"Hg0", SetThread("g", 0)),
    (b"Hc-1", SetThread("c", ALL_THREADS)),
    (b"Hgp1.2", SetThread("g", 2)),
    (b"T3", ThreadQuery("T", 3)),
    (b"qThreadExtraInfo,2", ThreadQuery("qThreadExtraInfo", 2)),
    (b"qXfer:features:read:target.xml:0,ffb", ReadFeatures("target.xml", 0, 0xFFB)),
    (b"qTStatus", Unsupported()),
    (b"vMustReplyEmpty", Unsupported()),
])
def test_commands(payload: bytes, command: object) -> None:
    assert parse(payload) == command


@pytest.mark.parametrize("payload", [
    b"m", b"m100", b"m100,", b"mxyz,4", b"m1" + b"0" * 17 + b",4", b"M100,4:ab", b"M100,1:zz",
    b"X100,5:abc", b"Z5,0,1", b"Z0,100", b"Z0,,1", b"p", b"P1", b"P1=abc", b"G123",
    b"c100", b"S05;100", b"vCont;r1,2", b"vCont;t", b"vCont;", b"Hgx", b"T",
    b"qXfer:features:read:target.xml:0", b"qThreadExtraInfo,zz", b"Hg" + b"1" * 20,
])
def test_malformed_commands(payload: bytes) -> None:
    with pytest.raises(PacketError):
        parse(payload)


# ---- register layouts ----

@pytest.mark.parametrize("layout", [x86.AMD64, x86.I386], ids=["amd64", "i386"])
def test_target_description_is_xml_naming_every_register(layout: x86.Layout) -> None:
    root = ET.fromstring(layout.target_xml())
    assert root.findtext("architecture") == layout.architecture
    regs = [r for f in root.iter("feature") for r in f.iter("reg")]
    assert [r.get("name") for r in regs] == [r.name for r in layout.registers]
    assert [int(r.get("regnum", -1)) for r in regs] == list(range(len(layout.registers)))
    assert sum(int(r.get("bitsize", 0)) for r in regs) == layout.size * 8


def test_layouts_are_gdbs_own_order() -> None:
    assert [r.name for r in x86.AMD64.registers[:18]] == [*x86.GPRS, "eflags"]
    assert [r.name for r in x86.I386.registers[:10]] == [*x86.I386_GPRS, "eflags"]
    assert x86.AMD64.registers[24].name == "st0" and x86.I386.registers[16].name == "st0"


def state() -> dict[str, int]:
    values = {r.key: 0 for r in (*x86.AMD64.registers, *x86.I386.registers)}
    values.update(rax=0x1122334455667788, rip=0xFFFF_FFFF_8000_0000, rflags=0x202,
                  cs=0x10, st0=0x4000_8000_0000_0000_0000, xmm3=(1 << 128) - 1, cr0=0x80000011)
    return values


def test_i386_shows_the_low_halves_and_keeps_the_high_ones_on_write() -> None:
    s = state()
    data = x86.encode(x86.I386, s)
    assert len(data) == x86.I386.size
    assert data[:4] == (0x55667788).to_bytes(4, "little")
    assert x86.register_bytes(x86.I386, s, 8) == (0x80000000).to_bytes(4, "little")  # eip
    new = x86.with_register(x86.I386, s, 0, b"\x01\x00\x00\x00")
    assert new["rax"] == 0x1122334400000001
    assert x86.decode(x86.I386, data, s) == s


def test_amd64_registers_round_trip() -> None:
    s = state()
    data = x86.encode(x86.AMD64, s)
    assert len(data) == x86.AMD64.size == 8 * 17 + 4 * 7 + 10 * 8 + 4 * 8 + 16 * 16 + 4 + 16 + 48
    assert x86.decode(x86.AMD64, data, dict.fromkeys(s, 0)) == s


def test_wrong_sizes_and_numbers_are_refused() -> None:
    s = state()
    with pytest.raises(PacketError):
        x86.decode(x86.AMD64, b"\0" * 10, s)
    with pytest.raises(PacketError):
        x86.register_bytes(x86.AMD64, s, len(x86.AMD64.registers))
    with pytest.raises(PacketError):
        x86.with_register(x86.AMD64, s, 0, b"\0" * 4)


def test_x87_tag_word_from_the_abridged_one() -> None:
    one = 0x3FFF_8000_0000_0000_0000  # 1.0
    fpr = [one, 0, 0x7FFF << 64, 0, 0, 0, 0, 0]
    # top = 6: st0 is physical 6, st1 physical 7, st2 physical 0
    tag = x86._full_tag(0b1100_0001, fpr, 6)
    assert [(tag >> (2 * i)) & 3 for i in range(8)] == [2, 3, 3, 3, 3, 3, 0, 1]
    assert x86._abridged_tag(tag) == 0b1100_0001


# ---- breakpoints on guest RAM ----

class IdentityTranslation:
    """Stands in for a vCPU with paging off."""

    def translate(self, linear: int) -> int:
        return linear


@pytest.fixture
def guest() -> Iterator[GuestDebug]:
    memory = GuestMemory(2 << 20)
    memory.write(0x1000, bytes(range(16)))
    yield GuestDebug(memory, block_irq=False)
    memory.close()


def test_software_breakpoints_patch_int3_and_are_hidden(guest: GuestDebug) -> None:
    fd = IdentityTranslation()
    assert guest.change(fd, Breakpoint(True, 0, 0x1004, 1)) == b"OK"
    assert guest.memory.read(0x1004, 1) == bytes([INT3])
    assert guest.read(fd, 0x1000, 8) == bytes(range(8))
    guest.write(fd, 0x1003, b"\xaa\xbb")  # a write under the breakpoint
    assert guest.memory.read(0x1003, 2) == bytes([0xAA, INT3])
    assert guest.change(fd, Breakpoint(False, 0, 0x1004, 1)) == b"OK"
    assert guest.memory.read(0x1003, 2) == b"\xaa\xbb"


def test_lifted_breakpoints_leave_ram_as_the_guest_wrote_it(guest: GuestDebug) -> None:
    fd = IdentityTranslation()
    guest.change(fd, Breakpoint(True, 0, 0x1004, 1))
    guest.lift()  # paused for a snapshot
    assert guest.memory.read(0x1004, 1) == b"\x04"
    guest.change(fd, Breakpoint(True, 0, 0x1005, 1))
    guest.write(fd, 0x1004, b"\xee")
    assert guest.memory.read(0x1004, 2) == b"\xee\x05"
    guest.plant()
    assert guest.memory.read(0x1004, 2) == bytes([INT3, INT3])
    assert guest.read(fd, 0x1004, 2) == b"\xee\x05"
    guest.remove_all()
    assert guest.memory.read(0x1004, 2) == b"\xee\x05"


def test_two_linear_addresses_of_one_byte(guest: GuestDebug) -> None:
    class Alias(IdentityTranslation):
        def translate(self, linear: int) -> int:
            return linear & 0xFFFF

    fd = Alias()
    guest.change(fd, Breakpoint(True, 0, 0x1004, 1))
    guest.change(fd, Breakpoint(True, 0, 0x11004, 1))
    guest.change(fd, Breakpoint(False, 0, 0x1004, 1))
    assert guest.memory.read(0x1004, 1) == bytes([INT3])  # the other one still holds
    guest.change(fd, Breakpoint(False, 0, 0x11004, 1))
    assert guest.memory.read(0x1004, 1) == b"\x04"


def test_memory_outside_ram_is_refused(guest: GuestDebug) -> None:
    fd = IdentityTranslation()
    with pytest.raises(PacketError) as e:
        guest.read(fd, 4 << 20, 4)
    assert e.value.reply == b"E0e"
    assert guest.read(fd, (2 << 20) - 2, 8) == b"\0\0"  # a read ends where RAM does
    with pytest.raises(PacketError):
        guest.write(fd, (2 << 20) - 2, b"1234")
    with pytest.raises(PacketError):
        guest.change(fd, Breakpoint(True, 0, 2**64 - 1, 1))


def test_debug_registers(guest: GuestDebug) -> None:
    fd = IdentityTranslation()
    assert guest.change(fd, Breakpoint(True, 1, 0x1000, 1)) == b"OK"
    assert guest.change(fd, Breakpoint(True, 2, 0x2000, 4)) == b"OK"
    assert guest.change(fd, Breakpoint(True, 4, 0x3000, 8)) == b"OK"
    assert guest.change(fd, Breakpoint(True, 3, 0x3000, 8)) == b""  # read-only watch
    with pytest.raises(PacketError):
        guest.change(fd, Breakpoint(True, 2, 0x2001, 4))  # misaligned
    regs = guest.debugreg()
    assert regs[:3] == [0x1000, 0x2000, 0x3000]
    assert regs[7] == (0b10 | 0b10 << 2 | 0b10 << 4 | 0b01 << 20 | 0b11 << 22
                       | 0b11 << 24 | 0b10 << 26)
    assert guest.stop_reason(0b010) == "watch:2000"
    assert guest.stop_reason(0b001) == "hwbreak:"
    assert guest.stop_reason(1 << 14) is None  # a single step
    guest.change(fd, Breakpoint(True, 1, 0x4000, 1))
    with pytest.raises(PacketError) as e:
        guest.change(fd, Breakpoint(True, 1, 0x5000, 1))
    assert e.value.reply == b"E1c"
    guest.remove_all()
    assert guest.debugreg() == [0] * 8


@pytest.mark.parametrize(("payload", "run", "steps"), [
    (b"c", {0, 1, 2}, set()),
    (b"s", {1}, {1}),  # the legacy step: the Hc thread alone, as bhyve
    (b"vCont;c", {0, 1, 2}, set()),
    (b"vCont;s:1", {0}, {0}),
    (b"vCont;s:3;c", {0, 1, 2}, {2}),
    (b"vCont;c:2;s", {0, 1, 2}, {0, 2}),
    (b"vCont;s:1;s:1;c:1", {0}, {0}),  # the leftmost action wins
])
def test_resume_plans(payload: bytes, run: set[int], steps: set[int]) -> None:
    command = parse(payload)
    assert isinstance(command, Resume)
    assert command.plan(3, 1) == (run, steps)


def test_resuming_a_thread_that_does_not_exist_is_refused() -> None:
    command = parse(b"vCont;s:4")
    assert isinstance(command, Resume)
    with pytest.raises(PacketError):
        command.plan(3, 0)


@pytest.mark.parametrize(("option", "expected"), [
    ("1234", {"gdb.port": "1234", "gdb.wait": "false"}),
    ("w1234", {"gdb.port": "1234", "gdb.wait": "true"}),
    ("w0.0.0.0:1234", {"gdb.port": "1234", "gdb.wait": "true", "gdb.address": "0.0.0.0"}),
    ("[::1]:1234", {"gdb.port": "1234", "gdb.wait": "false", "gdb.address": "[::1]"}),
])
def test_g_option_sets_bhyves_variables(option: str, expected: dict[str, str]) -> None:
    from hvf.cli import parse_args
    from hvf.pluginmanager import Plugins

    config = parse_args(["-G", option, "vm"], Plugins())
    assert {k: config.get(k) for k in expected} == expected
    assert "gdb.address" in expected or config.get("gdb.address") is None
