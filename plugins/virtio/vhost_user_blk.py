# SPDX-License-Identifier: BSD-2-Clause
"""``vhost-user-blk``: a virtio disk whose queues a vhost-user back end serves.

``-s N,vhost-user-blk,socket=PATH[,queues=N][,bootindex=N]``. hvf keeps the virtio-pci
transport (feature negotiation, queue setup, MSI-X) and hands the queues to the back end
(qemu-storage-daemon, for example), which then reads guest RAM itself: the guest's
doorbell write goes from KVM's ioeventfd to the back end, and the back end's completion
interrupt from its eventfd to KVM's irqfd, neither through hvf. Image formats, NBD,
throttling and the rest are the back end's.

The back end must see guest RAM, so guest RAM must be a shared mapping of a file it can
map. hvf's RAM is otherwise anonymous memory, and a VM restored from a snapshot runs on
a private copy-on-write mapping of the snapshot's RAM file, neither of which another
process sees. This device is therefore registered with ``shares_ram``: a machine with
one gets its RAM as a shared memfd, and so does its restore, whose configuration names
the device (the RAM file is loaded into a new memfd, see
:class:`hvf.memory.GuestMemory`). At pause the back end stops its queues
(``GET_VRING_BASE``) and finishes what it had taken, so a snapshot's RAM and queue
positions agree; at resume, or after a restore, the queues start again from there.

For a migration or an incremental checkpoint the back end logs the guest pages it
writes (``VHOST_F_LOG_ALL`` into a shared bitmap, :mod:`.vhost_user_log`), which
hvf's dirty log takes in with KVM's; a back end that cannot (no ``LOG_SHMFD``) makes
hvf refuse both rather than miss its writes.

When the back end hangs up, hvf reconnects (each second) and starts the queues again
from the positions the guest's used rings show: requests the back end had not taken
are served by the new one, and the guest sees a delay, not an error. That is exact for
a back end that returns everything it took before it goes, and for requests that
complete in order (one in flight). A back end that goes with requests taken and not
returned, and that does not offer vhost-user's in-flight tracking (``INFLIGHT_SHMFD``;
qemu-storage-daemon 7.2 does not), leaves no record of which of them it completed:
resuming from the used index may then run some of them again or complete one twice
(seen once in CI: qemu-storage-daemon 7.2 on SIGTERM with eight requests in flight
returned a later one and not an earlier one, the later ran again, and the guest read
the stale status of the slot it had reused), and hvf cannot tell. hvf does not yet use
in-flight tracking with back ends that offer it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import attrs

from hvf.bootorder import BootEntry, parse_bootindex, pci_path
from hvf.errors import ConfigError, DeviceError
from hvf.plugins.virtio.blk import TYPE_BLOCK
from hvf.plugins.virtio.pci import ISR_QUEUE, VirtioPciDevice
from hvf.plugins.virtio.spec import DRIVER_OK, F_VERSION_1, NO_VECTOR, TRANSPORT_FEATURES
from hvf.plugins.virtio.vhost_user import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    P_CONFIG,
    P_LOG_SHMFD,
    P_MQ,
    PROTOCOL_FEATURES,
    MemoryRegion,
    VhostUserClient,
)
from hvf.plugins.virtio.vhost_user_log import WriteLog
from hvf.snapshot_api import Fields, check_fields

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.vm import Machine

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
MAX_QUEUES = 16
F_MQ = 1 << 12
#: Device feature bits the virtio-blk specification defines (0-23).
DEVICE_FEATURE_MASK = (1 << 24) - 1
CONFIG_SIZE = 60
NUM_QUEUES = struct.Struct("<H")
NUM_QUEUES_OFFSET = 34
#: How long a pause waits for the back end to finish requests it had taken.
DRAIN_TIMEOUT = 10.0
RECONNECT_INTERVAL = 1.0


@attrs.define
class VhostUserBlkState:
    """Per queue, the available-ring position the back end resumes from."""

    bases: list[int]

    def to_fields(self) -> Fields:
        return {"bases": list(self.bases)}

    @classmethod
    def from_fields(cls, fields: Fields, count: int) -> VhostUserBlkState:
        check_fields(fields, {"bases"})
        bases = fields["bases"]
        if (not isinstance(bases, list) or len(bases) != count
                or any(type(b) is not int or not 0 <= b <= 0xFFFF for b in bases)):
            raise ValueError(f"saved field 'bases' is not a list of {count} ring positions")
        return cls(list(bases))


@attrs.frozen
class Backend:
    """What the back end at ``socket`` offers, read once at connection."""

    features: int
    queues: int
    config: bytes


def negotiate(client: VhostUserClient) -> Backend:
    """Take ownership and read the back end's features, queue count and configuration."""
    client.set_owner()
    features = client.get_features()
    if not features & F_PROTOCOL_FEATURES:
        raise DeviceError(f"vhost-user back end at {client.path} does not speak protocol "
                          "features (it cannot serve its configuration)")
    if not features & F_VERSION_1:
        raise DeviceError(f"vhost-user back end at {client.path} is not a virtio 1.x device")
    protocol = client.get_protocol_features() & PROTOCOL_FEATURES
    if not protocol & P_CONFIG:
        raise DeviceError(f"vhost-user back end at {client.path} cannot serve its configuration")
    client.set_protocol_features(protocol)
    queues = client.get_queue_num() if protocol & P_MQ else 1
    return Backend(features, max(1, queues), client.get_config(CONFIG_SIZE))


