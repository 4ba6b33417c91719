# SPDX-License-Identifier: BSD-2-Clause
"""The ``hvf`` command line, as bhyve's: options build one configuration tree."""

from __future__ import annotations

import gc
import getopt
import io
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hvf import exitcodes, preflight
from hvf.config import DEFAULTS, Config
from hvf.errors import ConfigError, HvfError, UsageError
from hvf.memory import is_memsize
from hvf.pluginmanager import Plugins

if TYPE_CHECKING:
    from hvf.cpumodel import CpuProfile
    from hvf.vm import Machine

SYNOPSIS = """\
Usage: hvf [-aACDeHhIPSuWwxY] [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]
           [-G [w][bind_address:]port] [-k config_file] [-K layout] [-l lpcdev[,conf]]
           [-m memsize[K|k|M|m|G|g|T|t]] [-o var=value] [-p vcpu:hostcpu]
           [-s slot,emulation[,conf]] [-U uuid]
           [--kernel FILE [--initrd FILE[,FILE...]] [--append CMDLINE]] vmname
       hvf -r SNAPSHOT [-l comN,BACKEND ...] [vmname]
       hvf --incoming tcp:HOST:PORT|unix:PATH [-l comN,BACKEND ...] [vmname]
       hvf ctl [--vm NAME] [--json] suspend [--exit] [PATH] | checkpoint [PATH] |
               migrate [--downtime-ms N] [--bandwidth MB/s] [--timeout S] [--local] URI |
               migrate --cancel | pause | resume | status | poweroff | list
       hvf snapshot info|verify SNAPSHOT
       hvf -l help | -s help
"""
OPTIONS = """\
Options (hvf(8) has more):
  -a             xAPIC mode for the vCPUs, the default (x86.x2apic=false)
  -A             ACPI tables (hvf always builds them; acpi_tables=true)
  -c spec        vCPU count, 1 to 255, and/or topology: sockets=, cores=, threads=
  -C             keep guest memory in core dumps (memory.guest_in_core=true)
  -D             destroy the VM at power-off (a KVM VM always ends with hvf)
  -e             stop on an access to an unemulated I/O port (x86.strictio=true)
  -G [w][addr:]port  GDB remote stub on addr (localhost) and port; w: wait for gdb
  -h             this help
  -H             let a halted vCPU sleep (KVM always does; x86.vmexit_on_hlt=true)
  -I             ignored, as by bhyve (an I/O APIC is always present)
  -k file        configuration file: key=value lines, or TOML if it ends in .toml
  -K layout      VNC keyboard layout: refused (hvf has no framebuffer)
  -l dev[,conf]  LPC device: comN,BACKEND, bootrom,ROM[,VARS], fwcfg, ... (-l help)
  -m size        guest memory: K, M, G, T suffixes; bare numbers below 1 MiB are MiB
  -o var=value   set a configuration variable (bhyve_config(5) names)
  -p vcpu:cpu    run vCPU vcpu on host CPU cpu only (repeat to allow more CPUs)
  -P             let a vCPU spinning on PAUSE yield (KVM's pause-loop exiting does)
  -r snapshot    restore from a snapshot; other options may only redirect consoles
  --incoming uri receive a VM that 'hvf ctl migrate' sends (tcp:HOST:PORT, unix:PATH);
                 other options may only redirect consoles, as with -r
  -s slot,emu    PCI device at [bus:]slot[:function], emulation emu (-s help)
  -S             wire guest memory: lock it into host RAM (needs RLIMIT_MEMLOCK)
  -u             the RTC keeps UTC, not local time (rtc.use_localtime=false)
  -U uuid        the VM's UUID, for SMBIOS and fw_cfg
  -w             ignore unknown MSRs: reads give 0, writes are dropped
  -W             virtio with MSI instead of MSI-X: refused (not implemented)
  -x             x2APIC mode for the vCPUs (x86.x2apic=true)
  -Y             no MP table (hvf never builds one; x86.mptable=false)
  --kernel file  boot a Linux bzImage or multiboot kernel directly
  --initrd file  its initramfs, or its multiboot modules (comma-separated)
  --append text  the kernel's command line
  --help         this help

Exit status: 0 rebooted, 1 powered off, 2 halted, 3 triple fault, 4 an error
(a configuration hvf cannot run), 64 a command line that does not parse.
"""
USAGE = SYNOPSIS + "\n" + OPTIONS

SHORT_OPTS = "aehuwxACDHIPSWYk:o:p:G:c:s:m:l:K:U:r:"
LONG_OPTS = ["kernel=", "initrd=", "append=", "help", "incoming="]

