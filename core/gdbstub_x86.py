# SPDX-License-Identifier: BSD-2-Clause
"""The x86-64 register set gdb sees through the stub, and its target description.

Two layouts, gdb's ``i386:x86-64`` and ``i386`` ones (features
``org.gnu.gdb.i386.core``, ``.sse`` and ``.segments``), each with the control registers
in a feature of hvf's own. gdb refuses a description whose architecture does not match
its ELF file, so the stub offers the one of the code the vCPU runs when gdb connects
(64-bit code: x86-64; otherwise i386, compatibility mode included). The target description (``target.xml``, read with ``qXfer:features:read``)
tells gdb the order and sizes; the ``g`` packet is the registers, little-endian, one
after another. The x87 tag word is given in full, built from the abridged FXSAVE form
KVM keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from hvf._kvm import ffi

from hvf.gdbstub_protocol import PacketError

if TYPE_CHECKING:
    from hvf.kvm import VcpuFd


@attrs.frozen
class Register:
    name: str
    bits: int
    type: str
    feature: str
    group: str = ""
    source: str = ""  # the vCPU state it shows (see read_state); its name if empty

    @property
    def key(self) -> str:
        return self.source or self.name


GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
I386_GPRS = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip")
SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
BASES = ("fs_base", "gs_base")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_POINTER_TYPES = {"rbp": "data_ptr", "rsp": "data_ptr", "rip": "code_ptr",
                  "ebp": "data_ptr", "esp": "data_ptr", "eip": "code_ptr"}

_EFLAGS = ("CF", "", "PF", "", "AF", "", "ZF", "SF", "TF", "IF", "DF", "OF", "", "",
           "NT", "", "RF", "VM", "AC", "VIF", "VIP", "ID")
_MXCSR = ("IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM",
          "FZ")
_VECTORS = (("v4_float", "ieee_single", 4), ("v2_double", "ieee_double", 2),
            ("v16_int8", "int8", 16), ("v8_int16", "int16", 8), ("v4_int32", "int32", 4),
            ("v2_int64", "int64", 2))


def _flags(name: str, bits: tuple[str, ...]) -> str:
    fields = "".join(f'<field name="{b}" start="{i}" end="{i}"/>'
                     for i, b in enumerate(bits) if b)
    return f'<flags id="{name}" size="4">{fields}</flags>'


def _types(feature: str) -> str:
    if feature.endswith(".core"):
        return _flags("i386_eflags", _EFLAGS)
    if feature.endswith(".sse"):
        vectors = "".join(f'<vector id="{n}" type="{t}" count="{c}"/>' for n, t, c in _VECTORS)
        fields = "".join(f'<field name="{n}" type="{n}"/>' for n, _, _ in _VECTORS)
        return (vectors + f'<union id="vec128">{fields}<field name="uint128" '
                'type="uint128"/></union>' + _flags("i386_mxcsr", _MXCSR))
    return ""


@attrs.frozen
class Layout:
    """A register set as gdb numbers it, and its target description."""

    architecture: str
    registers: tuple[Register, ...]

    @property
    def size(self) -> int:
        return sum(r.bits // 8 for r in self.registers)

    def target_xml(self) -> bytes:
        """The target description: architecture, then each feature's types and registers."""
        parts = ['<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
                 f"<target><architecture>{self.architecture}</architecture>"]
        for feature in dict.fromkeys(r.feature for r in self.registers):
            parts.append(f'<feature name="{feature}">{_types(feature)}')
            for i, r in enumerate(self.registers):
                if r.feature == feature:
                    group = f' group="{r.group}"' if r.group else ""
                    parts.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" '
                                 f'regnum="{i}"{group}/>')
            parts.append("</feature>")
        parts.append("</target>")
        return "".join(parts).encode()