class VhostUserBlk(VirtioPciDevice):
    device_type = TYPE_BLOCK
    class_code = 0x010000

    def __init__(self, name: str, socket_path: str, client: VhostUserClient,
                 backend: Backend, queues: int, *, bootindex: int | None = None) -> None:
        self.queue_max_sizes = (QUEUE_SIZE,) * queues
        super().__init__(name)
        self.socket_path = socket_path
        self.bootindex = bootindex
        self.client: VhostUserClient | None = client
        self.backend = backend
        self.device_features = backend.features & DEVICE_FEATURE_MASK
        if queues == 1:
            self.device_features &= ~F_MQ
        self.transport_features = backend.features & TRANSPORT_FEATURES
        self.bases = [0] * queues
        #: Whether the back end can log what it writes (the dirty log then takes it in).
        self.dirty_tracked = bool(client.protocol_features & P_LOG_SHMFD
                                  and backend.features & F_LOG_ALL)
        self._log: WriteLog | None = None
        #: Whether the back end runs the queues now.
        self.running = False
        self.reconnects = 0
        self._closing = threading.Event()
        self._call_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(queues)]

    # ---- attaching ----

    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        for index, fd in enumerate(self._call_fds):
            ctx.loop.add_reader(fd, lambda i=index: self._called(i))
        self._watch_socket()

    def watch_doorbells(self) -> None:
        """The back end waits on the doorbells, not hvf."""

    def device_config(self) -> bytes:
        config = bytearray(self.backend.config)
        NUM_QUEUES.pack_into(config, NUM_QUEUES_OFFSET, len(self.queues))
        return bytes(config)

    # ---- the driver's side (vCPU thread, lock held) ----

    def activate(self) -> None:
        self.bases = [0] * len(self.queues)
        self._start()

    def device_reset(self) -> None:
        self._stop()
        self.bases = [0] * len(self.queues)

    def _called(self, index: int) -> None:
        """The back end signalled queue ``index`` on our eventfd (MSI-X off): INTx."""
        try:
            os.eventfd_read(self._call_fds[index])
        except BlockingIOError:
            return
        with self.lock:
            self._interrupt(self.state.queues_msix[index], ISR_QUEUE)

    # ---- running the back end's queues ----

    def _host_addr(self, gpa: int) -> int:
        memory = self.ctx.memory
        for region in memory.regions:
            if region.guest_base <= gpa < region.guest_end:
                return memory.host_addr + region.file_offset + gpa - region.guest_base
        raise DeviceError(f"{self.name}: ring address {gpa:#x} is not in guest RAM")

    def _call_fd(self, index: int) -> int:
        vector = self.state.queues_msix[index]
        if self.msix.enabled and vector != NO_VECTOR and vector < self.msix.count:
            return self.msix.vectors[vector].fd  # the irqfd itself: no hop through hvf
        return self._call_fds[index]

    def _start(self) -> None:
        """Hand every ready queue to the back end, from :attr:`bases`."""
        client = self.client
        if client is None or not self.state.status & DRIVER_OK:
            return  # disconnected: the reconnection starts them
        memory = self.ctx.memory
        log = self._log
        try:
            client.set_features(self.negotiated | F_PROTOCOL_FEATURES
                                | (F_LOG_ALL if log is not None else 0))
            client.set_mem_table([
                MemoryRegion(r.guest_base, r.size, memory.host_addr + r.file_offset,
                             r.file_offset, memory.fd) for r in memory.regions])
            if log is not None:
                client.set_log_base(log.size, log.fd)
            for index, queue in enumerate(self.queues):
                if queue is None:
                    continue
                state = self.state.queues[index]
                client.set_vring_num(index, state.size)
                client.set_vring_base(index, self.bases[index])
                client.set_vring_addr(index, self._host_addr(state.desc_addr),
                                      self._host_addr(state.used_addr),
                                      self._host_addr(state.avail_addr),
                                      log=state.used_addr if log is not None else None)
                client.set_vring_kick(index, self.doorbells[index].fd)
                client.set_vring_call(index, self._call_fd(index))
                client.set_vring_enable(index, True)
        except OSError as e:
            self._lost(e)
            return
        self.running = True
        for doorbell in self.doorbells:  # notifications the back end may have missed
            doorbell.signal()

    def _stop(self) -> None:
        """Stop the back end's queues; :attr:`bases` says where each resumes."""
        if not self.running or self.client is None:
            return
        self.running = False
        try:
            for index, queue in enumerate(self.queues):
                if queue is not None:
                    self.bases[index] = self.client.get_vring_base(index)
        except OSError as e:
            self._lost(e)

    def _used_positions(self) -> list[int]:
        """Each queue's used-ring index as the guest sees it."""
        positions = []
        for index, queue in enumerate(self.queues):
            state = self.state.queues[index]
            positions.append(0 if queue is None else
                             int.from_bytes(self.ctx.memory.read(state.used_addr + 2, 2),
                                            "little"))
        return positions

    def quiesce(self) -> None:
        """Machine pause: stop the queues and wait until the back end has returned every
        request it took, so that guest RAM no longer changes."""
        with self.lock:
            self._stop()
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while self.client is not None and self._used_positions() != self.bases:
                if time.monotonic() > deadline:
                    raise DeviceError(f"{self.name}: the vhost-user back end did not finish "
                                      f"its requests within {DRAIN_TIMEOUT:.0f} s")
                time.sleep(0.001)

    def unquiesce(self) -> None:
        """Machine resume: the back end carries on from where it stopped."""
        with self.lock:
            if self.state.status & DRIVER_OK and not self.running:
                self._start()

    # ---- the back end's dirty log (a migration's or the checkpoints' thread) ----

    def log_writes(self, on: bool) -> None:
        with self.lock:
            if on:
                if self.running:  # the queues must start again with the log set up
                    raise DeviceError(f"{self.name}: dirty logging must start while the "
                                      f"back end runs no queue (the machine paused)")
                if self._log is None:
                    self._log = WriteLog(self.ctx.memory)
                return
            log, self._log = self._log, None
            if log is None:
                return
            if self.running and self.client is not None:
                try:
                    self.client.set_features(self.negotiated | F_PROTOCOL_FEATURES)
                except OSError as e:
                    self._lost(e)
            log.close()

    def logged_writes(self) -> list[tuple[int, int]]:
        with self.lock:
            log = self._log
            if log is None:
                return []
            client = self.client if self.running else None
            if client is not None:
                try:
                    return log.take(lambda fd: client.set_log_base(log.size, fd))
                except OSError as e:  # gone: it writes nothing more
                    self._lost(e)
            return log.take(None)

    # ---- losing and finding the back end ----

    def _watch_socket(self) -> None:
        assert self.client is not None
        self.ctx.loop.add_reader(self.client.fileno(), self._socket_readable)

    def _socket_readable(self) -> None:
        """Readable between exchanges means the back end hung up or spoke out of turn
        (it has no messages of its own on this socket): either way, reconnect. During
        an exchange (on another thread, lock held) the bytes are its reply: leave them."""
        client = self.client
        if client is None or (hung_up := client.hung_up()) is None:
            return
        if not self.lock.acquire(blocking=False):
            return  # an exchange is under way; it reads the reply, or sees the hang-up
        try:
            if self.client is client and client.hung_up() is not None:
                self._lost(ConnectionResetError("hung up" if hung_up else
                                                "sent a message out of turn"))
        finally:
            self.lock.release()

    def _lost(self, why: BaseException) -> None:
        """The back end is gone (lock held): reconnect in the background."""
        if self.client is None:
            return
        log.warning("%s: vhost-user back end at %s lost (%s); reconnecting",
                    self.name, self.socket_path, why)
        self.ctx.loop.remove_reader(self.client.fileno())
        self.client.close()
        self.client = None
        self.running = False
        threading.Thread(target=self._reconnect, name=f"{self.name} reconnect",
                         daemon=True).start()

    def _reconnect(self) -> None:
        while not self._closing.wait(RECONNECT_INTERVAL):
            try:
                client = VhostUserClient(self.socket_path)
            except OSError:
                continue
            try:
                backend = negotiate(client)
            except (OSError, DeviceError) as e:
                log.warning("%s: vhost-user back end at %s: %s", self.name, self.socket_path, e)
                client.close()
                continue
            if backend.features != self.backend.features or backend.queues < len(self.queues):
                log.error("%s: the vhost-user back end at %s came back as a different device "
                          "(features or queues changed); still waiting",
                          self.name, self.socket_path)
                client.close()
                continue
            self.ctx.loop.call_soon(lambda c=client: self._reconnected(c))
            return

    def _reconnected(self, client: VhostUserClient) -> None:
        with self.lock:
            if self._closing.is_set():
                client.close()
                return
            self.client = client
            self.reconnects += 1
            self._watch_socket()
            log.warning("%s: vhost-user back end at %s reconnected", self.name,
                        self.socket_path)
            if self.state.status & DRIVER_OK:
                self.bases = self._used_positions()  # re-serve what was in flight
                self._start()

    # ---- state ----

    def boot_entries(self) -> list[BootEntry]:
        if self.bootindex is None:
            return []
        return [BootEntry(self.bootindex, pci_path(self.address, "scsi", "disk@0,0"),
                          self.name)]

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "running": int(self.running),
                "reconnects": self.reconnects}

    def save_device(self) -> Fields:
        if self.running:
            raise DeviceError(f"{self.name}: saved while its back end still runs the queues")
        return VhostUserBlkState(self.bases).to_fields()

    def restore_device(self, fields: Fields, version: int) -> None:
        try:
            self.bases = VhostUserBlkState.from_fields(fields, len(self.queues)).bases
        except ValueError as e:
            raise DeviceError(f"{self.name}: {e}") from None
        self._start()

    def close(self) -> None:
        self._closing.set()
        with self.lock:
            if self.client is not None:
                self.ctx.loop.remove_reader(self.client.fileno())
                self.client.close()
                self.client = None
        for fd in self._call_fds:
            self.ctx.loop.remove_reader(fd)
            os.close(fd)
        if self._log is not None:
            self._log.close()
            self._log = None
        super().close()


