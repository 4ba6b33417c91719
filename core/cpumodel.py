# SPDX-License-Identifier: BSD-2-Clause
"""The CPU a guest is given, and whether a host can give it again.

``-o cpu.model=host|baseline|NAME`` picks what the guest's CPUID shows (see
:mod:`hvf.cpufeatures` for the models: ``host`` is everything the host's KVM offers,
a named model exactly its features), ``-o cpu.features=-x2apic,-pku,+NAME`` then takes
features away or adds ones the host has. hvf's own rules come last: each vCPU's APIC ID
and the CPU count in leaves 1, 0xB and 0x1F, HTT with more than one vCPU, and x2APIC
only with ``-x`` (``x86.x2apic``, as bhyve) unless ``cpu.features`` names it.

What the guest was given is a :class:`CpuProfile`: vCPU 0's CPUID, the MSRs KVM saves
for it and its TSC frequency. Snapshots keep it (the ``cpu`` chunk) and a migration's
handshake carries it; :func:`check_host` lists what a host lacks of it (the CPU
vendor, CPUID features, XSAVE state, MSRs, a TSC frequency it can neither match nor
scale to), so that a restore or an incoming migration is refused before the guest
runs, and a restored guest gets the CPUID it had, not the new host's.

Testing hook: ``HVF_HOST_CPU_FEATURES=-x2apic,-avx2`` (the syntax of
``cpu.features``, removals only) makes hvf treat this host's KVM as one that cannot
offer those features, for every VM the process builds: to test the compatibility
checks, or to try whether a guest would move to an older host.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs

from hvf import cpufeatures as cf
from hvf._kvm import ffi, lib
from hvf.config import Config
from hvf.errors import ConfigError
from hvf.snapshot_api import Fields, field_int

if TYPE_CHECKING:
    from hvf.kvm import Kvm, VcpuFd
    from hvf.vm import Machine

#: (function, index, flags, eax, ebx, ecx, edx), as in ``struct kvm_cpuid_entry2``.
CpuidEntry = tuple[int, int, int, int, int, int, int]
HOST_FEATURES_ENV = "HVF_HOST_CPU_FEATURES"
#: The chunk a snapshot keeps the profile in, and its version.
CHUNK, CHUNK_VERSION = "cpu", 1
#: A TSC this close to the guest's needs no scaling (KVM's tsc_tolerance_ppm default).
TSC_TOLERANCE_PPM = 250
MAX_ENTRIES, MAX_MSRS = 512, 4096
_REG = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}
_U32 = (1 << 32) - 1


@attrs.frozen
class CpuProfile:
    """The CPU a guest was given: ``cpuid`` is vCPU 0's (the others differ only in
    their APIC IDs), ``msrs`` the MSRs KVM saves, ``tsc_khz`` its TSC (0: unknown)."""

    model: str
    features: str
    cpuid: tuple[CpuidEntry, ...]
    msrs: tuple[int, ...]
    tsc_khz: int

    def to_fields(self) -> Fields:
        return {"model": self.model, "features": self.features,
                "cpuid": [list(e) for e in self.cpuid], "msrs": list(self.msrs),
                "tsc_khz": self.tsc_khz}

    @classmethod
    def from_fields(cls, fields: Fields) -> CpuProfile:
        """A profile from untrusted fields; ValueError names the field at fault."""
        texts = [fields.get(k) for k in ("model", "features")]
        if not all(isinstance(t, str) and len(t) < 4096 for t in texts):
            raise ValueError("saved field 'model' or 'features' is not a short string")
        cpuid, msrs = fields.get("cpuid"), fields.get("msrs")
        if not isinstance(cpuid, list) or not 0 < len(cpuid) <= MAX_ENTRIES or not all(
                isinstance(e, list) and len(e) == 7 and all(type(x) is int and 0 <= x <= _U32
                                                            for x in e) for e in cpuid):
            raise ValueError(f"saved field 'cpuid' is not 1 to {MAX_ENTRIES} entries of "
                             "7 unsigned 32-bit integers")
        if not isinstance(msrs, list) or len(msrs) > MAX_MSRS or not all(
                type(m) is int and 0 <= m <= _U32 for m in msrs):
            raise ValueError(f"saved field 'msrs' is not a list of at most {MAX_MSRS} MSRs")
        return cls(texts[0], texts[1], tuple(tuple(e) for e in cpuid),  # type: ignore[misc]
                   tuple(msrs), field_int(fields, "tsc_khz", 32))

    def register(self, register: cf.Register) -> int:
        """The value of a feature register (0 when the leaf is absent)."""
        return _register(self.cpuid, register)

    def has(self, feature: str) -> bool:
        register, bit = cf.FEATURES[feature]
        return bool(self.register(register) >> bit & 1)

    @property
    def vendor(self) -> str:
        return _vendor(self.cpuid)

    def for_vcpu(self, apic_id: int) -> Any:
        """vCPU ``apic_id``'s CPUID, a ``struct kvm_cpuid2`` for KVM_SET_CPUID2."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(self.cpuid),
                                                "entries": len(self.cpuid)})
        for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(self.cpuid):
            if function == 1:
                ebx = (ebx & 0x00FFFFFF) | (apic_id << 24)
            elif function in (0xB, 0x1F):
                edx = apic_id
            e = cpuid.entries[i]
            e.function, e.index, e.flags = function, index, flags
            e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
        return cpuid


