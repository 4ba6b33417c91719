# SPDX-License-Identifier: BSD-2-Clause
"""pc-testdev's scratch register at 0xE0-0xE3: any width at any byte offset, against a
four-byte model (a write reaching past 0xE3 keeps only the bytes inside it)."""

from __future__ import annotations

from hvf.plugins.lpc.pctestdev import SCRATCH_PORT, PcTestdev
from hypothesis import given
from hypothesis import strategies as st

from fakes import FakeVm, inp, outp

ACCESS = st.tuples(st.integers(0, 3), st.sampled_from([1, 2, 4]))


@given(st.lists(st.tuples(ACCESS, st.integers(0, 0xFFFF_FFFF)), max_size=20), ACCESS)
def test_scratch_register_matches_a_byte_model(
        writes: list[tuple[tuple[int, int], int]], read: tuple[int, int]) -> None:
    vm = FakeVm()
    vm.attach(PcTestdev())
    model = bytearray(4)
    for (offset, size), value in writes:
        value &= (1 << 8 * size) - 1
        outp(vm, SCRATCH_PORT + offset, size, value)
        kept = value.to_bytes(size, "little")[: 4 - offset]
        model[offset : offset + len(kept)] = kept
    offset, size = read
    expected = int.from_bytes(model[offset : offset + size], "little")
    assert inp(vm, SCRATCH_PORT + offset, size) == expected
    assert inp(vm, SCRATCH_PORT, 4) == int.from_bytes(model, "little")
