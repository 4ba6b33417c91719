# SPDX-License-Identifier: BSD-2-Clause
"""A debug console on port 0x402 (QEMU's isa-debugcon): bytes written go to a file.

Firmware (SeaBIOS) and the test kernels print their logs here. ``-l debugcon,PATH``
(or ``file=PATH``) appends to PATH; ``-l debugcon`` or ``-l debugcon,stdio`` writes to standard output.
Reads return 0xE9, as QEMU's device does, so a guest can detect it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hvf.device import Device
from hvf.errors import ConfigError

if TYPE_CHECKING:
    from hvf.context import DeviceContext
    from hvf.vm import Machine

DEBUGCON_PORT = 0x402
DETECT_VALUE = 0xE9


class DebugConsole(Device):
    def __init__(self, path: str) -> None:
        super().__init__("debugcon")
        self.path = path
        if path == "stdio":
            self.fd = os.dup(1)
        else:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ConfigError(f"debugcon: cannot open '{path}': {e.strerror}") from None

    def attach(self, ctx: DeviceContext) -> None:
        ctx.pio.register(DEBUGCON_PORT, 1, "debugcon", self._read, self._write)

    def _read(self, offset: int, size: int) -> int:
        return DETECT_VALUE

    def _write(self, offset: int, size: int, value: int) -> None:
        try:
            os.write(self.fd, (value & 0xFF).to_bytes(1, "little"))
        except OSError:
            pass  # a closed reader must not stop the guest

    def close(self) -> None:
        os.close(self.fd)


def parse(conf: list[str]) -> dict[str, str]:
    if len(conf) > 1:
        raise ConfigError("debugcon takes one argument, the output path")
    path = conf[0] if conf and conf[0] else "stdio"
    return {"debugcon.path": path.removeprefix("file=")}


def create(*, vm: Machine, config: Any) -> DebugConsole | None:
    path = config.get("lpc.debugcon.path")
    return DebugConsole(path) if path else None