# Flag options and the config variable each sets (bhyve.8).
FLAGS = {
    "-a": ("x86.x2apic", "false"),
    "-x": ("x86.x2apic", "true"),
    "-A": ("acpi_tables", "true"),
    "-C": ("memory.guest_in_core", "true"),
    "-D": ("destroy_on_poweroff", "true"),
    "-e": ("x86.strictio", "true"),
    "-H": ("x86.vmexit_on_hlt", "true"),
    "-P": ("x86.vmexit_on_pause", "true"),
    "-S": ("memory.wired", "true"),
    "-u": ("rtc.use_localtime", "false"),
    "-w": ("x86.strictmsr", "false"),
    "-W": ("virtio_msix", "false"),
    "-Y": ("x86.mptable", "false"),
}
VALUE_OPTS = {
    "-K": "keyboard.layout",
    "-U": "uuid",
    "--kernel": "boot.kernel",
    "--initrd": "boot.initrd",
    "--append": "boot.append",
}

_SLOT_RE = re.compile(r"^(\d+)(?::(\d+))?(?::(\d+))?$")
TOPOLOGY_KEYS = ("cpus", "sockets", "cores", "threads")


class HelpRequested(Exception):
    """``-s help``, ``-l help`` or ``-h``: print and exit 0."""

    def __init__(self, text: str) -> None:
        self.text = text


def parse_slot(arg: str) -> tuple[int, int, int, str, list[str]]:
    """``[bus:]slot[:func],emulation[,conf]`` → (bus, slot, func, emulation, conf)."""
    parts = arg.split(",")
    if len(parts) < 2 or not parts[1]:
        raise ConfigError(f'Invalid PCI slot info field "{arg}"')
    m = _SLOT_RE.match(parts[0])
    if not m:
        raise ConfigError(f'Invalid PCI slot info field "{arg}"')
    a, b, c = (int(x) if x is not None else None for x in m.groups())
    if c is not None:
        bus, slot, func = a, b, c
    elif b is not None:
        bus, slot, func = 0, a, b
    else:
        bus, slot, func = 0, a, 0
    assert slot is not None and func is not None and bus is not None
    if not (0 <= bus <= 255 and 0 <= slot <= 31 and 0 <= func <= 7):
        raise ConfigError(f'Invalid PCI slot info field "{arg}"')
    return bus, slot, func, parts[1], parts[2:]


def generic_options(conf: list[str]) -> dict[str, str]:
    """bhyve's generic option list: ``name=value`` pairs, a bare ``name`` means true."""
    values: dict[str, str] = {}
    for item in conf:
        if not item:
            continue
        key, sep, value = item.partition("=")
        values[key] = value if sep else "true"
    return values


def parse_cpus(arg: str) -> dict[str, str]:
    """``-c``: a bare count or ``cpus=,sockets=,cores=,threads=``."""
    if arg == "":
        return dict.fromkeys(TOPOLOGY_KEYS, "1")
    if arg.isdigit():
        return {"cpus": arg}
    values = {}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in TOPOLOGY_KEYS or not value.isdigit():
            raise UsageError(f"invalid cpu topology '{arg}'")
        values[key] = value
    return values


def _listing(registry_entries: list[tuple[str, str]]) -> str:
    width = max((len(n) for n, _ in registry_entries), default=0)
    return "".join(f"{n:<{width}}  {h}".rstrip() + "\n" for n, h in registry_entries)