def _layout(architecture: str, gprs: tuple[str, ...], bits: int, xmms: int) -> Layout:
    sources = {n: "r" + n[1:] for n in I386_GPRS}
    # gdb numbers i386 segment bases only for Linux processes, and fails an assertion on
    # the segments feature otherwise: there they join the system registers.
    segments = "org.gnu.gdb.i386.segments" if bits == 64 else "org.hvf.x86.system"
    return Layout(architecture, (
        *(Register(n, bits, _POINTER_TYPES.get(n, f"int{bits}"), "org.gnu.gdb.i386.core",
                   source=sources.get(n, "")) for n in gprs),
        Register("eflags", 32, "i386_eflags", "org.gnu.gdb.i386.core", source="rflags"),
        *(Register(n, 32, "int32", "org.gnu.gdb.i386.core") for n in SELECTORS),
        *(Register(f"st{i}", 80, "i387_ext", "org.gnu.gdb.i386.core", "float")
          for i in range(8)),
        *(Register(n, 32, "int", "org.gnu.gdb.i386.core", "float") for n in X87_CONTROL),
        *(Register(f"xmm{i}", 128, "vec128", "org.gnu.gdb.i386.sse", "vector")
          for i in range(xmms)),
        Register("mxcsr", 32, "i386_mxcsr", "org.gnu.gdb.i386.sse", "vector"),
        *(Register(n, bits, f"int{bits}", segments) for n in BASES),
        *(Register(n, 64, "int64", "org.hvf.x86.system", "system") for n in CONTROL),
    ))


#: gdb's i386:x86-64 registers, for a vCPU running 64-bit code.
AMD64 = _layout("i386:x86-64", GPRS, 64, 16)
#: gdb's i386 registers, for 16- and 32-bit code (compatibility mode included), which
#: 32-bit ELF files hold.
I386 = _layout("i386", I386_GPRS, 32, 8)


def layout_for(fd: VcpuFd) -> Layout:
    """The layout for the code the vCPU runs now (a 64-bit code segment: x86-64); gdb
    keeps it for the session."""
    return AMD64 if fd.get_sregs().cs.l else I386


# ---- reading and writing a vCPU's registers ----

def _full_tag(abridged: int, fpr: list[int], top: int) -> int:
    """The x87 tag word from FXSAVE's abridged one (a valid bit per physical register)."""
    tag = 0
    for physical in range(8):
        if not abridged & (1 << physical):
            value = 3  # empty
        else:
            st = fpr[(physical - top) & 7]
            exponent, mantissa = (st >> 64) & 0x7FFF, st & ((1 << 64) - 1)
            if exponent == 0x7FFF:
                value = 2  # special: infinity, NaN
            elif exponent == 0:
                value = 1 if mantissa == 0 else 2  # zero, or denormal
            else:
                value = 0 if mantissa >> 63 else 2  # valid, or unnormal
        tag |= value << (2 * physical)
    return tag


def _abridged_tag(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)


def read_state(fd: VcpuFd) -> dict[str, int]:
    """Every register either layout shows, by its 64-bit name."""
    r, s, f = fd.get_regs(), fd.get_sregs(), fd.get_fpu()
    state = {n: getattr(r, n) for n in (*GPRS, "rflags")}
    state.update((n, getattr(s, n).selector) for n in SELECTORS)
    fpr = [int.from_bytes(bytes(ffi.buffer(f.fpr[i]))[:10], "little") for i in range(8)]
    state.update((f"st{i}", v) for i, v in enumerate(fpr))
    state.update(fctrl=f.fcw, fstat=f.fsw, ftag=_full_tag(f.ftwx, fpr, (f.fsw >> 11) & 7),
                 fiseg=(f.last_ip >> 32) & 0xFFFF, fioff=f.last_ip & 0xFFFFFFFF,
                 foseg=(f.last_dp >> 32) & 0xFFFF, fooff=f.last_dp & 0xFFFFFFFF,
                 fop=f.last_opcode, mxcsr=f.mxcsr, fs_base=s.fs.base, gs_base=s.gs.base)
    state.update((f"xmm{i}", int.from_bytes(bytes(ffi.buffer(f.xmm[i])), "little"))
                 for i in range(16))
    state.update((n, getattr(s, n)) for n in CONTROL)
    return state


