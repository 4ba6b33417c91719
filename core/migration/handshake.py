# SPDX-License-Identifier: BSD-2-Clause
"""The HELLO a source sends and the destination's checks of it.

HELLO is one JSON object::

    {"hvf_version": "0.1.0", "protocol": 1, "state_format": 1, "page_size": 4096,
     "ram": "copy" | "shared" | "private",
     "machine": {"memory_size": BYTES, "cpus": N, "config": {"key": "value", ...}},
     "cpuid": [[[function, index, flags, eax, ebx, ecx, edx], ...] per vCPU],
     "source": {"vm": NAME, "pid": PID, "control": SOCKET PATH}}

``ram``: ``copy`` sends every page; with ``shared`` (``--local``) the frame carries
the guest's memfd, which the destination maps shared and no page is sent; with
``private`` (``--local`` from a VM restored from a snapshot, whose RAM is that
snapshot's file mapped copy-on-write) it carries the RAM file, which the destination
maps copy-on-write too, and only the pages the source holds privately are sent.

The peer is untrusted: every field is checked for type and range, the CPU the guest
was given against what this host's KVM offers (the features missing are listed), and
nothing is allocated from a size the peer gives beyond the guest RAM it asks for.
"""

from __future__ import annotations

import json
import os
import stat
from typing import TYPE_CHECKING, Any

import attrs

from hvf import __version__ as HVF_VERSION
from hvf.errors import MigrationError
from hvf.extents import PAGE
from hvf.preflight import MAX_VCPUS

if TYPE_CHECKING:
    from hvf.vm import Machine

PROTOCOL = 1
#: Versions of the chunk encoding (:mod:`hvf.plugins.snapshot.statefile`) understood.
STATE_FORMATS = (1,)
RAM_MODES = ("copy", "shared", "private")
MAX_CONFIG_KEYS = 4096
MAX_STRING = 4096
MAX_CPUID_ENTRIES = 512
U32 = (1 << 32) - 1

CpuidEntry = tuple[int, int, int, int, int, int, int]

#: Feature bits a destination must offer: (function, index, register) → names by bit.
FEATURES: dict[tuple[int, int, int], dict[int, str]] = {
    (1, 0, 5): {0: "sse3", 1: "pclmulqdq", 9: "ssse3", 12: "fma", 13: "cx16", 19: "sse4_1",
                20: "sse4_2", 21: "x2apic", 22: "movbe", 23: "popcnt", 25: "aes",
                26: "xsave", 28: "avx", 29: "f16c", 30: "rdrand"},
    (1, 0, 6): {0: "fpu", 4: "tsc", 5: "msr", 6: "pae", 8: "cx8", 11: "sep", 13: "pge",
                15: "cmov", 16: "pat", 19: "clflush", 23: "mmx", 24: "fxsr", 25: "sse",
                26: "sse2"},
    (7, 0, 4): {0: "fsgsbase", 3: "bmi1", 4: "hle", 5: "avx2", 7: "smep", 8: "bmi2",
                9: "erms", 10: "invpcid", 11: "rtm", 16: "avx512f", 18: "rdseed",
                19: "adx", 20: "smap", 23: "clflushopt", 24: "clwb", 29: "sha_ni"},
    (7, 0, 5): {1: "avx512vbmi", 2: "umip", 3: "pku", 8: "gfni", 9: "vaes",
                10: "vpclmulqdq", 22: "rdpid"},
    (7, 0, 6): {10: "md_clear", 14: "serialize", 29: "arch_capabilities"},
    (0xD, 1, 3): {0: "xsaveopt", 1: "xsavec", 3: "xsaves"},
    (0x80000001, 0, 5): {0: "lahf_lm", 5: "abm", 6: "sse4a", 8: "3dnowprefetch"},
    (0x80000001, 0, 6): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
}
#: Bits that reflect the guest's own settings or hvf's topology, not the host's CPU.
DYNAMIC = {(1, 0, 5): 1 << 27, (1, 0, 6): (1 << 9) | (1 << 28), (7, 0, 5): 1 << 4}
_REGISTERS = {3: "EAX", 4: "EBX", 5: "ECX", 6: "EDX"}


@attrs.frozen
class Offer:
    """A checked HELLO."""

    hvf_version: str
    ram: str
    memory_size: int
    cpus: int
    config: dict[str, str]
    cpuid: list[list[CpuidEntry]]
    source_vm: str
    source_pid: int
    source_control: str


def hello(vm: Machine, ram: str) -> dict[str, Any]:
    """The HELLO for ``vm`` (paused or not)."""
    control = vm.control
    return {
        "hvf_version": HVF_VERSION, "protocol": PROTOCOL, "state_format": STATE_FORMATS[-1],
        "page_size": PAGE, "ram": ram,
        "machine": {"memory_size": vm.memory.size, "cpus": vm.ncpus,
                    "config": vm.config.as_dict()},
        "cpuid": [[list(e) for e in vcpu.fd.get_cpuid2()] for vcpu in vm.vcpus],
        "source": {"vm": vm.name, "pid": os.getpid(),
                   "control": str(control.path) if control is not None else ""},
    }


