# SPDX-License-Identifier: BSD-2-Clause
"""CPUID feature bits by name, and hvf's named CPU models.

Names are those of Linux's ``/proc/cpuinfo`` flags (``sse4_2``, ``x2apic``,
``avx512f``), so a guest's or a host's flags read the same as ``-o cpu.features``. A
*feature register* is one (leaf, subleaf, register) of CPUID whose bits each say
that the CPU has something; :data:`REGISTERS` names their bits.

The models (``-o cpu.model=NAME``) are the x86-64 psABI micro-architecture levels,
each a set of features on top of the one before; a guest given a model sees exactly
those features (and :data:`PLATFORM`'s), whatever more the host has:

=============  =======================================================================
``x86-64``     fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36
               clflush mmx fxsr sse sse2 syscall nx lm (every x86-64 CPU)
``x86-64-v2``  + cx16 lahf_lm popcnt sse3 sse4_1 sse4_2 ssse3 (``baseline``)
``x86-64-v3``  + avx avx2 bmi1 bmi2 f16c fma abm movbe xsave
``x86-64-v4``  + avx512f avx512bw avx512cd avx512dq avx512vl
``host``       everything the host's KVM offers (the default)
=============  =======================================================================
"""

from __future__ import annotations

#: A feature register: CPUID leaf, subleaf and register ("eax" .. "edx").
Register = tuple[int, int, str]

#: Each feature register's bits, bit 0 first; ``-`` is a bit without a name here.
_BITS: dict[Register, str] = {
    (1, 0, "ecx"): "sse3 pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cid sdbg fma "
                   "cx16 xtpr pdcm - pcid dca sse4_1 sse4_2 x2apic movbe popcnt "
                   "tsc_deadline_timer aes xsave osxsave avx f16c rdrand hypervisor",
    (1, 0, "edx"): "fpu vme de pse tsc msr pae mce cx8 apic - sep mtrr pge mca cmov pat pse36 "
                   "pn clflush - dts acpi mmx fxsr sse sse2 ss ht tm ia64 pbe",
    (7, 0, "ebx"): "fsgsbase tsc_adjust sgx bmi1 hle avx2 fdp_excptn_only smep bmi2 erms "
                   "invpcid rtm cqm zero_fcs_fds mpx rdt_a avx512f avx512dq rdseed adx smap "
                   "avx512ifma pcommit clflushopt clwb intel_pt avx512pf avx512er avx512cd "
                   "sha_ni avx512bw avx512vl",
    (7, 0, "ecx"): "prefetchwt1 avx512vbmi umip pku ospke waitpkg avx512_vbmi2 shstk gfni "
                   "vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq - la57 - "
                   "- - - - rdpid - bus_lock_detect cldemote - movdiri movdir64b enqcmd "
                   "sgx_lc pks",
    (7, 0, "edx"): "- - avx512_4vnniw avx512_4fmaps fsrm - - - avx512_vp2intersect - md_clear "
                   "- - - serialize hybrid_cpu tsxldtrk - pconfig arch_lbr ibt - amx_bf16 "
                   "avx512_fp16 amx_tile amx_int8 spec_ctrl intel_stibp flush_l1d "
                   "arch_capabilities core_capabilities spec_ctrl_ssbd",
    (7, 1, "eax"): "- - - - avx_vnni avx512_bf16",
    (0xD, 1, "eax"): "xsaveopt xsavec xgetbv1 xsaves",
    (0x80000001, 0, "ecx"): "lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse "
                            "3dnowprefetch osvw ibs xop skinit wdt - lwp fma4 tce - "
                            "nodeid_msr - tbm topoext perfctr_core perfctr_nb - bpext ptsc "
                            "perfctr_llc mwaitx",
    (0x80000001, 0, "edx"): "- - - - - - - - - - - syscall - - - - - - - mp nx - mmxext - - "
                            "fxsr_opt pdpe1gb rdtscp - lm 3dnowext 3dnow",
    (0x80000008, 0, "ebx"): "clzero irperf xsaveerptr - rdpru - - - - wbnoinvd - - amd_ibpb "
                            "- amd_ibrs amd_stibp - - - - - - - - amd_ssbd virt_ssbd "
                            "amd_ssb_no",
    # KVM's paravirtual features (its leaf 0x40000001): the host kernel's, not the CPU's.
    (0x40000001, 0, "eax"): "kvmclock nopiodelay mmu_op kvmclock2 async_pf steal_time pv_eoi "
                            "pv_unhalt - pv_tlb_flush async_pf_vmexit pv_send_ipi "
                            "poll_control pv_sched_yield async_pf_int msi_ext_dest_id "
                            "hc_map_gpa_range migration_control - - - - - - kvmclock_stable",
}
#: The XSAVE state components the guest may enable in XCR0 (leaf 0xD.0 EAX, then EDX).
XSTATE = ("x87 sse avx mpx_bndregs mpx_bndcsr avx512_opmask avx512_zmm_hi256 avx512_hi16_zmm "
          "pt pkru pasid cet_u cet_s hdc uintr lbr hwp amx_tilecfg amx_tiledata").split()

