# SPDX-License-Identifier: BSD-2-Clause
"""CPU models without KVM: what a model and cpu.features leave of a host's CPUID, the
guest's CPU as snapshot fields (untrusted), and what a host lacks of it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvf import cpufeatures as cf
from hvf import cpumodel
from hvf.config import Config
from hvf.cpumodel import CpuProfile, HostCpu
from hvf.errors import ConfigError

AMD = (0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD" as EBX, ECX, EDX
INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)  # "GenuineIntel"
_REG = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}


def host(features: set[str], *, vendor: tuple[int, int, int] = AMD, xcr0: int = 0xE7,
         msrs: frozenset[int] = frozenset({0x10, 0x1B}), tsc_khz: int = 2_600_000,
         tsc_scaling: bool = False) -> HostCpu:
    """A host whose KVM offers ``features`` (and leaves 0, 1, 7, 0xD, 0xB, 0x8000000x)."""
    leaves: dict[tuple[int, int], list[int]] = {
        (0, 0): [0, 0, 0, 0xD, vendor[0], vendor[1], vendor[2]],
        (1, 0): [1, 0, 0, 0xB00F21, 0x0F000800, 0, 0],
        (7, 0): [7, 0, 1, 1, 0, 0, 0],
        (7, 1): [7, 1, 1, 0, 0, 0, 0],
        (0xB, 0): [0xB, 0, 1, 0, 1, 0x100, 0x0F],
        (0xD, 0): [0xD, 0, 1, xcr0, 0x240, 0x980, 0],
        (0xD, 1): [0xD, 1, 1, 0, 0, 0, 0],
        (0x40000001, 0): [0x40000001, 0, 0, 0, 0, 0, 0],
        (0x80000001, 0): [0x80000001, 0, 0, 0, 0, 0, 0],
        (0x80000008, 0): [0x80000008, 0, 0, 0x3030, 0, 0, 0],
    }
    for name in features:
        (leaf, subleaf, reg), bit = cf.FEATURES[name]
        leaves[leaf, subleaf][_REG[reg]] |= 1 << bit
    return HostCpu(tuple(tuple(e) for e in leaves.values()), msrs, tsc_khz,  # type: ignore
                   tsc_scaling)


EVERYTHING = set(cf.MODELS["x86-64-v4"]) | {"x2apic", "hypervisor", "tsc_deadline_timer",
                                             "pku", "rdrand", "kvmclock", "sha_ni"}


def visible(profile: CpuProfile) -> set[str]:
    return {name for name in cf.FEATURES if profile.has(name)}


def build(config: dict[str, str], host_cpu: HostCpu, ncpus: int = 1) -> CpuProfile:
    return cpumodel.build(Config(config), ncpus, host_cpu)


# ---- names ----


def test_features_parse_as_additions_and_removals() -> None:
    assert cpumodel.parse_features("-x2apic, +AVX2,pku,") == [
        (False, "x2apic"), (True, "avx2"), (True, "pku")]


def test_an_unknown_feature_is_named_with_a_suggestion_and_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        cpumodel.parse_features("-avx3")
    text = str(e.value)
    assert "unknown CPU feature 'avx3'" in text and "did you mean" in text
    assert "x2apic" in text and "sse4_2" in text


def test_models_and_aliases() -> None:
    assert cpumodel.model_name(Config()) == "host"
    assert cpumodel.model_name(Config({"cpu.model": "baseline"})) == "x86-64-v2"
    with pytest.raises(ConfigError, match="unknown CPU model.*host, baseline, x86-64, "
                                          "x86-64-v2, x86-64-v3, x86-64-v4"):
        cpumodel.model_name(Config({"cpu.model": "skylake"}))


def test_check_config_warns_when_cpu_features_overrides_x(monkeypatch) -> None:  # type: ignore
    monkeypatch.delenv(cpumodel.HOST_FEATURES_ENV, raising=False)
    assert cpumodel.check_config(Config({"x86.x2apic": "true"})) == []
    warnings = cpumodel.check_config(Config({"x86.x2apic": "true",
                                             "cpu.features": "-x2apic"}))
    assert len(warnings) == 1 and "overridden by cpu.features=-x2apic" in warnings[0]
    monkeypatch.setenv(cpumodel.HOST_FEATURES_ENV, "+avx2")
    with pytest.raises(ConfigError, match="only take features away"):
        cpumodel.check_config(Config())


def test_every_model_builds_on_the_last() -> None:
    names = list(cf.MODELS)
    for smaller, larger in zip(names, names[1:]):
        assert cf.MODELS[smaller] < cf.MODELS[larger]
    assert "sse4_2" in cf.MODELS["x86-64-v2"] and "avx2" in cf.MODELS["x86-64-v3"]


# ---- building the guest's CPU ----


def test_host_model_shows_what_the_host_offers_but_x2apic_only_with_x() -> None:
    h = host(EVERYTHING)
    assert visible(build({}, h)) == EVERYTHING - {"x2apic"}
    assert visible(build({"x86.x2apic": "true"}, h)) == EVERYTHING


def test_a_named_model_hides_what_it_lacks() -> None:
    profile = build({"cpu.model": "baseline"}, host(EVERYTHING))
    # the platform's bits and KVM's paravirtual features stay
    assert visible(profile) == set(cf.MODELS["x86-64-v2"]) | {
        "hypervisor", "tsc_deadline_timer", "kvmclock"}
    assert profile.register((0xD, 0, "eax")) == 0b11  # x87 and SSE state only
    v4 = build({"cpu.model": "x86-64-v4"}, host(EVERYTHING))
    assert not v4.has("sha_ni") and not v4.has("pku") and not v4.has("rdrand")
    assert v4.register((0xD, 0, "eax")) == 0xE7


def test_a_model_the_host_cannot_give_is_refused_listing_what_it_lacks() -> None:
    with pytest.raises(ConfigError, match=r"cpu.model=x86-64-v3: this host's KVM does not "
                                          r"offer avx2, fma$"):
        build({"cpu.model": "x86-64-v3"}, host(EVERYTHING - {"avx2", "fma"}))


def test_cpu_features_take_away_and_add() -> None:
    h = host(EVERYTHING)
    profile = build({"cpu.model": "x86-64-v2", "cpu.features": "-sse4_2,+avx2,+x2apic"}, h)
    assert not profile.has("sse4_2") and profile.has("avx2") and profile.has("x2apic")
    assert not build({"x86.x2apic": "true", "cpu.features": "-x2apic"}, h).has("x2apic")
    with pytest.raises(ConfigError, match=r"\+avx2: this host's KVM does not offer it"):
        build({"cpu.features": "+avx2"}, host(EVERYTHING - {"avx2"}))


def test_topology_rules_stay() -> None:
    profile = build({}, host(EVERYTHING), ncpus=3)
    assert profile.has("ht")
    assert profile.register((1, 0, "ebx")) >> 16 & 0xFF == 3
    cpuid = profile.for_vcpu(2)
    entries = {(e.function, e.index): e for e in (cpuid.entries[i] for i in range(cpuid.nent))}
    assert entries[1, 0].ebx >> 24 == 2 and entries[1, 0].ebx >> 16 & 0xFF == 3
    assert entries[0xB, 0].edx == 2
    assert not build({}, host(EVERYTHING), ncpus=1).has("ht")


# ---- what a host lacks ----


def test_the_same_host_lacks_nothing() -> None:
    h = host(EVERYTHING)
    assert cpumodel.missing(build({"x86.x2apic": "true"}, h, ncpus=2), h) == []


def test_a_host_lacking_features_is_listed_by_name_and_place() -> None:
    profile = build({"x86.x2apic": "true"}, host(EVERYTHING))
    lacking = cpumodel.missing(profile, host(EVERYTHING - {"x2apic", "avx2"}))
    assert lacking == ["x2apic (CPUID 0x1 ECX bit 21)", "avx2 (CPUID 0x7 EBX bit 5)"]


def test_a_guest_setting_or_topology_bit_is_not_a_host_feature() -> None:
    profile = build({}, host(EVERYTHING | {"osxsave"}), ncpus=2)  # ht set by hvf
    assert cpumodel.missing(profile, host(EVERYTHING)) == []


def test_vendor_xsave_state_and_msrs() -> None:
    profile = build({}, host(EVERYTHING, msrs=frozenset({0x10, 0x1B, 0x6E0})))
    lacking = cpumodel.missing(profile, host(EVERYTHING, vendor=INTEL, xcr0=0x7))
    assert lacking == ["a AuthenticAMD CPU (this host's is GenuineIntel)",
                       "XSAVE state avx512_opmask", "XSAVE state avx512_zmm_hi256",
                       "XSAVE state avx512_hi16_zmm", "MSR 0x6e0"]


def test_a_tsc_the_host_can_neither_match_nor_scale_to() -> None:
    profile = build({}, host(EVERYTHING, tsc_khz=2_600_000))
    assert cpumodel.missing(profile, host(EVERYTHING, tsc_khz=2_600_500)) == []  # 192 ppm
    assert cpumodel.missing(profile, host(EVERYTHING, tsc_khz=2_000_000, tsc_scaling=True)) == []
    assert cpumodel.missing(profile, host(EVERYTHING, tsc_khz=2_000_000)) == [
        "a TSC at 2600.000 MHz (this host's runs at 2000.000 MHz and its KVM cannot scale it)"]


# ---- the profile as snapshot fields ----


def test_fields_round_trip() -> None:
    profile = build({"cpu.model": "x86-64", "cpu.features": "+x2apic"}, host(EVERYTHING))
    assert CpuProfile.from_fields(profile.to_fields()) == profile


@pytest.mark.parametrize("change, message", [
    ({"cpuid": []}, "'cpuid' is not 1 to 512 entries"),
    ({"cpuid": [[1, 0, 0, 0, 0, 0]]}, "'cpuid'"),
    ({"cpuid": [[1, 0, 0, 0, 0, 0, 1 << 32]]}, "'cpuid'"),
    ({"msrs": [-1]}, "'msrs'"),
    ({"tsc_khz": 1 << 40}, "'tsc_khz'"),
    ({"model": 3}, "'model'"),
])
def test_malformed_fields_are_refused_naming_the_field(change: dict, message: str) -> None:
    fields = {**build({}, host(EVERYTHING)).to_fields(), **change}
    with pytest.raises(ValueError, match=message):
        CpuProfile.from_fields(fields)


_plain = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                      lambda inner: st.lists(inner, max_size=8), max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "features", "cpuid", "msrs", "tsc_khz",
                                        "other"]), _plain))
def test_hostile_fields_give_a_profile_or_value_error(fields: dict) -> None:
    try:
        profile = CpuProfile.from_fields(fields)
    except ValueError:
        return
    assert cpumodel.missing(profile, host(EVERYTHING)) is not None
    assert CpuProfile.from_fields(profile.to_fields()) == profile


def test_cpu_keys_are_core_keys_and_preflight_checks_their_values() -> None:
    from hvf import preflight
    from hvf.pluginmanager import Plugins

    plugins = Plugins()
    config = Config({"name": "vm", "cpu.model": "baseline", "cpu.features": "-x2apic"})
    assert preflight.check(config, plugins) == []  # no unknown-key warning
    for key, value, named in (("cpu.model", "skylake", "skylake"),
                              ("cpu.features", "-x2apic,+nope", "nope")):
        with pytest.raises(ConfigError, match=named):
            preflight.check(Config({"name": "vm", key: value}), plugins)
