# SPDX-License-Identifier: BSD-2-Clause
"""-w (x86.strictmsr=false): unknown MSRs read as zero and writes to them are dropped;
without it they raise #GP as on real hardware. -x (x86.x2apic=true): x2APIC in CPUID;
without it (and with -a) the guest sees none, as in bhyve, and cannot turn it on."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_guest

pytestmark = pytest.mark.kvm
GUEST = Path(__file__).parent.parent / "guests" / "msr.S"


@pytest.fixture(scope="module")
def msr_guest(hvf_guest) -> Path:  # type: ignore[no-untyped-def]
    return hvf_guest(GUEST)


def test_unknown_msrs_fault_by_default(msr_guest: Path) -> None:
    r = run_guest(msr_guest)
    assert r.stdout.splitlines() == [
        "cpuid x2apic 0", "apic base 00000000fee00900", "exception 13"], r.stderr
    assert r.returncode == (2 << 1) | 1


def test_w_reads_unknown_msrs_as_zero_and_drops_writes(msr_guest: Path) -> None:
    r = run_guest(msr_guest, "-w")
    assert r.stdout.splitlines() == [
        "cpuid x2apic 0", "apic base 00000000fee00900",  # known MSRs are untouched
        "rdmsr 1234 = 0000000000000000", "wrmsr 1234 done",
        "rdmsr 1234 = 0000000000000000"], r.stderr
    assert r.returncode == 1
    assert "rdmsr to register 0x1234 on vcpu 0" in r.stderr  # bhyve's message
    assert "wrmsr to register 0x1234(0xdeadbeef12345678) on vcpu 0" in r.stderr


@pytest.mark.parametrize("flags", [(), ("-a",)], ids=["default", "-a"])
def test_no_x2apic_without_x(msr_guest: Path, flags: tuple[str, ...]) -> None:
    r = run_guest(msr_guest, *flags, append="x2apic=1")
    assert r.stdout.splitlines() == ["cpuid x2apic 0", "exception 13"], r.stderr
    assert r.returncode == 5


def test_x_offers_x2apic_and_the_local_apic_runs_in_it(msr_guest: Path) -> None:
    r = run_guest(msr_guest, "-x")
    assert r.stdout.splitlines()[0] == "cpuid x2apic 1", r.stderr
    r = run_guest(msr_guest, "-x", append="x2apic=1")
    lines = r.stdout.splitlines()
    assert lines[0] == "cpuid x2apic 1" and lines[1].startswith("x2apic id 0 version "), r.stderr
    assert int(lines[1].split()[-1], 16) & 0xFF >= 0x10  # an integrated APIC's version
    assert r.returncode == 1
