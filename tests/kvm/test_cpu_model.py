# SPDX-License-Identifier: BSD-2-Clause
"""CPU models on KVM: cpu.features=-x2apic hides x2APIC from a guest even with -x, a
named model leaves only its features in what the vCPU is given, bad names exit 4, and
a snapshot whose guest saw a feature this host lacks (HVF_HOST_CPU_FEATURES, the
documented testing hook) is refused before the guest runs, listing what is missing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hvf import cpufeatures as cf
from hvf import cpumodel
from hvf.plugins.snapshot.statefile import read_state

from conftest import PVM, popen_hvf, run_guest, run_hvf, stop

pytestmark = pytest.mark.kvm
MSR_GUEST = Path(__file__).parent.parent / "guests" / "msr.S"
MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev")


@pytest.fixture(scope="module")
def msr_guest(hvf_guest) -> Path:  # type: ignore[no-untyped-def]
    return hvf_guest(MSR_GUEST)


def test_cpu_features_hide_x2apic_even_with_x(msr_guest: Path) -> None:
    assert run_guest(msr_guest, "-x").stdout.splitlines()[0] == "cpuid x2apic 1"
    r = run_guest(msr_guest, "-x", "-o", "cpu.features=-x2apic", append="x2apic=1")
    # the guest sees none, and turning it on anyway faults as on a CPU without it
    assert r.stdout.splitlines() == ["cpuid x2apic 0", "exception 13"], r.stderr
    assert "overridden by cpu.features=-x2apic" in r.stderr
    r = run_guest(msr_guest, "-o", "cpu.features=+x2apic")
    assert r.stdout.splitlines()[0] == "cpuid x2apic 1", r.stderr


CPUID_GUEST = """
	.include "guest.inc"
	.text
	.globl	main
main:
	movl	$1, %eax
	xorl	%ecx, %ecx
	cpuid
	PUT_HEX	%ecx, 8
	PUTS_LIT " "
	PUT_HEX	%edx, 8
	PUTS_LIT "\\n"
	movl	$7, %eax
	xorl	%ecx, %ecx
	cpuid
	PUT_HEX	%ebx, 8
	PUTS_LIT " "
	PUT_HEX	%ecx, 8
	PUTS_LIT "\\n"
	xorl	%eax, %eax
	ret
"""


@pytest.mark.skipif(PVM, reason="kvm_pvm shows its guests the hardware's CPUID feature "
                    "bits whatever KVM_SET_CPUID2 gives them (only those KVM emulates, "
                    "x2APIC among them, follow a model; see the test above)")
def test_a_named_model_is_what_the_guest_sees(hvf_guest) -> None:  # type: ignore
    guest = hvf_guest(CPUID_GUEST, name="cpuid")
    r = run_guest(guest, "-c", "2", "-o", "cpu.model=x86-64", "-o", "cpu.features=-sse2")
    assert r.returncode == 1, r.stderr
    (ecx1, edx1), (ebx7, ecx7) = ([int(x, 16) for x in line.split()]
                                  for line in r.stdout.splitlines())
    allowed = (cf.MODELS["x86-64"] | cf.PLATFORM) - {"sse2", "x2apic"}
    for value, register in ((ecx1, (1, 0, "ecx")), (edx1, (1, 0, "edx")),
                            (ebx7, (7, 0, "ebx")), (ecx7, (7, 0, "ecx"))):
        seen = {name for name, (where, bit) in cf.FEATURES.items()
                if where == register and value >> bit & 1}
        assert seen <= allowed, (register, seen - allowed)
    assert edx1 >> 15 & 1 and not edx1 >> 26 & 1  # cmov, no sse2
    assert edx1 >> 28 & 1  # HTT: two vCPUs


@pytest.mark.parametrize("option, named, listed", [
    ("cpu.model=skylake", "skylake", "x86-64-v2"),
    ("cpu.features=-avx3", "avx3", "x2apic"),
])
def test_unknown_names_exit_4_naming_them_and_the_known_ones(
        option: str, named: str, listed: str) -> None:
    r = run_hvf([*MACHINE, "-o", option, "--kernel", "/nonexistent", "vm"])
    assert r.returncode == 4 and named in r.stderr and listed in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait(cond, what: str, proc, timeout: float = 60) -> None:  # type: ignore
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"hvf exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_restore_onto_a_host_lacking_a_feature_is_refused_listing_it(
        guests: dict[str, Path], tmp_path: Path) -> None:
    out, snap = tmp_path / "com1", tmp_path / "snap"
    proc = popen_hvf([*MACHINE, "-x", "-l", f"com1,file={out}", "--kernel",
                      str(guests["counter"]), "cpu-a"])
    try:
        _wait(lambda: _lines(out) >= 4, "4 counter lines", proc)
        r = run_hvf(["ctl", "--vm", "cpu-a", "--json", "suspend", "--exit", str(snap)])
        assert r.returncode == 0, r.stderr
        assert proc.wait(30) == 0
    finally:
        stop(proc)
    saved = next(c for c in read_state(snap / "state").chunks if c.name == "cpu")
    profile = cpumodel.CpuProfile.from_fields(saved.fields)
    assert profile.has("x2apic") and profile.has("sse2") and profile.msrs
    before = out.read_bytes()

    env = dict(os.environ, HVF_HOST_CPU_FEATURES="-x2apic,-sse2")
    r = run_hvf(["-r", str(snap), "cpu-b"], env=env, timeout=60)
    assert r.returncode == 4, r.stderr
    assert "this host cannot give the guest the CPU it had" in r.stderr
    assert "x2apic (CPUID 0x1 ECX bit 21); sse2 (CPUID 0x1 EDX bit 26)" in r.stderr
    assert "Traceback" not in r.stderr
    assert out.read_bytes() == before  # the guest never ran

    # without the hook the same snapshot runs on, with the CPU it had
    proc = popen_hvf(["-r", str(snap), "cpu-c"])
    try:
        _wait(lambda: _lines(out) >= len(before.splitlines()) + 2, "the count going on", proc)
        status = json.loads(run_hvf(["ctl", "--vm", "cpu-c", "--json", "status"]).stdout)
        assert status["state"] == "running"
    finally:
        stop(proc)
