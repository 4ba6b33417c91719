# SPDX-License-Identifier: BSD-2-Clause
"""The errors hvf raises, in one hierarchy::

    HvfError
    ├── KvmError          a KVM ioctl failed (names the ioctl and the errno)
    ├── CapabilityError   the host's KVM lacks something hvf needs
    ├── UsageError        a bad command line (bhyve's EX_USAGE, exit 64)
    ├── ConfigError       a bad configuration value (exit 4)
    │   └── ImageError    a disk image cannot be used: missing, wrong kind, bad size, in use
    ├── PluginError       a plugin failed to load or registered something twice
    ├── DeviceError       a device refused its configuration or a resource clash
    │   └── ResourceConflict   an I/O port or MMIO range is already owned
    ├── GuestMemoryError  an access outside guest RAM
    ├── VirtqueueError    a guest's virtqueue is malformed (the device needs a reset)
    ├── LoaderError       a kernel or firmware image cannot be loaded
    ├── SnapshotError     a snapshot cannot be written or read
    ├── MigrationError    a migration failed, was refused or was cancelled
    └── CtlError          a control-socket request failed

Every message names the thing at fault (argument, device, port, file) so that a user
can act on it without reading hvf's source.
"""

from __future__ import annotations

import errno as _errno
import os


class HvfError(Exception):
    """Base class of every error hvf raises on purpose."""

    exit_status = 4


class KvmError(HvfError):
    """A KVM ioctl failed."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        text = f"{ioctl} failed: {name} ({os.strerror(errno)})"
        super().__init__(f"{text}: {detail}" if detail else text)


class CapabilityError(HvfError):
    """The host's KVM lacks a capability hvf needs."""


class UsageError(HvfError):
    """A malformed command line; the process exits with EX_USAGE (64)."""

    exit_status = 64


class ConfigError(HvfError):
    """A configuration value hvf cannot use; exit status 4 as in bhyve."""


class ImageError(ConfigError):
    """A disk image cannot be opened or used (names the image and the problem)."""


class PluginError(HvfError):
    """A plugin could not be loaded or registered a name that is already taken."""


class DeviceError(HvfError):
    """A device refused its configuration or could not attach."""


class ResourceConflict(DeviceError):
    """An I/O port or MMIO range overlaps one that another device owns."""


class GuestMemoryError(HvfError):
    """A guest-physical access falls outside guest RAM."""


class VirtqueueError(HvfError):
    """A virtqueue the guest driver set up or filled in breaks the virtio rules."""


class LoaderError(HvfError):
    """A kernel, initramfs or firmware image cannot be loaded."""


class SnapshotError(HvfError):
    """A snapshot cannot be written or read."""


class MigrationError(HvfError):
    """A live migration failed, was refused by the other side, or was cancelled."""


class CtlError(HvfError):
    """A control-socket request failed."""

    exit_status = 1