def _need(doc: dict[str, Any], key: str, kind: type, where: str = "HELLO") -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MigrationError(f"{where}: '{key}' is missing or not a {kind.__name__}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_STRING:
        raise MigrationError(f"{where} is not a string of at most {MAX_STRING} characters")
    return value


def parse_hello(payload: bytes) -> Offer:
    """Check a HELLO's fields (not yet the CPU: :func:`missing_features`)."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise MigrationError(f"HELLO is not JSON: {str(e)[:100]}") from None
    if not isinstance(doc, dict):
        raise MigrationError("HELLO is not a JSON object")
    protocol = _need(doc, "protocol", int)
    version = _string(doc.get("hvf_version"), "HELLO's hvf_version")
    if protocol != PROTOCOL:
        raise MigrationError(f"the source (hvf {version}) speaks migration protocol "
                             f"{protocol}; this hvf ({HVF_VERSION}) speaks {PROTOCOL}")
    state_format = _need(doc, "state_format", int)
    if state_format not in STATE_FORMATS:
        raise MigrationError(f"the source (hvf {version}) encodes device state in format "
                             f"{state_format}; this hvf ({HVF_VERSION}) reads "
                             f"{', '.join(map(str, STATE_FORMATS))}")
    if _need(doc, "page_size", int) != PAGE:
        raise MigrationError(f"the source's page size is {doc['page_size']}, this host's "
                             f"{PAGE}")
    ram = doc.get("ram")
    if ram not in RAM_MODES:
        raise MigrationError(f"HELLO's ram is {ram!r}, not one of {', '.join(RAM_MODES)}")
    machine = _need(doc, "machine", dict)
    size = _need(machine, "memory_size", int, "HELLO's machine")
    cpus = _need(machine, "cpus", int, "HELLO's machine")
    if size <= 0 or size % PAGE or size >= 1 << 48:
        raise MigrationError(f"HELLO's memory size {size} is not a positive number of pages")
    if not 1 <= cpus <= MAX_VCPUS:
        raise MigrationError(f"HELLO's CPU count {cpus} is not between 1 and {MAX_VCPUS}")
    raw_config = _need(machine, "config", dict, "HELLO's machine")
    if len(raw_config) > MAX_CONFIG_KEYS:
        raise MigrationError(f"HELLO's configuration has more than {MAX_CONFIG_KEYS} keys")
    config = {_string(k, "a configuration key"): _string(v, f"configuration value of {k!r}")
              for k, v in raw_config.items()}
    source = _need(doc, "source", dict)
    return Offer(hvf_version=version, ram=ram, memory_size=size, cpus=cpus, config=config,
                 cpuid=_cpuid(doc.get("cpuid"), cpus),
                 source_vm=_string(source.get("vm"), "HELLO's source vm"),
                 source_pid=_need(source, "pid", int, "HELLO's source"),
                 source_control=_string(source.get("control"), "HELLO's source control"))


def _cpuid(value: Any, cpus: int) -> list[list[CpuidEntry]]:
    if not isinstance(value, list) or len(value) != cpus:
        raise MigrationError(f"HELLO's cpuid is not a list of {cpus} vCPUs' CPUID tables")
    tables = []
    for n, table in enumerate(value):
        if not isinstance(table, list) or not 1 <= len(table) <= MAX_CPUID_ENTRIES:
            raise MigrationError(f"HELLO's CPUID of vCPU {n} is not a list of 1 to "
                                 f"{MAX_CPUID_ENTRIES} entries")
        entries = []
        for entry in table:
            if (not isinstance(entry, list) or len(entry) != 7
                    or not all(type(x) is int and 0 <= x <= U32 for x in entry)):
                raise MigrationError(f"HELLO's CPUID of vCPU {n} has an entry that is not "
                                     f"seven 32-bit values")
            entries.append(tuple(entry))
        tables.append(entries)
    return tables  # type: ignore[return-value]


def feature_name(function: int, index: int, register: int, bit: int) -> str:
    name = FEATURES.get((function, index, register), {}).get(bit)
    where = f"CPUID.(EAX={function:#x},ECX={index}).{_REGISTERS[register]}[{bit}]"
    return f"{name} ({where})" if name else where


def missing_features(guest: list[CpuidEntry], host: list[CpuidEntry]) -> list[str]:
    """What the guest's CPUID shows that this host's KVM cannot offer: the vendor, then
    each feature bit (named where hvf knows its name)."""
    def table(entries: list[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
        return {(e[0], e[1]): e for e in entries}

    guest_leaves, host_leaves = table(guest), table(host)
    missing = []
    if (0, 0) in guest_leaves and (0, 0) in host_leaves:
        g, h = guest_leaves[0, 0], host_leaves[0, 0]
        if (g[4], g[6], g[5]) != (h[4], h[6], h[5]):
            def vendor(e: CpuidEntry) -> str:
                raw = b"".join(x.to_bytes(4, "little") for x in (e[4], e[6], e[5]))
                return raw.decode("ascii", "replace")
            missing.append(f"the CPU vendor {vendor(g)!r} (this host: {vendor(h)!r})")
    for function, index, register in FEATURES:
        g_entry = guest_leaves.get((function, index))
        if g_entry is None:
            continue
        h_entry = host_leaves.get((function, index))
        wanted = g_entry[register] & ~DYNAMIC.get((function, index, register), 0)
        offered = h_entry[register] if h_entry is not None else 0
        lacking = wanted & ~offered
        missing += [feature_name(function, index, register, bit)
                    for bit in range(32) if lacking >> bit & 1]
    return missing


def check_ram_file(fd: int, offer: Offer) -> None:
    """The descriptor a local HELLO carried must be a regular file (a memfd or a RAM
    file) exactly as large as guest RAM."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise MigrationError("the descriptor sent for guest RAM is not a regular file")
    if st.st_size != offer.memory_size:
        raise MigrationError(f"the guest RAM file sent is {st.st_size} bytes, not the "
                             f"{offer.memory_size} the source's guest has")