@attrs.frozen
class HostCpu:
    """What a host's KVM can give a guest (with :data:`HOST_FEATURES_ENV` applied)."""

    cpuid: tuple[CpuidEntry, ...]
    msrs: frozenset[int]
    tsc_khz: int  #: 0: unknown
    tsc_scaling: bool


def _register(entries: Iterable[CpuidEntry], register: cf.Register) -> int:
    leaf, subleaf, reg = register
    return next((e[_REG[reg]] for e in entries if e[0] == leaf and e[1] == subleaf), 0)


def _vendor(entries: Iterable[CpuidEntry]) -> str:
    leaf0 = next((e for e in entries if e[0] == 0), None)
    if leaf0 is None:
        return ""
    return b"".join(x.to_bytes(4, "little") for x in (leaf0[4], leaf0[6], leaf0[5])).decode(
        "ascii", "replace")


# ---- configuration ----


def parse_features(text: str, where: str = "cpu.features") -> list[tuple[bool, str]]:
    """``-x2apic,+avx2,pku`` → [(False, "x2apic"), (True, "avx2"), (True, "pku")]."""
    changes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        add = not item.startswith("-")
        name = item.lstrip("+-").lower()
        if name not in cf.FEATURES:
            import difflib

            close = difflib.get_close_matches(name, cf.FEATURES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown CPU feature '{name}'{hint}; known features: "
                              + " ".join(sorted(cf.FEATURES)))
        changes.append((add, name))
    return changes


def model_name(config: Config) -> str:
    """``cpu.model``, an alias resolved; an unknown name is a ConfigError."""
    name = (config.get("cpu.model") or cf.HOST).lower()
    if name not in cf.MODEL_NAMES:
        raise ConfigError(f"cpu.model={name}: unknown CPU model (known: "
                          f"{', '.join(cf.MODEL_NAMES)}; baseline is x86-64-v2)")
    return cf.ALIASES.get(name, name)


def check_config(config: Config) -> list[str]:
    """Refuse an unknown model or feature name (before anything is built); returns
    warnings (``-x`` that ``cpu.features`` overrides)."""
    model_name(config)
    changes = {name: add for add, name in parse_features(config.get("cpu.features") or "")}
    _hidden_on_host()
    if changes.get("x2apic") is False and config.get_bool("x86.x2apic"):
        return ["-x (x86.x2apic=true) is overridden by cpu.features=-x2apic: the guest "
                "sees no x2APIC"]
    return []


# ---- the host ----


def host_cpu(kvm: Kvm, vcpu: VcpuFd | None = None) -> HostCpu:
    """What ``kvm`` can give a guest. Its CPUID features are those it supports and
    those a vCPU given them reports (kvm_pvm's guests see the hardware's own feature
    bits, whatever KVM_SET_CPUID2 says, and KVM_GET_CPUID2 shows them): ``vcpu`` is a
    vCPU not yet run to ask (its CPUID is overwritten); without one a scratch VM and
    vCPU are made and closed. Asked once per process (and :data:`HOST_FEATURES_ENV`)."""
    hidden = os.environ.get(HOST_FEATURES_ENV, "")
    if hidden in _hosts:
        return _hosts[hidden]
    supported = kvm.supported_cpuid()
    if vcpu is None:
        scratch = kvm.create_vm()
        try:
            probe = scratch.create_vcpu(0)
            try:
                reported, tsc_khz = _probe(kvm, probe, supported)
            finally:
                probe.close()
        finally:
            scratch.close()
    else:
        reported, tsc_khz = _probe(kvm, vcpu, supported)
    offered = {(e[0], e[1]): e for e in _entries(supported)}
    for e in reported:
        if (e[0], e[1]) in offered:
            got = offered[e[0], e[1]]
            offered[e[0], e[1]] = (*got[:3], *(a | b for a, b in zip(got[3:], e[3:])))
    cpuid = _with_bits(offered.values(), dict.fromkeys(_hidden_on_host(), False))
    host = _hosts[hidden] = HostCpu(cpuid, frozenset(kvm.msr_index_list()), tsc_khz,
                                    bool(kvm.check_extension(lib.KVM_CAP_TSC_CONTROL)))
    return host


