# SPDX-License-Identifier: BSD-2-Clause
"""The dirty log a vhost-user back end keeps of the guest RAM it writes.

With ``VHOST_F_LOG_ALL`` and the ``LOG_SHMFD`` protocol feature the back end sets bit
``gpa / 4096`` of a bitmap that the front end shares with it (``SET_LOG_BASE``, a
memfd) for every page it writes, the used rings included. The back end sets bits with
atomic ORs at any moment, so the front end never clears a bitmap the back end still
writes: it keeps two, and to read one it hands the back end the other (a
``SET_LOG_BASE`` answered only once the back end has switched), then reads and clears
the first at leisure. While the back end runs no queue (the machine paused) the
current bitmap is read in place.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

from hvf.extents import PAGE
from hvf.memory import GuestMemory
from hvf.migration.pages import Run, bitmap_runs, union


def _ceil(n: int, unit: int) -> int:
    return -(-n // unit)


class _Bitmap:
    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("hvf-vhost-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise

    def take(self, memory: GuestMemory) -> list[Run]:
        """The pages set, as RAM-file runs; the bitmap is cleared."""
        words = memoryview(self.map).cast("Q")
        try:
            runs = []
            for region in memory.regions:  # guest pages at 4 GiB and up are 64-aligned
                base, pages = region.file_offset // PAGE, region.size // PAGE
                first = region.guest_base // PAGE // 64
                found = bitmap_runs(words[first:first + _ceil(pages, 64)], base)
                # bits past the region (set by a back end that misbehaves) are not RAM
                runs.append([(start, min(start + count, base + pages) - start)
                             for start, count in found if start < base + pages])
        finally:
            words.release()
        self.map[:] = bytes(len(self.map))
        return union(*runs)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class WriteLog:
    """The two bitmaps for the back end's log of ``memory`` (one bit per guest page,
    up to the top of guest RAM's guest-physical addresses)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        top = max(region.guest_end for region in memory.regions)
        #: Bytes of each bitmap: whole 64-bit words, whole host pages.
        self.size = _ceil(_ceil(top // PAGE, 8), mmap.PAGESIZE) * mmap.PAGESIZE
        self._current = _Bitmap(self.size)
        try:
            self._spare = _Bitmap(self.size)
        except OSError:
            self._current.close()
            raise

    @property
    def fd(self) -> int:
        """The bitmap the back end logs into."""
        return self._current.fd

    def take(self, switch: Callable[[int], None] | None) -> list[Run]:
        """The pages logged since the last take. ``switch(fd)`` hands the back end the
        other bitmap first (while it runs queues); without it, none is writing."""
        if switch is not None:
            switch(self._spare.fd)
            self._current, self._spare = self._spare, self._current
            return self._spare.take(self.memory)
        return self._current.take(self.memory)

    def close(self) -> None:
        self._current.close()
        self._spare.close()
