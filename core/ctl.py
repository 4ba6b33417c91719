# SPDX-License-Identifier: BSD-2-Clause
"""``hvf ctl``: control a running VM over its socket; ``hvf snapshot info``."""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hvf import exitcodes
from hvf.control import ControlClient, is_live, runtime_dir, socket_path
from hvf.errors import CtlError, HvfError, SnapshotError
from hvf.memory import describe_size

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


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of MB/s (0 or more)")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 1 <= value <= 2_000_000):
        raise argparse.ArgumentTypeError(f"'{text}' is not a downtime from 1 to 2000000 ms")
    return value


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
    checkpoint = sub.add_parser("checkpoint", help="write a snapshot; the VM keeps running")
    for saving in (suspend, checkpoint):
        saving.add_argument("--incremental", action="store_true",
                            help="write only the pages dirtied since the VM's last "
                                 "checkpoint, as a layer over it")
        saving.add_argument("path", nargs="?",
                            help="snapshot directory (default: ./NAME.snapshot)")
    migrate = sub.add_parser("migrate", help="move the running VM to 'hvf --incoming URI' "
                             "(this process then exits with 0)")
    migrate.add_argument("uri", nargs="?", help="tcp:HOST:PORT or unix:PATH")
    migrate.add_argument("--downtime-ms", type=_milliseconds, default=300.0, metavar="N",
                         help="the longest the guest may stop (default 300)")
    migrate.add_argument("--bandwidth", type=_megabytes, default=0.0, metavar="MB/s",
                         help="send at most this many megabytes a second (default: no limit)")
    migrate.add_argument("--timeout", dest="migrate_timeout", type=_seconds, metavar="S",
                         help="give up after S seconds, the VM running on here (default: "
                              "no limit)")
    migrate.add_argument("--local", action="store_true",
                         help="hand guest memory over instead of copying it (unix: only)")
    migrate.add_argument("--cancel", action="store_true",
                         help="stop the migration in progress; the VM runs on here")
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
        kind = "incremental snapshot" if reply.get("incremental") else "snapshot"
        ram = describe_size(int(reply.get("ram_bytes_written", 0)))
        return (f"{vm}: {kind} written to {reply.get('path')} in {reply.get('seconds')} s "
                f"({ram} of RAM); VM {reply.get('state', 'running')}")
    if command in ("pause", "resume", "poweroff"):
        return f"{vm}: {reply.get('state')}"
    if command == "migrate" and reply.get("state") == "migrated":
        return (f"{vm}: migrated to {reply.get('uri')} in {reply.get('total_ms')} ms "
                f"(downtime {reply.get('downtime_ms')} ms, "
                f"{int(reply.get('bytes', 0)) / 1e6:.1f} MB in {reply.get('rounds')} rounds)")
    if command == "migrate" and reply.get("state") == "cancelling":
        return f"{vm}: cancelling the migration"
    return json.dumps(reply, indent=2)


def _migrate_args(options: argparse.Namespace) -> dict[str, Any]:
    if options.cancel:
        return {"cancel": True}
    if not options.uri:
        raise CtlError("migrate needs the destination: tcp:HOST:PORT or unix:PATH (where "
                       "'hvf --incoming URI' waits)")
    return {"uri": options.uri, "downtime_ms": options.downtime_ms,
            "bandwidth": options.bandwidth, "timeout": options.migrate_timeout,
            "local": options.local}


class MigrationWatch:
    """Shows a migration's progress on a terminal: RAM sent, the dirty rate and the
    expected downtime, from the VM's figures (``migrate query=true``) twice a second."""

    INTERVAL = 0.5

    def __init__(self, vm: str) -> None:
        self.vm = vm
        self.active = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migrate progress", daemon=True)
        self.shown = False

    def start(self) -> None:
        if self.active:
            self._thread.start()

    def stop(self) -> None:
        if self.active:
            self._stop.set()
            self._thread.join()
            if self.shown:
                sys.stderr.write("\n")

    def _run(self) -> None:
        try:
            with ControlClient(socket_path(self.vm), timeout=5) as client:
                while not self._stop.wait(self.INTERVAL):
                    f = client.call("migrate", query=True)
                    if f.get("state") in (None, "none"):
                        continue
                    sys.stderr.write(
                        f"\rmigrate {self.vm}: {f.get('state')}, round {f.get('round')}, "
                        f"{int(f.get('bytes', 0)) / 1e6:.1f} MB sent at "
                        f"{int(f.get('bandwidth', 0)) / 1e6:.1f} MB/s, dirty "
                        f"{int(f.get('dirty_rate', 0)) / 1e6:.1f} MB/s, expected downtime "
                        f"{f.get('expected_downtime_ms')} ms, throttle {f.get('throttle')} % ")
                    sys.stderr.flush()
                    self.shown = True
        except HvfError:
            pass  # the VM went (it migrated): the reply says how it ended


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
            if options.incremental:
                args["incremental"] = True
        elif command == "call":
            command, args = options.name, _call_args(options.args)
        elif command == "migrate":
            args = _migrate_args(options)
        bar = ProgressBar(f"{command} {vm}")
        watch = MigrationWatch(vm) if command == "migrate" and not args.get("cancel") else None
        # a migration bounds its own waits (--timeout, and the VM's on the peer)
        timeout = None if watch is not None else options.timeout
        with ControlClient(socket_path(vm), timeout=timeout) as client:
            try:
                if watch is not None:
                    watch.start()
                reply = client.call(command, progress=bar if command in ("suspend", "checkpoint")
                                    else None, **args)
            finally:
                bar.finish()
                if watch is not None:
                    watch.stop()
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
