# SPDX-License-Identifier: BSD-2-Clause
"""The HELLO a source sends and the destination's checks of it.

HELLO is one JSON object::

    {"hvf_version": "0.1.0", "protocol": 2, "state_format": 1, "page_size": 4096,
     "ram": "copy" | "shared" | "private",
     "machine": {"memory_size": BYTES, "cpus": N, "config": {"key": "value", ...}},
     "cpu": {"model", "features", "cpuid": [[function, index, flags, eax, ebx, ecx,
             edx], ...], "msrs": [...], "tsc_khz": KHZ},
     "source": {"vm": NAME, "pid": PID, "control": SOCKET PATH}}

``cpu`` is the CPU the guest was given (:class:`hvf.cpumodel.CpuProfile`: vCPU 0's
CPUID, the MSRs KVM saves, the TSC frequency); the destination gives the guest exactly
that, once it has found that its host can (:func:`hvf.cpumodel.apply`, which lists
what is missing otherwise).

``source`` names the sending VM and process (its control socket: a local hand-over
keeps the VM's name). ``ram``: ``copy`` sends every page; with ``shared`` (``--local``) the frame carries
the guest's memfd, which the destination maps shared and no page is sent; with
``private`` (``--local`` from a VM restored from a snapshot, whose RAM is that
snapshot's file mapped copy-on-write) it carries the RAM file, which the destination
maps copy-on-write too, and only the pages the source holds privately are sent.

The peer is untrusted: every field is checked for type and range, and nothing is
allocated from a size the peer gives beyond the guest RAM it asks for.
"""

from __future__ import annotations

import json
import os
import stat
from typing import TYPE_CHECKING, Any

import attrs

from hvf import __version__ as HVF_VERSION
from hvf.cpumodel import CpuProfile
from hvf.errors import MigrationError
from hvf.extents import PAGE
from hvf.preflight import MAX_VCPUS

if TYPE_CHECKING:
    from hvf.vm import Machine

#: 2: frames after the handshake carry CRC-32C instead of CRC-32 (:mod:`.stream`).
PROTOCOL = 2
#: Versions of the chunk encoding (:mod:`hvf.plugins.snapshot.statefile`) understood.
STATE_FORMATS = (1,)
RAM_MODES = ("copy", "shared", "private")
MAX_CONFIG_KEYS = 4096
MAX_STRING = 4096

@attrs.frozen
class Offer:
    """A checked HELLO (what the destination needs of it)."""

    ram: str
    memory_size: int
    cpus: int
    config: dict[str, str]
    cpu: CpuProfile
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
        "cpu": vm.cpu.to_fields(),
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
    """Check a HELLO's fields (whether this host can give the guest its CPU is
    :func:`hvf.cpumodel.apply`'s to say)."""
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
    try:
        cpu = CpuProfile.from_fields(_need(doc, "cpu", dict))
    except ValueError as e:
        raise MigrationError(f"HELLO's cpu: {e}") from None
    return Offer(ram=ram, memory_size=size, cpus=cpus, config=config, cpu=cpu,
                 source_pid=_need(source, "pid", int, "HELLO's source"),
                 source_control=_string(source.get("control"), "HELLO's source control"))


def check_ram_file(fd: int, offer: Offer) -> None:
    """The descriptor a local HELLO carried must be a regular file (a memfd or a RAM
    file) exactly as large as guest RAM."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise MigrationError("the descriptor sent for guest RAM is not a regular file")
    if st.st_size != offer.memory_size:
        raise MigrationError(f"the guest RAM file sent is {st.st_size} bytes, not the "
                             f"{offer.memory_size} the source's guest has")
