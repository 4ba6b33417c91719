# SPDX-License-Identifier: BSD-2-Clause
"""hvf.testing's pytest plugin: the kvm marker, and test guests built from source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvf.testing import plugin
from hvf.testing.guests import GuestBuildError
from hvf.testing.plugin import GuestBuilder

EXIT_7 = """\
	.include "guest.inc"
	.text
	.globl	main
main:
	movl	$7, %eax
	ret
"""


def test_kvm_marker_skips_with_the_reason(pytester: pytest.Pytester,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin, "kvm_unavailable_reason", lambda: "/dev/kvm is elsewhere")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm
        def test_needs_kvm():
            raise AssertionError("ran")

        def test_plain(hvf_guest, hvf_run):
            pass
    """)
    result = pytester.runpytest_inprocess("--strict-markers", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*needs KVM: /dev/kvm is elsewhere*"])


def test_a_guest_from_text_is_built_once(hvf_guest: GuestBuilder) -> None:
    elf = hvf_guest(EXIT_7, name="seven")
    assert elf.name == "seven.elf" and elf.read_bytes()[:4] == b"\x7fELF"
    mtime = elf.stat().st_mtime_ns
    assert hvf_guest(EXIT_7, name="seven") == elf and elf.stat().st_mtime_ns == mtime
    assert hvf_guest(EXIT_7.replace("$7", "$8"), name="seven") != elf


def test_a_guest_from_a_file_is_rebuilt_when_what_it_includes_changes(
        hvf_guest: GuestBuilder, tmp_path: Path) -> None:
    inc = tmp_path / "value.inc"
    inc.write_text("\t.equ\tVALUE, 7\n")
    src = tmp_path / "mine.S"
    src.write_text('\t.include "value.inc"\n' + EXIT_7.replace("$7", "$VALUE"))
    elf = hvf_guest(src, depends=[inc])
    mtime = elf.stat().st_mtime_ns
    assert hvf_guest(src, depends=[inc]).stat().st_mtime_ns == mtime
    os.utime(inc, ns=(mtime + 1, mtime + 1))
    assert hvf_guest(src, depends=[inc]).stat().st_mtime_ns > mtime


def test_a_build_error_carries_the_tools_output(hvf_guest: GuestBuilder) -> None:
    with pytest.raises(GuestBuildError, match=r"(?s)command failed.*no_such_insn"):
        hvf_guest(EXIT_7.replace("ret", "no_such_insn"), name="broken")
    with pytest.raises(GuestBuildError, match="NAME.S or NAME.c"):
        hvf_guest(EXIT_7, suffix=".s")