_hosts: dict[str, HostCpu] = {}


def _entries(cpuid: Any) -> list[CpuidEntry]:
    return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))]


def _probe(kvm: Kvm, vcpu: VcpuFd, supported: Any) -> tuple[list[CpuidEntry], int]:
    """What ``vcpu`` reports when given ``supported``, and its TSC frequency (kHz; 0
    where KVM cannot tell)."""
    vcpu.set_cpuid2(supported)
    tsc_khz = 0
    if kvm.check_extension(lib.KVM_CAP_GET_TSC_KHZ):
        tsc_khz = max(lib.hvf_ioctl_int(vcpu.fd, lib.KVM_GET_TSC_KHZ, 0), 0)
    return vcpu.get_cpuid2(), tsc_khz


def _hidden_on_host() -> list[str]:
    """The features :data:`HOST_FEATURES_ENV` takes away."""
    changes = parse_features(os.environ.get(HOST_FEATURES_ENV, ""), HOST_FEATURES_ENV)
    if any(add for add, _ in changes):
        raise ConfigError(f"{HOST_FEATURES_ENV} can only take features away (-name)")
    return [name for _, name in changes]


def _with_bits(entries: Iterable[CpuidEntry], bits: dict[str, bool]) -> tuple[CpuidEntry, ...]:
    """``entries`` with each named feature set (True) or cleared (False)."""
    out = []
    for entry in entries:
        e = list(entry)
        for name, on in bits.items():
            (leaf, subleaf, reg), bit = cf.FEATURES[name]
            if e[0] == leaf and e[1] == subleaf:
                e[_REG[reg]] = e[_REG[reg]] | 1 << bit if on else e[_REG[reg]] & ~(1 << bit)
        out.append(tuple(e))
    return tuple(out)  # type: ignore[arg-type]


# ---- building the guest's CPU ----


def build(config: Config, ncpus: int, host: HostCpu) -> CpuProfile:
    """The profile ``config`` asks for on ``host``; ConfigError when the host lacks
    what the model or ``cpu.features`` needs, listing it."""
    model = model_name(config)
    entries = list(host.cpuid)
    if model != cf.HOST:
        entries = _masked(entries, cf.MODELS[model])
        lacking = [f for f in sorted(cf.MODELS[model]) if not _has(host.cpuid, f)]
        if lacking:
            raise ConfigError(f"cpu.model={config.get('cpu.model')}: this host's KVM does "
                              f"not offer {', '.join(lacking)}")
    bits = {"x2apic": config.get_bool("x86.x2apic") and _has(host.cpuid, "x2apic")}
    for add, name in parse_features(config.get("cpu.features") or ""):
        if add and not _has(host.cpuid, name):
            raise ConfigError(f"cpu.features: +{name}: this host's KVM does not offer it")
        bits[name] = add
    if ncpus > 1:
        bits["ht"] = True
    cpuid = _with_bits(entries, bits)
    cpuid = tuple((f, i, fl, a, (b & 0xFF00FFFF) | (min(ncpus, 255) << 16), c, d)
                  if f == 1 else (f, i, fl, a, b, c, d) for f, i, fl, a, b, c, d in cpuid)
    return CpuProfile(config.get("cpu.model") or cf.HOST, config.get("cpu.features") or "",
                      cpuid, tuple(sorted(host.msrs)), host.tsc_khz)


def _has(entries: Iterable[CpuidEntry], feature: str) -> bool:
    register, bit = cf.FEATURES[feature]
    return bool(_register(entries, register) >> bit & 1)