def split_options(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    try:
        return getopt.getopt(list(argv), SHORT_OPTS, LONG_OPTS)
    except getopt.GetoptError as e:
        raise UsageError(f"{e.msg}") from None


def parse_args(argv: Sequence[str], plugins: Plugins, *, defaults: bool = True) -> Config:
    """Build the configuration tree from ``argv`` (without the program name).

    ``defaults=False`` gives only what the command line itself sets (for ``-r``).
    """
    opts, args = split_options(argv)
    config = Config(DEFAULTS if defaults else None)
    for opt, value in opts:
        if opt in ("-h", "--help"):
            raise HelpRequested(USAGE)
        if opt in FLAGS:
            config.set(*FLAGS[opt])
        elif opt in VALUE_OPTS:
            config.set(VALUE_OPTS[opt], value)
        elif opt == "-s":
            if value == "help":
                raise HelpRequested(_listing([(e.name, e.help) for e in plugins.pci_devices]))
            _apply_slot(config, value, plugins)
        elif opt == "-l":
            if value == "help":
                raise HelpRequested(_listing([(e.name, e.help) for e in plugins.lpc_devices]))
            _apply_lpc(config, value, plugins)
        elif opt == "-m":
            if not is_memsize(value):
                raise UsageError(f"invalid memsize '{value}'")
            config.set("memory.size", value)  # its range: hvf.preflight
        elif opt == "-c":
            for key, v in parse_cpus(value).items():
                config.set(key, v)
        elif opt == "-o":
            key, sep, v = value.partition("=")
            if not sep or not key or not v:
                raise UsageError(f"invalid configuration option '{value}'")
            try:
                config.set(key, v)
            except ConfigError:
                raise UsageError(f"invalid configuration option '{value}'") from None
        elif opt == "-k":
            config.load_file(value)
        elif opt == "-p":
            _apply_pin(config, value)
        elif opt == "-G":
            address, colon, port = value.removeprefix("w").rpartition(":")
            config.set("gdb.wait", "true" if value.startswith("w") else "false")
            config.set("gdb.port", port)
            if colon:
                config.set("gdb.address", address)
        # -I is accepted and ignored, as bhyve does (an I/O APIC is always present);
        # -r is handled by main().
    if len(args) > 1:
        raise UsageError(f"unexpected arguments after the VM name: {' '.join(args[1:])}")
    if args:
        config.set("name", args[0])
    return config


def _apply_slot(config: Config, arg: str, plugins: Plugins) -> None:
    bus, slot, func, emulation, conf = parse_slot(arg)
    node = f"pci.{bus}.{slot}.{func}"
    if config.get(f"{node}.device"):
        raise ConfigError(f"pci slot {bus}:{slot}:{func} already occupied!")
    registry = plugins.pci_devices
    if registry.unavailable:
        raise ConfigError(f"pci slot {bus}:{slot}:{func}: no PCI devices: {registry.unavailable}")
    entry = registry.get(emulation)
    if entry is None:
        raise ConfigError(f'pci slot {bus}:{slot}:{func}: unknown device "{emulation}"')
    config.set(f"{node}.device", entry.name)
    # every PCI device takes romfile= (hvf.plugins.pci): no device's own parse sees it
    roms = [item.partition("=")[2] for item in conf if item.startswith("romfile=")]
    conf = [item for item in conf if not item.startswith("romfile=")]
    values = entry.parse(conf) if entry.parse else generic_options(conf)
    for key, value in values.items():
        config.set(f"{node}.{key}", value)
    for rom in roms:
        config.set(f"{node}.romfile", rom)


def _apply_lpc(config: Config, arg: str, plugins: Plugins) -> None:
    name, *conf = arg.split(",")
    registry = plugins.lpc_devices
    if registry.unavailable:
        raise UsageError(f"invalid lpc device configuration '{arg}': no LPC devices: "
                         f"{registry.unavailable}")
    entry = registry.get(name)
    if entry is None:
        raise UsageError(f"invalid lpc device configuration '{arg}'")
    try:  # the device refusing its options is a configuration error, as bhyve's bootrom
        values = entry.parse(conf) if entry.parse else {entry.name: "true", **generic_options(conf)}
    except ConfigError as e:
        raise ConfigError(f"invalid lpc device configuration '{arg}': {e}") from None
    for key, value in values.items():
        config.set(f"lpc.{key}", value)


def _apply_pin(config: Config, arg: str) -> None:
    vcpu, sep, host = arg.partition(":")
    if not sep or not vcpu.isdigit() or not host.isdigit():
        raise UsageError(f"invalid vcpu pinning configuration '{arg}'")
    key = f"vcpu.{int(vcpu)}.cpuset"
    current = config.get(key)
    config.set(key, f"{current},{host}" if current else host)


def run_vm(config: Config, plugins: Plugins, restore_from: str | None = None,
           incoming: str | None = None) -> int:
    from hvf.vcpu import install_kick_handler
    from hvf.vm import Machine

    install_kick_handler()
    if incoming is not None:
        from hvf.migration.destination import receive

        vm = receive(incoming, config, plugins)
    elif restore_from is None:
        vm = Machine(config, plugins)
        try:
            vm.build()
        except BaseException:
            vm.close()
            raise
    else:
        vm = _restored_machine(restore_from, config, plugins)
    def terminate(signum: int, _frame: object) -> None:
        if signum == signal.SIGTERM and vm.hook.hvf_power_button(vm=vm):
            return  # bhyve: SIGTERM is an ACPI power-button press once the guest uses ACPI
        vm.request_exit(128 + signum, f"terminated by {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, terminate)
    if not gc.isenabled():  # paused for the start-up by console_main
        gc.freeze()  # what start-up made lives as long as hvf: never scan it again
        gc.enable()
    return vm.run()


def _restored_machine(path: str, given: Config, plugins: Plugins) -> Machine:
    """A machine rebuilt from the snapshot at ``path``, its state loaded, not running."""
    from pathlib import Path

    from hvf import incremental, snapshot
    from hvf.snapshot_api import StateReader

    backend = plugins.snapshot_backends.get("directory")
    if backend is None:
        raise ConfigError("-r: no snapshot backend is installed (the 'snapshot' plugin)")
    store = backend.factory(Path(path))
    state, ram_path = store.load()
    saved = restored_config(state.machine.get("config", {}), given, f"-r {path}")
    ram_file = store.open_ram(ram_path, int(state.machine["memory_size"]))
    vm = build_restoring(saved, plugins, ram_file=ram_file, cpu=snapshot.saved_cpu(state.chunks))
    try:
        store.load_layers(state, vm.memory.view)
        snapshot.restore(vm, StateReader(state.chunks))
        if vm.memory.private:  # its private pages are what changed since: see hvf.incremental
            incremental.track(vm, Path(path), state.ram, log=False)
    except BaseException:
        vm.close()
        raise
    return vm


def restored_config(saved_values: dict[str, str], given: Config, what: str,
                    source: str = "the snapshot") -> Config:
    """The configuration a snapshot (or a migrating VM) was saved with, and the
    host-side settings ``given`` on the command line: only those may differ."""
    from hvf import snapshot

    saved = Config(saved_values)
    differences = snapshot.config_differences(saved, given)
    if differences:
        raise ConfigError(f"{what}: these options contradict {source} (only console and "
                          "network back ends, vhost-user sockets and the name may change): "
                          + "; ".join(differences))
    for key, value in given.items():
        saved.set(key, value)
    return saved


def build_restoring(config: Config, plugins: Plugins, *, ram_file: int | None,
                    adopt_ram: bool = False, control: bool = True,
                    cpu: CpuProfile | None = None) -> Machine:
    """A machine built to receive saved state (its RAM ``ram_file``, its guest's CPU
    ``cpu``: see Machine)."""
    from hvf.vm import Machine

    vm = Machine(config, plugins, ram_file=ram_file, adopt_ram=adopt_ram, cpu=cpu)
    try:
        vm.build(restoring=True, control=control)
    except BaseException:
        vm.close()
        raise
    return vm


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hvf`` console script; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="hvf: %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["ctl"], ["snapshot"]):
        gc.enable()  # a client, not a VM (see console_main)
    if argv[:1] == ["ctl"]:
        from hvf.ctl import ctl_main

        return ctl_main(argv[1:])
    if argv[:1] == ["snapshot"]:
        from hvf.ctl import snapshot_main

        return snapshot_main(argv[1:])
    try:
        plugins = Plugins()
        given = dict(split_options(argv)[0])
        restore_from, incoming = given.get("-r"), given.get("--incoming")
        if restore_from is not None and incoming is not None:
            raise UsageError("-r and --incoming exclude each other")
        config = parse_args(argv, plugins, defaults=restore_from is None and incoming is None)
        if config.get_bool("config.dump"):
            sys.stdout.write(config.dump())
            return 1
        if not config.get("name") and restore_from is None and incoming is None:
            raise UsageError("no VM name given (the last argument)")
        for warning in preflight.check(config, plugins):
            sys.stderr.write(f"hvf: warning: {warning}\n")
        if incoming is not None:
            return run_vm(config, plugins, incoming=incoming)
        return run_vm(config, plugins, restore_from)
    except HelpRequested as h:
        sys.stdout.write(h.text)
        return 0
    except UsageError as e:
        sys.stderr.write(f"hvf: {e}\n{SYNOPSIS}Run 'hvf -h' for what each option does.\n")
        return exitcodes.USAGE
    except HvfError as e:
        sys.stderr.write(f"hvf: {e}\n")
        return e.exit_status


def console_main() -> None:
    """The ``hvf`` console script: :func:`main`, and a reader that goes away (``hvf
    snapshot info DIR | head``) ends hvf quietly by SIGPIPE, as it would a C program.
    Arguments that are not UTF-8 go back out as the bytes they came in as.

    The garbage collector is off until the machine is built (``python -m hvf`` turns
    it off before the first import): start-up makes some 30,000 objects that all
    live as long as hvf, and collecting among them costs up to a fifth of it."""
    gc.disable()
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
        status = 128 + signal.SIGPIPE  # what a shell reports for death by SIGPIPE
    sys.exit(status)
