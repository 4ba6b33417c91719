# SPDX-License-Identifier: BSD-2-Clause
"""Hostile guests against the AHCI controller (Hypothesis): random register writes,
command tables with random FISes, PRDTs and ATAPI packets, on real images and guest
RAM. The controller must never raise, never hand the block back end a range outside
the image, never change the image except where a valid write or TRIM addressed it,
and always finish a command (PxCI cleared, or an error bit in PxIS); a saved state
with any field changed restores or is refused with an error, never an exception."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvf.errors import HvfError
from hvf.plugins.ahci import spec
from test_ahci import DATA, SECTORS, SIZE, Hba, h2d, hba, pattern

RAM_END = 64 << 20
_FUZZ = settings(max_examples=80, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_ATA = st.sampled_from([
    spec.IDENTIFY_DEVICE, spec.IDENTIFY_PACKET_DEVICE, spec.READ_DMA, spec.READ_DMA_EXT,
    spec.WRITE_DMA, spec.WRITE_DMA_EXT, spec.READ_SECTORS, spec.WRITE_SECTORS_EXT,
    spec.READ_MULTIPLE, spec.WRITE_MULTIPLE_EXT, spec.READ_FPDMA_QUEUED,
    spec.WRITE_FPDMA_QUEUED, spec.FLUSH_CACHE_EXT, spec.DATA_SET_MANAGEMENT,
    spec.SET_FEATURES, spec.SET_MULTIPLE_MODE, spec.READ_LOG_EXT, spec.READ_LOG_DMA_EXT,
    spec.READ_VERIFY_EXT, spec.CHECK_POWER_MODE, spec.PACKET, spec.DEVICE_RESET,
    spec.NOP, 0x91, 0xB0, 0xF5, 0xFF])
_LBA = st.one_of(st.integers(0, 64), st.integers(0, SECTORS + 4), st.integers(0, 2**48 - 1))
_COUNT = st.one_of(st.integers(0, 16), st.integers(0, 16), st.integers(0, 0xFFFF))
#: A PRD that holds any transfer of up to 16384 sectors.
_ROOMY = (DATA, 8 << 20)
_GPA = st.one_of(st.integers(DATA, DATA + 0x40000), st.integers(0, 2**64 - 1),
                 st.just(RAM_END - 256))
_PRD = st.tuples(_GPA, st.one_of(st.integers(1, 0x2000), st.integers(1, 0x400000)))
_WRITES = {spec.WRITE_DMA, spec.WRITE_DMA_EXT, spec.WRITE_SECTORS_EXT,
           spec.WRITE_MULTIPLE_EXT, spec.WRITE_FPDMA_QUEUED}
_FIS = st.tuples(
    st.sampled_from([spec.FIS_H2D] * 8 + [0x34, 0x00]),
    st.sampled_from([0x80] * 8 + [0x00]), _ATA,
    st.one_of(st.integers(0, 16), st.integers(0, 0xFFFF)), _LBA, _COUNT,
    st.sampled_from([0x40, 0xC0, 0]), st.sampled_from([0, 0, 0, 4]))


def _fis(fields: tuple[int, int, int, int, int, int, int, int]) -> bytes:
    kind, c_bit, command, features, lba, count, device, control = fields
    raw = bytearray(h2d(command, lba=lba, count=count, features=features, device=device,
                        control=control))
    raw[0], raw[1] = kind, c_bit
    return bytes(raw)


def _allowed(fields: tuple[int, ...], dsm: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the image a command may change (if it is well formed)."""
    _kind, _c, command, features, lba, count, _device, _control = fields
    if command in _WRITES:
        number = features if command == spec.WRITE_FPDMA_QUEUED else count
        if command == spec.WRITE_DMA:
            lba, number = lba & 0x0FFFFFFF, count & 0xFF or 0x100
        number = number or 0x10000
        return [(lba * 512, number * 512)]
    if command == spec.DATA_SET_MANAGEMENT:
        return [((e & (1 << 48) - 1) * 512, (e >> 48) * 512)
                for (e,) in struct.iter_unpack("<Q", dsm)]
    return []


def _check_port(h: Hba, slots: int) -> None:
    irq = h.port_read(0, spec.P_IS)
    stuck = h.port_read(0, spec.P_CI) & slots
    assert not stuck or irq & (spec.IS_TFES | spec.IS_HBFS), (hex(stuck), hex(irq))
    assert irq & ~spec.IS_MASK == 0
    backend = h.device.ports[0].drive.backend
    assert backend.stats()["out_of_range"] == 0 and backend.stats()["in_flight"] == 0


@_FUZZ
@given(commands=st.lists(st.tuples(
    _FIS, st.one_of(st.just([_ROOMY]), st.lists(_PRD, max_size=4)), st.integers(0, 0x3F),
    st.binary(max_size=32), st.integers(0, 31)), min_size=1, max_size=5),
    queued=st.booleans(), together=st.booleans())
