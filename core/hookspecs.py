# SPDX-License-Identifier: BSD-2-Clause
"""Every hook hvf calls, documented where it is declared.

Hooks are for registration, machine building, lifecycle, save and restore: things that
happen a few times per VM. Per-access I/O never goes through a hook: a device registers
``read``/``write`` handlers on the VM's port or MMIO bus when it attaches, and the vCPU
loop calls those directly.

All hooks are called with keyword arguments. A plugin implements a hook with a function
of the same name decorated with ``@hvf.hookimpl``; it may accept any subset of the
arguments. Plugins are found through the ``hvf`` entry-point group (the built-in ones
are registered the same way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from hvf.device import Device
    from hvf.registry import (
        ConsoleBackendFactory,
        CtlCommands,
        LpcDeviceFactory,
        PciDeviceFactory,
        Registry,
        SnapshotStoreFactory,
    )
    from hvf.snapshot_api import StateReader, StateWriter
    from hvf.vm import Machine

hookspec = pluggy.HookspecMarker("hvf")


# ---- registration: called once per process, when the plugin manager is built ----


@hookspec
def hvf_register_pci_devices(registry: Registry[PciDeviceFactory]) -> None:
    """Register PCI emulations, the names accepted by ``-s slot,NAME``. Not called when
    the ``pci`` plugin is disabled.

    :param registry: call ``registry.add(name, factory, help=..., parse=...)``;
        ``factory(vm=, slot=, config=)`` returns a :class:`hvf.plugins.pci.PciDevice`.
    """


@hookspec
def hvf_register_lpc_devices(registry: Registry[LpcDeviceFactory]) -> None:
    """Register LPC (ISA) devices, the names accepted by ``-l NAME[,conf]``. Not called
    when the ``pci`` or ``lpc`` plugin is disabled.

    :param registry: call ``registry.add(name, factory, help=..., parse=...)``;
        ``parse(conf: list[str]) -> dict[str, str]`` turns the ``-l`` options into config
        values under ``lpc.NAME``, and ``factory(vm=, config=)`` builds the device (or
        returns None when the configuration does not ask for it) once the machine has an
        LPC bridge.
    """


@hookspec
def hvf_register_console_backends(registry: Registry[ConsoleBackendFactory]) -> None:
    """Register console backends (``stdio``, ``pty``, ``tcp=...``) for serial ports and
    virtio-console ports.

    :param registry: call ``registry.add(name, factory, help=...)``; ``factory(spec,
        owner)`` returns a :class:`hvf.console.ConsoleBackend`.
    """


@hookspec
def hvf_register_snapshot_backends(registry: Registry[SnapshotStoreFactory]) -> None:
    """Register snapshot stores (where guest RAM and device state are written);
    ``directory`` is the one hvf uses.

    :param registry: call ``registry.add(name, factory, help=...)``; ``factory(path)``
        opens the snapshot at ``path``.
    """


@hookspec
def hvf_register_ctl_commands(commands: CtlCommands) -> None:
    """Add ``hvf ctl`` commands and their control-socket handlers.

    :param commands: call ``commands.add(name, handler, help=...)``; ``handler(vm=,
        args=)`` runs in the VM process and returns a JSON-serialisable reply.
    """


@hookspec
def hvf_config_keys() -> list[str]:
    """The configuration variables this plugin reads outside device subtrees, so that
    hvf does not call them unknown (it warns of unknown variables, and with
    ``config.strict=true`` refuses them).

    Return patterns of dotted names: ``*`` stands for one name, a trailing ``**`` for a
    whole subtree (``["myplugin.level", "myplugin.rules.**"]``). The core's own and
    bhyve_config(5)'s variables are :data:`hvf.config.CORE_KEYS`. A device's options need
    no declaring: everything under a configured ``pci.B.S.F`` node (one with
    ``device``) and under ``lpc.NAME`` for a registered LPC device ``NAME`` is that
    device's to check.
    """


# ---- building the machine ----


@hookspec
def hvf_machine_build(vm: Machine) -> None:
    """Create this plugin's buses and devices from ``vm.config``.

    Called once, after guest memory, the in-kernel interrupt controllers and the vCPUs
    exist and before anything runs. A device attaches with ``vm.attach(device,
    config=KEY)`` (KEY: its configuration subtree), which hands it its
    :class:`~hvf.context.DeviceContext`.

    :param vm: the machine being built.
    """


@hookspec
def hvf_device_attached(vm: Machine, device: Device) -> None:
    """A device has attached to ``vm`` (its I/O ranges are registered).

    :param vm: the machine.
    :param device: the device that attached.
    """


@hookspec
def hvf_machine_ready(vm: Machine) -> None:
    """Every device has attached: last chance to finish wiring (e.g. IRQ routing).

    :param vm: the machine.
    """


@hookspec
def hvf_firmware_setup(vm: Machine) -> None:
    """After every ``hvf_machine_ready`` (PCI resources are assigned): hand the firmware
    what it reads at boot, e.g. ACPI tables through fw_cfg's table loader. Called on
    restore too, so that what the firmware selected is there again.

    :param vm: the machine.
    """


@hookspec
def hvf_acpi_tables(vm: Machine, acpi: Any) -> None:
    """Describe the hardware this plugin owns in the guest's ACPI tables.

    Called once the machine is ready, when hvf builds ACPI tables (direct kernel boot,
    or fw_cfg's table loader for firmware). Add AML to the DSDT, MADT entries, FADT
    fields or whole tables through ``acpi`` (an :class:`hvf.acpi.AcpiBuilder`).

    :param vm: the machine.
    :param acpi: the table builder.
    """


# ---- lifecycle ----


@hookspec
def hvf_vm_start(vm: Machine) -> None:
    """The vCPUs are about to run for the first time (or after a restore).

    :param vm: the machine.
    """


@hookspec
def hvf_vm_pause(vm: Machine) -> None:
    """Every vCPU has stopped outside ``KVM_RUN``; quiesce device activity.

    :param vm: the machine.
    """


@hookspec
def hvf_vm_resume(vm: Machine) -> None:
    """The vCPUs are about to run again after a pause.

    :param vm: the machine.
    """


@hookspec
def hvf_vm_stop(vm: Machine, status: int) -> None:
    """The VM has stopped for good; release host resources (terminals, sockets).

    :param vm: the machine.
    :param status: the exit status hvf will return (bhyve's: 0 reboot, 1 poweroff,
        2 halt, 3 triple fault, 4 error).
    """


# ---- save and restore ----


@hookspec
def hvf_state_save(vm: Machine, state: StateWriter) -> None:
    """Save state this plugin keeps outside its devices, while the VM is paused.

    Devices need no hook: the core saves every attached device, whichever plugin made
    it, as one chunk named ``device.NAME``, owned by the module of the device's class,
    tagged with its ``state_version`` and holding its ``save_state()`` (see
    :class:`hvf.device.Device`). A plugin implements this hook only for other state,
    adding a chunk with ``state.add(name=, owner=, version=, fields=)`` under a name
    of its own (never ``device.*``); ``fields`` maps field names to plain values (ints,
    bools, bytes, str, lists, dicts).

    :param vm: the paused machine.
    :param state: where chunks are collected.
    """


@hookspec
def hvf_state_restore(vm: Machine, state: StateReader) -> None:
    """Restore the state this plugin saved in :func:`hvf_state_save`.

    The core restores every attached device from its ``device.NAME`` chunk: the fields
    written with the chunk's version are upgraded through the device's
    ``state_upgrades`` to its ``state_version`` and handed to its ``restore_state()``;
    a chunk newer than the device knows is refused, and a device the snapshot has no
    chunk for starts from reset. A plugin takes each of its own chunks with
    ``state.take(name)``, which marks it consumed, and brings older versions up with
    :func:`hvf.snapshot_api.upgrade`; a chunk that nobody takes makes the restore
    fail, naming it.

    :param vm: the machine, rebuilt from the snapshot's configuration, not yet running.
    :param state: the snapshot's chunks.
    """


@hookspec(firstresult=True)
def hvf_power_button(vm: Machine) -> bool | None:
    """Press the guest's power button (hvf got ``SIGTERM``).

    Stops at the first non-None result: True when the guest was told (it is expected to
    shut down by itself); when no plugin delivers the event, hvf stops the VM.

    :param vm: the machine.
    """


@hookspec(firstresult=True)
def hvf_unhandled_exit(vm: Machine, vcpu: Any, reason: int) -> int | None:
    """A vCPU exit reason the core does not handle.

    Stops at the first non-None result: an exit status that stops the VM, or ``-1``
    when the plugin handled the exit and the vCPU may run on.

    :param vm: the machine.
    :param vcpu: the :class:`hvf.vcpu.Vcpu` that exited.
    :param reason: the ``KVM_EXIT_*`` value.
    """
