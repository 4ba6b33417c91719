# SPDX-License-Identifier: BSD-2-Clause
"""Checks of a parsed configuration before the machine is built.

The command line has parsed (:mod:`hvf.cli`); whatever comes from ``-o`` and ``-k``
as well is checked here, before any KVM resource exists: every value in range, each
message naming the option, the variable and what is allowed (a
:class:`~hvf.errors.ConfigError`, exit 4, see :mod:`hvf.exitcodes`). bhyve options
that hvf does not implement are refused, and those that ask for what KVM does anyway
are accepted and said so in an info line. Unknown variables come back as warnings,
refused with ``config.strict=true``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING

from hvf import cpumodel
from hvf.config import CORE_KEYS, Config, unknown_keys
from hvf.control import runtime_dir, socket_path
from hvf.errors import ConfigError
from hvf.memory import parse_size

if TYPE_CHECKING:
    from hvf.pluginmanager import Plugins

log = logging.getLogger("hvf")

#: vCPUs a VM may have: xAPIC IDs (CPUID leaf 1, the MADT's Local APIC entries) are
#: 8 bits, and 255 is the broadcast ID.
MAX_VCPUS = 255
#: bhyve's limit on each of sockets, cores and threads (UINT16_MAX).
MAX_TOPOLOGY = 65535
#: A UNIX socket's path: sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_CPU_LIST_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")

#: Settings hvf cannot honour, and why.
_REFUSED = {
    ("virtio_msix", False): "-W: virtio devices using MSI instead of MSI-X is not "
    "implemented (virtio_msix=false; hvf's virtio devices offer MSI-X, and INTx to a "
    "driver that leaves MSI-X off)",
    ("acpi_tables", False): "acpi_tables=false: hvf always builds ACPI tables (guests "
    "find their CPUs, interrupt routing, PM timer and power button there)",
    ("x86.mptable", True): "x86.mptable=true: hvf builds no MP table (guests find their "
    "CPUs in ACPI's MADT; -Y asks for what hvf always does)",
}
#: bhyve settings that ask for what hvf on KVM does anyway: accepted, and said so.
_ALWAYS_SO = {
    ("acpi_tables", True): "-A: hvf always builds ACPI tables",
    ("x86.mptable", False): "-Y: hvf builds no MP table in any case",
    ("destroy_on_poweroff", True): "-D: a KVM VM lives only as long as its hvf process, "
    "so it is destroyed at power-off anyway (its control socket and log removed)",
    ("x86.vmexit_on_hlt", True): "-H: on KVM a vCPU that executes HLT always sleeps in the "
    "kernel until an interrupt; it never spins",
    ("x86.vmexit_on_pause", True): "-P: KVM's pause-loop exiting (kvm_intel ple_gap, "
    "kvm_amd pause_filter_count) already makes a spinning vCPU yield",
}


def check(config: Config, plugins: Plugins) -> list[str]:
    """Refuse what cannot run (:class:`ConfigError`); derive ``cpus`` from a topology
    given alone, as bhyve does. Returns warnings for the user (unknown variables)."""
    warnings = _check_keys(config, plugins)
    _check_topology(config)
    size = config.get("memory.size")
    if size is not None:
        try:
            parse_size(size)
        except ConfigError as e:
            raise ConfigError(f"-m: {e}") from None
    _check_pinning(config)
    warnings += cpumodel.check_config(config)  # cpu.model, cpu.features
    _check_uuid(config.get("uuid"))
    _check_name(config.get("name"))
    for (key, value), text in _REFUSED.items():
        if config.get(key) is not None and config.get_bool(key) is value:
            raise ConfigError(text)
    if config.get("keyboard.layout") is not None:
        raise ConfigError("-K: keyboard layouts are for bhyve's VNC framebuffer (fbuf), "
                          "which hvf does not have")
    for (key, value), text in _ALWAYS_SO.items():
        if config.get(key) is not None and config.get_bool(key) is value:
            log.info("%s", text)
    return warnings


def host_cpuset(config: Config, vcpu: int) -> set[int] | None:
    """The host CPUs ``vcpu``'s thread may run on (``-p``, ``vcpu.N.cpuset``: a list
    such as ``1`` or ``0,2-3``), or None when it is not pinned."""
    value = config.get(f"vcpu.{vcpu}.cpuset")
    if value is None:
        return None
    if not _CPU_LIST_RE.match(value):
        raise ConfigError(f"-p: vcpu.{vcpu}.cpuset={value}: not a list of host CPUs "
                          "(such as 1 or 0,2-3)")
    cpus: set[int] = set()
    for item in value.split(","):
        first, _, last = item.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _check_keys(config: Config, plugins: Plugins) -> list[str]:
    patterns = [*CORE_KEYS, *(p for keys in plugins.hook.hvf_config_keys() for p in keys)]
    devices = [f"lpc.{name}" for name in config.node("lpc") if name in plugins.lpc_devices]
    for bus, slots in config.node("pci").items():
        for slot, functions in slots.items() if isinstance(slots, dict) else ():
            for function, node in functions.items() if isinstance(functions, dict) else ():
                if isinstance(node, dict) and "device" in node:
                    devices.append(f"pci.{bus}.{slot}.{function}")
    unknown = [f"unknown configuration variable '{key}'" +
               (f" (did you mean '{close}'?)" if close else "")
               for key, close in unknown_keys(config, patterns, devices)]
    if unknown and config.get_bool("config.strict"):
        raise ConfigError("; ".join(unknown) + " (config.strict=true refuses them)")
    return unknown


def _int_in(config: Config, key: str, low: int, high: int) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    number = config.get_int(key, 0)
    if not low <= number <= high:
        raise ConfigError(f"-c: {key}={value} is out of range ({low} to {high})")
    return number


def _check_topology(config: Config) -> None:
    """bhyverun.c ``calc_topology``: sockets default to the vCPU count, cores and
    threads to 1; an explicit count must match their product, or is their product."""
    cpus = config.get("cpus")
    if cpus is not None and config.get_int("cpus", 0) > MAX_VCPUS:
        raise ConfigError(f"-c: {cpus} vCPUs requested but only {MAX_VCPUS} available "
                          f"(cpus: 1 to {MAX_VCPUS}; xAPIC IDs are 8 bits)")
    ncpus = _int_in(config, "cpus", 1, MAX_VCPUS)
    cores = _int_in(config, "cores", 1, MAX_TOPOLOGY) or 1
    threads = _int_in(config, "threads", 1, MAX_TOPOLOGY) or 1
    sockets = _int_in(config, "sockets", 1, MAX_TOPOLOGY) or ncpus or 1
    product = sockets * cores * threads
    if ncpus is None:
        if product > MAX_VCPUS:
            raise ConfigError(f"-c: the topology ({sockets} sockets, {cores} cores, "
                              f"{threads} threads) makes {product} vCPUs; at most "
                              f"{MAX_VCPUS} are available")
        if product > 1:
            config.set("cpus", str(product))
    elif product != ncpus:
        raise ConfigError(f"-c: topology ({sockets} sockets, {cores} cores, {threads} "
                          f"threads) does not match {ncpus} vCPUs")


def _check_pinning(config: Config) -> None:
    ncpus = config.get_int("cpus", 1)
    allowed = os.sched_getaffinity(0)
    for name in config.node("vcpu"):
        value = config.get(f"vcpu.{name}.cpuset")
        if value is None:
            continue  # not a cpuset: an unknown key, reported as such
        if not name.isdigit() or int(name) >= ncpus:
            raise ConfigError(f"-p: vcpu.{name}.cpuset={value}: vCPU {name} does not exist "
                              f"(the VM has vCPUs 0 to {ncpus - 1})")
        outside = sorted((host_cpuset(config, int(name)) or set()) - allowed)
        if outside:
            raise ConfigError(f"-p: vcpu.{name}.cpuset={value}: host CPU {outside[0]} is not "
                              f"one this process may use ({_cpu_list(allowed)})")


def _cpu_list(cpus: set[int]) -> str:
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _check_uuid(value: str | None) -> None:
    if value is not None and not _UUID_RE.match(value):
        raise ConfigError(f"-U: uuid={value} is not a UUID (expected 8-4-4-4-12 hexadecimal "
                          "digits, such as 6ba7b810-9dad-11d1-80b4-00c04fd430c8)")


def _check_name(name: str | None) -> None:
    """The VM name names its control socket, whose path must fit a UNIX socket's."""
    if name is None:
        return
    path = os.fsencode(socket_path(name))
    if len(path) > MAX_SOCKET_PATH:
        room = MAX_SOCKET_PATH - (len(path) - len(os.fsencode(name)))
        shown = name if len(name) <= 24 else name[:24] + "..."
        raise ConfigError(f"VM name '{shown}' is {len(os.fsencode(name))} bytes long; at "
                          f"most {room} fit in its control socket's path "
                          f"{runtime_dir()}/NAME.sock (a UNIX socket path has at most "
                          f"{MAX_SOCKET_PATH} bytes)")