def test_hostile_command_tables(commands: list, queued: bool,  # type: ignore[type-arg]
                                together: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.img"
        path.write_bytes(pattern(SIZE))
        allowed = bytearray(SIZE)
        with hba({"port": {"0": {"type": "hd", "path": str(path)}}}) as h:
            h.start(0)
            slots = 0
            for fields, prdt, flags, dsm, slot in commands:
                dsm = dsm.ljust(512, b"\0")
                h.memory.write(DATA + (8 << 20), dsm)
                prdt = [(DATA + (8 << 20), 512)] if fields[2] == spec.DATA_SET_MANAGEMENT \
                    else prdt
                h.prepare(0, slot, _fis(fields), prdt, flags=flags)
                slots |= 1 << slot
                for offset, length in _allowed(fields, dsm):
                    if offset + length <= SIZE:
                        allowed[offset:offset + length] = b"\1" * length
                if not together:
                    h.issue(0, 1 << slot, sact=queued)
                    _check_port(h, 1 << slot)
                    h.recover(0)
            if together:
                h.issue(0, slots, sact=queued)
                _check_port(h, slots)
                h.recover(0)  # and the port works again
            assert h.run(0, h2d(spec.READ_DMA_EXT, count=1), [(DATA, 512)]).ok
        content = path.read_bytes()
        original = pattern(SIZE)
        assert len(content) == SIZE
        assert all(a == b or allowed[i] for i, (a, b) in enumerate(zip(content, original)))


_CDB = st.one_of(
    st.tuples(st.sampled_from([
        spec.TEST_UNIT_READY, spec.REQUEST_SENSE, spec.INQUIRY, spec.START_STOP_UNIT,
        spec.PREVENT_ALLOW_MEDIUM_REMOVAL, spec.READ_CAPACITY_10, spec.READ_10,
        spec.WRITE_10, spec.READ_TOC, spec.GET_CONFIGURATION,
        spec.GET_EVENT_STATUS_NOTIFICATION, spec.MODE_SENSE_10, spec.REPORT_LUNS,
        spec.READ_12, 0xBE, 0xFF]), st.binary(min_size=11, max_size=11)).map(
        lambda t: bytes([t[0]]) + t[1]),
    st.binary(min_size=12, max_size=12))


@_FUZZ
@given(packets=st.lists(st.tuples(_CDB, st.lists(_PRD, max_size=3), st.booleans()),
                        min_size=1, max_size=5))
def test_hostile_atapi_packets(packets: list) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cd.iso"
        path.write_bytes(pattern(64 * 2048))
        with hba({"path": str(path)}, "ahci-cd") as h:
            h.start(0)
            for cdb, prdt, dma in packets:
                fis = h2d(spec.PACKET, features=int(dma), lba=0xFFFF00)
                h.prepare(0, 0, fis, prdt, acmd=cdb, flags=spec.HEADER_ATAPI)
                h.issue(0, 1)
                _check_port(h, 1)
                h.recover(0)
            assert h.run(0, h2d(spec.PACKET, features=1), [(DATA, 8)],
                         acmd=bytes([spec.READ_CAPACITY_10]).ljust(12, b"\0")).ok
        assert path.read_bytes() == pattern(64 * 2048)


_REG = st.one_of(
    st.sampled_from([spec.CAP, spec.GHC, spec.IS, spec.PI, spec.VS, spec.CAP2]),
    st.integers(0, 31).flatmap(lambda p: st.sampled_from(
        [spec.PORT_BASE + p * spec.PORT_STRIDE + r for r in range(0, 0x80, 4)])),
    st.integers(0, spec.ABAR_SIZE - 8))


@_FUZZ
@given(accesses=st.lists(st.tuples(
    _REG, st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1), st.booleans(),
    st.booleans()), min_size=1, max_size=40),
    garbage=st.binary(min_size=64, max_size=64))
def test_hostile_register_accesses(accesses: list,  # type: ignore[type-arg]
                                   garbage: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.img"
        path.write_bytes(pattern(SIZE))
        with hba({"port": {"0": {"type": "hd", "path": str(path), "ro": "true"}}}) as h:
            h.start(0)
            for i in range(32):  # command tables full of garbage at the list's addresses
                h.memory.write(h.clb(0) + i * 32, garbage[:8] + bytes(4) + struct.pack(
                    "<I", h.table(0, i)) + bytes(16))
                h.memory.write(h.table(0, i), garbage + garbage)
            for offset, size, value, is_write, run in accesses:
                offset -= offset % size if is_write else 0
                if is_write:
                    h.write(offset, value & ((1 << 8 * size) - 1), size)
                else:
                    h.read(offset, size)
                if run:
                    h.settle(0)
            h.settle(0)
            assert h.read(spec.GHC) & spec.GHC_AE and h.read(spec.PI) == 1
            assert h.port_read(0, spec.P_IS) & ~spec.IS_MASK == 0
            assert h.device.ports[0].drive.backend.stats()["out_of_range"] == 0
        assert path.read_bytes() == pattern(SIZE)


_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**65), st.binary(max_size=600),
                   st.text(max_size=8), st.just({}), st.just([]))


def _leaves(fields: dict[str, object],
            prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every field, nested ones included."""
    paths = []
    for key, value in fields.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += _leaves(value, (*prefix, key))
    return paths


@_FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 10**6), _VALUE), min_size=1, max_size=3))
def test_hostile_saved_state(changes: list) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.img"
        path.write_bytes(pattern(SIZE))
        iso = Path(tmp) / "cd.iso"
        iso.write_bytes(bytes(4 * 2048))
        tree = {"port": {"0": {"type": "hd", "path": str(path)},
                         "3": {"type": "cd", "path": str(iso)}}}
        with hba(tree) as h:
            saved = h.device.save_state()
            paths = _leaves(saved)
            for pick, value in changes:
                *parents, key = paths[pick % len(paths)]
                node = saved
                for part in parents:
                    node = node.get(part, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node[key] = value
            try:
                h.device.restore_state(saved, 1)
            except HvfError:
                return
            # accepted: the controller still works
            h.start(0)
            assert h.run(0, h2d(spec.READ_DMA_EXT, count=1), [(DATA, 512)]).ok