def parse(conf: list[str]) -> dict[str, str]:
    """``socket=PATH[,queues=N][,bootindex=N]`` as configuration values."""
    values: dict[str, str] = {}
    for option in conf:
        key, sep, value = option.partition("=")
        if key not in ("socket", "queues", "bootindex") or not sep or not value:
            raise ConfigError(f"vhost-user-blk: invalid option '{option}' "
                              "(socket=PATH[,queues=N][,bootindex=N])")
        values[key] = value
    if "socket" not in values:
        raise ConfigError("vhost-user-blk: no back end given (socket=PATH)")
    return values


def create(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> VhostUserBlk:
    where = "vhost-user-blk@pci.{}.{}.{}".format(*slot)
    path = config.get("socket")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: no back end given ('socket')")
    wanted = config.get("queues", "1")
    if not isinstance(wanted, str) or not wanted.isdigit() or not 1 <= int(wanted) <= MAX_QUEUES:
        raise ConfigError(f"{where}: queues= takes 1 to {MAX_QUEUES}")
    bootindex = parse_bootindex(config.get("bootindex"), where)
    if not vm.memory.shareable:
        raise ConfigError(f"{where}: guest RAM is a private mapping the back end cannot see "
                          "(memory.shared=true shares it)")
    try:
        client = VhostUserClient(path)
    except OSError as e:
        raise ConfigError(f"{where}: cannot connect to the vhost-user back end at {path}: "
                          f"{e.strerror or e}") from None
    try:
        backend = negotiate(client)
        queues = min(int(wanted), backend.queues, MAX_QUEUES)
        device = VhostUserBlk(where, path, client, backend, queues, bootindex=bootindex)
    except (OSError, DeviceError) as e:
        client.close()
        raise ConfigError(f"{where}: {e}") from None
    return device
