# SPDX-License-Identifier: BSD-2-Clause
"""Interrupt lines shared by several devices (wired-OR), e.g. COM1 and COM3 on IRQ 4."""

from __future__ import annotations

import threading
from collections.abc import Callable


class SharedLine:
    """One interrupt input driven by several sources: high while any source is high."""

    def __init__(self, gsi: int, drive: Callable[[int, bool], None]) -> None:
        self.gsi = gsi
        self._drive = drive
        self._high: set[str] = set()
        self._lock = threading.Lock()

    def set(self, source: str, level: bool) -> None:
        with self._lock:
            was_high = bool(self._high)
            if level:
                self._high.add(source)
            else:
                self._high.discard(source)
            if bool(self._high) != was_high:
                self._drive(self.gsi, not was_high)

    @property
    def level(self) -> bool:
        return bool(self._high)