#: name → (register, bit)
FEATURES: dict[str, tuple[Register, int]] = {
    name: (register, bit)
    for register, names in _BITS.items()
    for bit, name in enumerate(names.split()) if name != "-"
}
REGISTERS: tuple[Register, ...] = tuple(_BITS)
#: KVM's paravirtual leaf: compared with a host's, never masked by a model.
PARAVIRT: Register = (0x40000001, 0, "eax")
#: Bits the guest's own settings or hvf's topology change (CR4.OSXSAVE and CR4.PKE,
#: HTT): neither a model's nor a host's.
DYNAMIC = frozenset({"osxsave", "ospke", "ht"})
#: What every model keeps from the host: the virtual platform's, not the CPU's (the
#: hypervisor bit, KVM's emulated local APIC timer and x2APIC, which -x decides).
PLATFORM = frozenset({"hypervisor", "tsc_deadline_timer", "x2apic"}) | DYNAMIC

_X86_64 = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush "
           "mmx fxsr sse sse2 syscall nx lm").split()
_V2 = [*_X86_64, *"cx16 lahf_lm popcnt sse3 sse4_1 sse4_2 ssse3".split()]
_V3 = [*_V2, *"avx avx2 bmi1 bmi2 f16c fma abm movbe xsave".split()]
_V4 = [*_V3, *"avx512f avx512bw avx512cd avx512dq avx512vl".split()]
#: The named models and their features; ``host`` is not among them (it masks nothing).
MODELS: dict[str, frozenset[str]] = {
    "x86-64": frozenset(_X86_64),
    "x86-64-v2": frozenset(_V2),
    "x86-64-v3": frozenset(_V3),
    "x86-64-v4": frozenset(_V4),
}
ALIASES = {"baseline": "x86-64-v2"}
HOST = "host"
MODEL_NAMES = (HOST, *ALIASES, *MODELS)


def model_xcr0(features: frozenset[str]) -> int:
    """The XSAVE components a model's guest may enable: x87 and SSE state, and the
    state of the AVX, AVX-512 and PKU features it has."""
    mask = 0b11
    if "avx" in features:
        mask |= 1 << XSTATE.index("avx")
    if "avx512f" in features:
        mask |= 0b111 << XSTATE.index("avx512_opmask")
    if "pku" in features:
        mask |= 1 << XSTATE.index("pkru")
    return mask


def describe(register: Register, bit: int) -> str:
    """``x2apic (CPUID 0x1 ECX bit 21)``, or without a name when it has none here."""
    leaf, subleaf, reg = register
    where = f"CPUID {leaf:#x}{f'.{subleaf}' if subleaf else ''} {reg.upper()} bit {bit}"
    names = _BITS.get(register, "").split()
    name = names[bit] if bit < len(names) else "-"
    return where if name == "-" else f"{name} ({where})"
