# SPDX-License-Identifier: BSD-2-Clause
"""The receiving side: ``hvf --incoming URI [-l comN,BACKEND ...] [NAME]``.

It listens for one source, checks its HELLO, builds the machine from the configuration
it carries as ``hvf -r`` does from a snapshot's (the same host-side overrides allowed:
consoles and the name), takes the pages into guest RAM and the state into KVM and the
devices, and runs the guest once the source says GO. Anything wrong, or the source
going away, discards the machine: hvf exits with 4 and says why.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING

from hvf import __version__ as HVF_VERSION
from hvf import cpumodel
from hvf.config import Config
from hvf.control import ControlServer, is_live, socket_path
from hvf.errors import HvfError, MigrationError
from hvf.extents import PAGE
from hvf.migration import handshake
from hvf.migration.chunks import decode_state
from hvf.migration.pages import MAX_PAYLOAD as MAX_PAGES_PAYLOAD
from hvf.migration.pages import decode_count, decode_table, table_size
from hvf.migration.stream import MAX_PAYLOAD, Channel, Kind, listen, parse_uri
from hvf.snapshot_api import StateReader

if TYPE_CHECKING:
    from hvf.pluginmanager import Plugins
    from hvf.vm import Machine

#: How long the destination waits for the source's next bytes.
IO_TIMEOUT = 60.0
MAX_HELLO = 1 << 20
_UCRED = struct.Struct("3i")


def receive(uri_text: str, given: Config, plugins: Plugins) -> Machine:
    """Wait for a migration on ``uri_text``; returns the machine, ready to run."""
    uri = parse_uri(uri_text)
    listener = listen(uri)
    try:
        _prepare(plugins)
        sys.stderr.write(f"hvf: waiting for a migration on {uri}\n")
        sys.stderr.flush()
        sock, _ = listener.accept()
        channel = Channel(sock, timeout=IO_TIMEOUT, peer="the source")
    except KeyboardInterrupt:
        raise MigrationError("interrupted before a migration came") from None
    finally:
        listener.close()
        if uri.unix:
            try:
                os.unlink(uri.path)
            except OSError:
                pass
    try:
        return Receiver(channel, given, plugins).run()
    except KeyboardInterrupt:
        raise MigrationError("incoming migration interrupted; nothing runs here") from None
    finally:
        channel.close()


def _prepare(plugins: Plugins) -> None:
    """Load what building a machine takes before a source waits on it (a local
    hand-over's clock runs from its first message)."""
    from hvf import snapshot, vm  # noqa: F401

    for _registry in (plugins.pci_devices, plugins.lpc_devices, plugins.console_backends,
                      plugins.snapshot_backends, plugins.ctl_commands):
        pass


class Receiver:
    """One incoming migration on a connected ``channel``."""

    def __init__(self, channel: Channel, given: Config, plugins: Plugins) -> None:
        self.channel = channel
        self.given = given
        self.plugins = plugins
        self.vm: Machine | None = None
        self.ram = "copy"

    def run(self) -> Machine:
        try:
            self._accept_offer()
            self._receive_memory_and_state()
            vm = self.vm
            assert vm is not None
            vm.control = ControlServer(vm)  # the source has given up the name
            self.channel.send(Kind.RUNNING)
            return vm
        except BaseException as e:
            if isinstance(e, HvfError) and not isinstance(e, _SourceGaveUp):
                try:
                    self.channel.send(Kind.REFUSE, json.dumps({"reason": str(e)}).encode())
                except HvfError:
                    pass
            if self.vm is not None:
                self.vm.close()
                self.vm = None
            if isinstance(e, HvfError):
                raise MigrationError(f"incoming migration failed: {e}") from None
            raise

    def _accept_offer(self) -> None:
        frame = self.channel.receive({Kind.HELLO: MAX_HELLO})
        fds = list(frame.fds)
        try:
            offer = handshake.parse_hello(frame.payload)
            self.ram = offer.ram
            if len(fds) != (0 if offer.ram == "copy" else 1):
                raise MigrationError(f"a HELLO for RAM mode '{offer.ram}' came with "
                                     f"{len(fds)} descriptors")
            if fds:
                handshake.check_ram_file(fds[0], offer)
            self.vm = self._build(offer, fds[0] if fds else None)
            fds.clear()  # the machine owns it now
        finally:
            for fd in fds:
                os.close(fd)
        self.channel.send(Kind.READY, json.dumps({"hvf_version": HVF_VERSION,
                                                  "protocol": handshake.PROTOCOL}).encode())

    def _build(self, offer: handshake.Offer, ram_file: int | None) -> Machine:
        from hvf import preflight
        from hvf.cli import build_restoring, restored_config

        config = restored_config(offer.config, self.given, "--incoming")
        if config.get_int("cpus", 1) != offer.cpus:
            raise MigrationError(f"the source's configuration has {config.get('cpus')} CPUs "
                                 f"but its guest {offer.cpus}")
        _check_name(config.get("name") or "vm", offer)
        for warning in preflight.check(config, self.plugins):
            sys.stderr.write(f"hvf: warning: {warning}\n")
        vm = build_restoring(config, self.plugins, ram_file=ram_file,
                             adopt_ram=offer.ram == "shared", control=False)
        try:
            if vm.memory.size != offer.memory_size:
                raise MigrationError(f"the source's configuration gives "
                                     f"{vm.memory.size} bytes of RAM, its guest "
                                     f"{offer.memory_size}")
            vm.cpu = cpumodel.apply(vm, offer.cpu)  # refused here, listing what is missing
        except BaseException:
            vm.close()
            raise
        return vm

    def _receive_memory_and_state(self) -> None:
        vm = self.vm
        assert vm is not None
        limits = {Kind.STATE: MAX_PAYLOAD, Kind.REFUSE: 65536}
        if self.ram != "shared":  # a shared hand-over sends no page
            limits[Kind.PAGES] = MAX_PAGES_PAYLOAD
        while True:
            kind, length, crc, _fds = self.channel.receive_header(limits)
            if kind is Kind.PAGES:
                self._pages(length, crc)
                continue
            frame = self._rest(kind, length, crc)
            if kind is Kind.REFUSE:
                raise _SourceGaveUp(_reason(frame))
            break
        reader = StateReader(decode_state(frame))
        from hvf import snapshot

        snapshot.restore(vm, reader)
        self.channel.send(Kind.LOADED)
        go = self.channel.receive({Kind.GO: 0, Kind.REFUSE: 65536})
        if go.kind is Kind.REFUSE:
            raise _SourceGaveUp(_reason(go.payload))

    def _pages(self, length: int, crc: int) -> None:
        """One PAGES message, straight into guest RAM once its table is checked."""
        vm = self.vm
        assert vm is not None
        channel = self.channel
        if length < 4:
            raise MigrationError(f"a PAGES message of {length} bytes has no run table")
        running = channel.crc_start(Kind.PAGES, length)
        head = bytearray(4)
        running = channel.receive_into(memoryview(head), Kind.PAGES, running)
        count = decode_count(bytes(head), length)
        table = bytearray(table_size(count) - 4)
        running = channel.receive_into(memoryview(table), Kind.PAGES, running)
        runs = decode_table(bytes(table), count, length, vm.memory.size)
        view = vm.memory.view
        for start, pages in runs:
            running = channel.receive_into(view[start * PAGE:(start + pages) * PAGE],
                                            Kind.PAGES, running)
        channel.check_crc(Kind.PAGES, length, b"", crc, running)

    def _rest(self, kind: Kind, length: int, crc: int) -> bytes:
        payload = bytearray()
        running = self.channel.crc_start(kind, length)
        while len(payload) < length:
            piece = bytearray(min(1 << 20, length - len(payload)))
            running = self.channel.receive_into(memoryview(piece), kind, running)
            payload += piece
        self.channel.check_crc(kind, length, b"", crc, running)
        return bytes(payload)


class _SourceGaveUp(MigrationError):
    """The source sent REFUSE: it stopped the migration (it runs on)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the source stopped the migration: {reason}")


def _reason(payload: bytes) -> str:
    try:
        reason = json.loads(payload).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return reason[:2000] if isinstance(reason, str) else "(no reason given)"


def _check_name(name: str, offer: handshake.Offer) -> None:
    """The VM's name must be free here, or be the source's own (a local hand-over: it
    gives the name up before the guest runs here)."""
    path = socket_path(name)
    if not is_live(path):
        return
    if str(path) == offer.source_control and _listener_pid(path) == offer.source_pid:
        return
    raise MigrationError(f"a VM named '{name}' already runs on this host (control socket "
                         f"{path}); give the incoming VM another name")


def _listener_pid(path: os.PathLike[str]) -> int | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            probe.connect(os.fspath(path))
            pid, _uid, _gid = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET,
                                                             socket.SO_PEERCRED, _UCRED.size))
            return pid
    except OSError:
        return None
