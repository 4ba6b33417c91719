# SPDX-License-Identifier: BSD-2-Clause
"""virtio-rng (bhyve's ``virtio-rnd``): guest buffers filled from the host's CSPRNG.

One request queue; every device-writable buffer the driver posts is filled from the
kernel's random source (``/dev/urandom``, the same pool as ``getrandom``) by one
``readv`` straight into guest RAM, on the I/O thread.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hvf.errors import ConfigError
from hvf.plugins.virtio.pci import VirtioPciDevice
from hvf.plugins.virtio.spec import TYPE_RNG

if TYPE_CHECKING:
    from hvf.plugins.virtio.queue import SplitQueue
    from hvf.vm import Machine

#: Bytes given per request at most (a driver asking for more gets this much).
MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioPciDevice):
    device_type = TYPE_RNG
    class_code = 0xFF0000
    queue_max_sizes = (256,)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.source = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
        #: Random bytes handed to the guest.
        self.delivered = 0

    def queue_notified(self, index: int, queue: SplitQueue) -> None:
        while True:
            queue.disable_notifications()
            while (chain := queue.pop()) is not None:
                views, room = [], MAX_REQUEST
                for view in chain.writable:
                    if room <= 0:
                        break
                    views.append(view[:room])
                    room -= len(views[-1])
                written = os.readv(self.source, views) if views else 0
                queue.push(chain, written)
                self.delivered += written
            self.interrupt_queue(index)
            if not queue.enable_notifications():
                return

    def close(self) -> None:
        super().close()
        os.close(self.source)


def parse(conf: list[str]) -> dict[str, str]:
    if any(conf):
        raise ConfigError(f"virtio-rnd takes no options, not '{','.join(conf)}'")
    return {}


def create(*, vm: Machine, slot: tuple[int, int, int], config: dict[str, Any]) -> VirtioRng:
    return VirtioRng("virtio-rnd@pci.{}.{}.{}".format(*slot))