def encode(layout: Layout, state: dict[str, int]) -> bytes:
    """The ``g`` packet's bytes: each register, truncated to its size."""
    return b"".join((state[r.key] & ((1 << r.bits) - 1)).to_bytes(r.bits // 8, "little")
                    for r in layout.registers)


def _merge(state: dict[str, int], r: Register, data: bytes) -> None:
    mask = (1 << r.bits) - 1
    state[r.key] = (state[r.key] & ~mask) | int.from_bytes(data, "little")


def decode(layout: Layout, data: bytes, state: dict[str, int]) -> dict[str, int]:
    """``state`` with the registers of a ``G`` packet put in (the high halves of a
    32-bit layout's registers kept)."""
    if len(data) != layout.size:
        raise PacketError(f"{len(data)} bytes of registers, expected {layout.size}")
    new, at = dict(state), 0
    for r in layout.registers:
        _merge(new, r, data[at : at + r.bits // 8])
        at += r.bits // 8
    return new


def register_bytes(layout: Layout, state: dict[str, int], number: int) -> bytes:
    r = _register(layout, number)
    return (state[r.key] & ((1 << r.bits) - 1)).to_bytes(r.bits // 8, "little")


def with_register(layout: Layout, state: dict[str, int], number: int,
                  data: bytes) -> dict[str, int]:
    """``state`` with register ``number`` set from ``P``'s bytes."""
    r = _register(layout, number)
    if len(data) != r.bits // 8:
        raise PacketError(f"{len(data)} bytes for {r.name}, which has {r.bits // 8}")
    new = dict(state)
    _merge(new, r, data)
    return new


def _register(layout: Layout, number: int) -> Register:
    if not 0 <= number < len(layout.registers):
        raise PacketError(f"no register {number}")
    return layout.registers[number]


def write_state(fd: VcpuFd, old: dict[str, int], new: dict[str, int]) -> None:
    """Set the registers that differ; a changed segment selector is refused (its
    descriptor would have to be loaded from the guest's tables)."""
    changed = {n for n in new if new[n] != old[n]}
    if changed & set(SELECTORS):
        raise PacketError("segment selectors cannot be changed")
    if changed & {*GPRS, "rflags"}:
        r = fd.get_regs()
        for n in (*GPRS, "rflags"):
            setattr(r, n, new[n])
        fd.set_regs(r)
    if changed & {*BASES, *CONTROL}:
        s = fd.get_sregs()
        s.fs.base, s.gs.base = new["fs_base"], new["gs_base"]
        for n in CONTROL:
            setattr(s, n, new[n])
        fd.set_sregs(s)
    if changed - {*GPRS, "rflags", *BASES, *CONTROL}:
        fd.set_fpu(_fpu(fd.get_fpu(), new))


def _fpu(f: Any, value: dict[str, int]) -> Any:
    for i in range(8):
        ffi.buffer(f.fpr[i])[:10] = value[f"st{i}"].to_bytes(10, "little")
    for i in range(16):
        ffi.buffer(f.xmm[i])[:] = value[f"xmm{i}"].to_bytes(16, "little")
    f.fcw, f.fsw = value["fctrl"] & 0xFFFF, value["fstat"] & 0xFFFF
    f.ftwx = _abridged_tag(value["ftag"])
    f.last_ip = (value["fiseg"] & 0xFFFF) << 32 | value["fioff"]
    f.last_dp = (value["foseg"] & 0xFFFF) << 32 | value["fooff"]
    f.last_opcode = value["fop"] & 0xFFFF
    f.mxcsr = value["mxcsr"]
    return f


def linear_pc(fd: VcpuFd) -> int:
    """The linear address of the next instruction (CS base + RIP)."""
    return (fd.get_sregs().cs.base + fd.get_regs().rip) & ((1 << 64) - 1)