def _masked(entries: list[CpuidEntry], features: frozenset[str]) -> list[CpuidEntry]:
    """Every feature register cleared but for ``features`` and the platform's bits;
    XCR0's components cut to those features' state."""
    keep: dict[cf.Register, int] = dict.fromkeys(cf.REGISTERS, 0)
    for name in features | cf.PLATFORM:
        register, bit = cf.FEATURES[name]
        keep[register] |= 1 << bit
    keep[cf.PARAVIRT] = _U32
    xcr0 = cf.model_xcr0(features)
    out = []
    for entry in entries:
        e = list(entry)
        for (leaf, subleaf, reg), mask in keep.items():
            if e[0] == leaf and e[1] == subleaf:
                e[_REG[reg]] &= mask
        if e[0] == 0xD and e[1] == 0:
            e[3], e[6] = e[3] & xcr0, 0
        out.append(tuple(e))
    return out  # type: ignore[return-value]


# ---- what a host lacks of a profile ----


def missing(profile: CpuProfile, host: HostCpu) -> list[str]:
    """What ``host`` cannot give a guest that had ``profile``, one item each."""
    lacking = []
    if profile.vendor != _vendor(host.cpuid):
        lacking.append(f"a {profile.vendor or 'unknown'} CPU (this host's is "
                       f"{_vendor(host.cpuid) or 'unknown'})")
    dynamic = {cf.FEATURES[name] for name in cf.DYNAMIC}
    for register in cf.REGISTERS:
        absent = profile.register(register) & ~_register(host.cpuid, register)
        lacking += [cf.describe(register, bit) for bit in range(32)
                    if absent >> bit & 1 and (register, bit) not in dynamic]
    for reg, shift in (("eax", 0), ("edx", 32)):
        absent = profile.register((0xD, 0, reg)) & ~_register(host.cpuid, (0xD, 0, reg))
        lacking += [f"XSAVE state {cf.XSTATE[b + shift] if b + shift < len(cf.XSTATE) else b}"
                    for b in range(32) if absent >> b & 1]
    lacking += [f"MSR {m:#x}" for m in profile.msrs if m not in host.msrs]
    if profile.tsc_khz and host.tsc_khz and not host.tsc_scaling and not tsc_close(
            profile.tsc_khz, host.tsc_khz):
        lacking.append(f"a TSC at {profile.tsc_khz / 1000:.3f} MHz (this host's runs at "
                       f"{host.tsc_khz / 1000:.3f} MHz and its KVM cannot scale it)")
    return lacking


def tsc_close(a: int, b: int) -> bool:
    return abs(a - b) * 1_000_000 <= TSC_TOLERANCE_PPM * b


def check_host(profile: CpuProfile, kvm: Kvm) -> list[str]:
    """What this host's KVM lacks of ``profile`` (empty: it can run the guest); makes
    and closes a scratch VM to ask."""
    return missing(profile, host_cpu(kvm))


def guest_cpu(vm: Machine) -> CpuProfile:
    """The CPU ``vm``'s guest was given."""
    return vm.cpu


def apply(vm: Machine, saved: CpuProfile | None = None) -> CpuProfile:
    """Give every vCPU of ``vm`` (not yet run) its CPUID, and the saved TSC frequency:
    built from the configuration, or ``saved``'s once this host is found to provide
    it (ConfigError listing what it lacks). Returns what the guest is given, as KVM
    reports it."""
    first = vm.vcpus[0].fd
    host = host_cpu(vm.kvm, first)
    if saved is None:
        profile = build(vm.config, vm.ncpus, host)
    else:
        lacking = missing(saved, host)
        if lacking:
            raise ConfigError("this host cannot give the guest the CPU it had: "
                              + "; ".join(lacking))
        profile = saved
    for vcpu in vm.vcpus:
        vcpu.fd.set_cpuid2(profile.for_vcpu(vcpu.index))
        if profile.tsc_khz and host.tsc_khz and profile.tsc_khz != host.tsc_khz \
                and host.tsc_scaling:
            r = lib.hvf_ioctl_int(vcpu.fd.fd, lib.KVM_SET_TSC_KHZ, profile.tsc_khz)
            if r < 0:
                raise ConfigError(f"vcpu {vcpu.index}: KVM cannot set the TSC to "
                                  f"{profile.tsc_khz} kHz (error {-r})")
    if saved is None:
        profile = attrs.evolve(profile, cpuid=tuple(first.get_cpuid2()))
    return profile
