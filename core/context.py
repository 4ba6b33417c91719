# SPDX-License-Identifier: BSD-2-Clause
"""What a device depends on instead of the machine: its :class:`DeviceContext`.

A machine (:class:`hvf.vm.Machine`, or :class:`hvf.testing.fakes.FakeVm`) attaches a
device with :func:`attach_device`, which makes the device's context from what the
machine provides (:class:`MachineServices`) and hands it to ``device.attach(ctx)``.
The context is all the device sees: the buses it registers ranges on, the interrupt
controller it takes its lines and MSI vectors from (cloud-hypervisor's interrupt
source groups: a device raises what it was handed, never the machine), guest memory,
the I/O thread, its own configuration subtree, and a few named services.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import attrs

from hvf.config import Config, ConfigView
from hvf.console import open_console
from hvf.dma import GuestDma
from hvf.errors import ConfigError
from hvf.ioevent import IoEvent

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hvf.console import ConsoleBackend, Receiver
    from hvf.device import Device
    from hvf.eventloop import EventLoop
    from hvf.interrupts import InterruptController
    from hvf.ioevent import IoEventBackend
    from hvf.iobus import MmioBus, PortBus
    from hvf.memory import GuestMemory
    from hvf.registry import ConsoleBackendFactory, Registry


class Devices(Protocol):
    """Where devices are looked up by name: a machine or a device's context."""

    @property
    def devices(self) -> Sequence[Device]: ...

    def device(self, name: str) -> Device | None: ...


class CapabilityProbe(Protocol):
    """``KVM_CHECK_EXTENSION`` (:class:`hvf.kvm.Kvm`)."""

    def check_extension(self, cap: int) -> int: ...


class ConsoleBackends(Protocol):
    """The plugins' console backends (:class:`hvf.pluginmanager.Plugins`)."""

    @property
    def console_backends(self) -> Registry[ConsoleBackendFactory]: ...


class MachineServices(Devices, Protocol):
    """What a machine provides its devices' contexts."""

    devices: list[Device]
    pio: PortBus
    mmio: MmioBus
    interrupts: InterruptController
    memory: GuestMemory
    config: Config
    vmfd: IoEventBackend
    kvm: CapabilityProbe
    plugins: ConsoleBackends
    ncpus: int
    restoring: bool

    @property
    def loop(self) -> EventLoop: ...

    def unhandled_log(self, message: str) -> None: ...

    def request_exit(self, status: int, message: str = "") -> None: ...

    def attach(self, device: Device, *, config: str | None = None) -> None: ...

    def add_memory_slot(self, guest_base: int, size: int, host_addr: int,
                        readonly: bool) -> int: ...


@attrs.frozen
class DeviceContext:
    """One attached device's view of its machine (made by :func:`attach_device`)."""

    #: The device's name.
    name: str
    #: The port-I/O bus; a device registers ranges at the ports it is told.
    pio: PortBus
    #: The MMIO bus.
    mmio: MmioBus
    #: Interrupt lines (``line(gsi, level_triggered=).source(name)``) and MSI vectors
    #: (``msi_vector()``).
    interrupts: InterruptController
    #: Guest RAM.
    memory: GuestMemory
    #: The device's own configuration subtree (``pci.B.S.F``, ``lpc.NAME``).
    config: ConfigView
    #: The whole configuration tree, for the few machine-wide settings a device reads.
    machine_config: ConfigView
    #: The rate-limited log of guest errors.
    log: Callable[[str], None]
    _machine: MachineServices = attrs.field(repr=False)

    @property
    def dma(self) -> GuestDma:
        """Bounds-checked views of guest RAM, for back ends (a new :class:`GuestDma`)."""
        return GuestDma(self.memory)

    @property
    def loop(self) -> EventLoop:
        """The I/O thread's event loop, where back ends wait on host descriptors."""
        return self._machine.loop

    def ioevent(self, length: int, *, datamatch: int | None = None,
                pio: bool = False) -> IoEvent:
        """A new unbound doorbell (``KVM_IOEVENTFD``) for writes of ``length`` bytes."""
        return IoEvent(self._machine.vmfd, length, datamatch=datamatch, pio=pio)

    def open_console(self, spec: str, owner: str, receiver: Receiver) -> ConsoleBackend:
        """Open the console backend ``spec`` on the I/O thread; input goes to ``receiver``."""
        return open_console(self._machine.plugins.console_backends, self.loop, spec, owner,
                            receiver, self.request_exit)

    def request_exit(self, status: int, message: str = "") -> None:
        """Stop the VM with bhyve's exit ``status``; any thread, the first request wins."""
        self._machine.request_exit(status, message)

    def attach(self, device: Device, *, config: str | None = None) -> None:
        """Attach a child ``device`` (a bus's), its configuration at ``config``."""
        self._machine.attach(device, config=config)

    def device(self, name: str) -> Device | None:
        """The attached device named ``name`` (a back end, a peer), or None."""
        return self._machine.device(name)

    @property
    def devices(self) -> Sequence[Device]:
        """Every device attached so far, in order."""
        return self._machine.devices

    # ---- firmware only ----

    def add_memory_slot(self, guest_base: int, size: int, host_addr: int,
                        readonly: bool) -> int:
        """Map host memory (a ROM) at ``guest_base``; returns the KVM slot number."""
        return self._machine.add_memory_slot(guest_base, size, host_addr, readonly)

    def has_capability(self, cap: int) -> bool:
        """Whether the host's KVM has capability ``cap`` (``lib.KVM_CAP_*``)."""
        return bool(self._machine.kvm.check_extension(cap))

    @property
    def ncpus(self) -> int:
        """How many vCPUs the machine has."""
        return self._machine.ncpus

    @property
    def restoring(self) -> bool:
        """Whether the machine is built to receive a snapshot's state (RAM included)."""
        return self._machine.restoring


def attach_device(machine: MachineServices, device: Device, config: str | None) -> None:
    """Attach ``device`` to ``machine``: a name used twice is refused, the device gets its
    context (``config``: the key of its configuration subtree, if any) and is listed."""
    if machine.device(device.name) is not None:
        raise ConfigError(f"a device named '{device.name}' is already attached")
    device.attach(DeviceContext(
        device.name, machine.pio, machine.mmio, machine.interrupts, machine.memory,
        ConfigView(machine.config, config),
        ConfigView(machine.config, ""), machine.unhandled_log, machine))
    machine.devices.append(device)
