# SPDX-License-Identifier: BSD-2-Clause
"""``hvf ctl``: control a running VM over its socket; ``hvf snapshot info``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hvf import exitcodes
from hvf.control import ControlClient, is_live, runtime_dir, socket_path
from hvf.errors import CtlError, HvfError, SnapshotError

#: Seconds ``hvf ctl`` waits for each answer of the VM (a save reports progress).
DEFAULT_TIMEOUT = 30


def running_vms() -> list[str]:
    """Names of the VMs answering in the runtime directory (stale sockets skipped)."""
    directory = runtime_dir()
    if not directory.is_dir():
        return []
    return sorted(p.name[: -len(".sock")] for p in directory.glob("*.sock") if is_live(p))


def _pick_vm(name: str | None) -> str:
    if name:
        return name
    vms = running_vms()
    if len(vms) == 1:
        return vms[0]
    if not vms:
        raise CtlError(f"no VM is running (looked in {runtime_dir()})")
    raise CtlError(f"{len(vms)} VMs are running ({', '.join(vms)}): choose one with --vm NAME")


class ProgressBar:
    """A one-line progress bar on a terminal; silent elsewhere."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.active = sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.active or total <= 0:
            return
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{' ' * (width - filled)}] "
                         f"{100 * done // total:3d}% ({done >> 20}/{total >> 20} MiB)")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with status 64, as hvf's own."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message}\n")


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds (0 or more)")
    return value or None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hvf ctl", description="Control a running hvf VM.")
    p.add_argument("--vm", help="the VM's name (optional when exactly one runs)")
    p.add_argument("--json", action="store_true", help="print replies as JSON")
    p.add_argument("--timeout", type=_seconds, default=float(DEFAULT_TIMEOUT), metavar="SECONDS",
                   help=f"how long to wait for each answer of the VM (default "
                        f"{DEFAULT_TIMEOUT}; 0: no limit)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    suspend = sub.add_parser("suspend", help="write a snapshot and pause (or stop with --exit)")
    suspend.add_argument("--exit", action="store_true", help="stop the VM once the snapshot is safe")
    suspend.add_argument("path", nargs="?", help="snapshot directory (default: ./NAME.snapshot)")
    checkpoint = sub.add_parser("checkpoint", help="write a snapshot; the VM keeps running")
    checkpoint.add_argument("path", nargs="?", help="snapshot directory (default: ./NAME.snapshot)")
    for name, text in (("pause", "stop the vCPUs"), ("resume", "run the vCPUs again"),
                       ("status", "show the VM's state"), ("poweroff", "stop the VM (status 1)"),
                       ("list", "list running VMs")):
        sub.add_parser(name, help=text)
    other = sub.add_parser("call", help="run a command a plugin added: call NAME [key=value ...]")
    other.add_argument("name")
    other.add_argument("args", nargs="*", help="key=value arguments (values are JSON or strings)")
    return p


def _human(vm: str, command: str, reply: dict[str, Any]) -> str:
    if command == "status":
        return (f"{vm}: {reply.get('state')}, {reply.get('cpus')} CPUs, "
                f"{int(reply.get('memory', 0)) >> 20} MiB, pid {reply.get('pid')}, "
                f"up {reply.get('uptime')} s")
    if command in ("suspend", "checkpoint"):
        return (f"{vm}: snapshot written to {reply.get('path')} in {reply.get('seconds')} s; "
                f"VM {reply.get('state', 'running')}")
    if command in ("pause", "resume", "poweroff"):
        return f"{vm}: {reply.get('state')}"
    return json.dumps(reply, indent=2)


def _call_args(items: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CtlError(f"argument '{item}' is not key=value")
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


def ctl_main(argv: Sequence[str]) -> int:
    options = _parser().parse_args(list(argv))
    try:
        if options.command == "list":
            vms = running_vms()
            print(json.dumps(vms) if options.json else "\n".join(vms))
            return 0
        vm = _pick_vm(options.vm)
        command, args = options.command, {}
        if command in ("suspend", "checkpoint"):
            path = options.path or f"{vm}.snapshot"
            args["path"] = str(Path(path).absolute())
            if command == "suspend" and options.exit:
                args["exit"] = True
        elif command == "call":
            command, args = options.name, _call_args(options.args)
        bar = ProgressBar(f"{command} {vm}")
        with ControlClient(socket_path(vm), timeout=options.timeout) as client:
            try:
                reply = client.call(command, progress=bar if command in ("suspend", "checkpoint")
                                    else None, **args)
            finally:
                bar.finish()
        print(json.dumps(reply) if options.json else _human(vm, command, reply))
        return 0
    except HvfError as e:
        if options.json:
            print(json.dumps({"error": str(e)}))
        sys.stderr.write(f"hvf ctl: {e}\n")
        return 1


def snapshot_main(argv: Sequence[str]) -> int:
    p = _Parser(prog="hvf snapshot", description="Inspect and check hvf snapshots.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print a snapshot's manifest")
    info.add_argument("path")
    verify = sub.add_parser("verify", help="check every checksum, the RAM file's included "
                            "(reads all its data; a restore does not)")
    verify.add_argument("path")
    options = p.parse_args(list(argv))
    from hvf.pluginmanager import Plugins

    try:
        backend = Plugins().snapshot_backends.get("directory")
        if backend is None:
            raise SnapshotError("no snapshot backend is installed (the 'snapshot' plugin)")
        store = backend.factory(Path(options.path))
        state = store.verify() if options.command == "verify" else store.load()[0]
    except HvfError as e:
        sys.stderr.write(f"hvf snapshot: {e}\n")
        return 1
    if options.command == "verify":
        print(f"{options.path}: intact ({len(state.chunks)} chunks, "
              f"{state.ram.get('data_bytes', 0) >> 20} MiB of RAM data)")
    else:
        print(store.describe(state))
    return 0
