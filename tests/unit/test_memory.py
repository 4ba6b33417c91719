# SPDX-License-Identifier: BSD-2-Clause
"""Guest memory sizes, the PC layout and bounds-checked access."""

from __future__ import annotations

import os

import pytest

from hvf.errors import ConfigError, GuestMemoryError
from hvf.memory import HIGHMEM_BASE, LOWMEM_LIMIT, GiB, GuestMemory, MiB, Region, pc_layout, parse_size

from test_cli_rules import vm_flags


@pytest.mark.parametrize(("text", "size"), [
    ("512M", 512 * MiB), ("2G", 2 * GiB), ("2g", 2 * GiB), ("1024", 1024 * MiB),
    ("65536K", 64 * MiB), ("1T", 1024 * GiB), ("256MB", 256 * MiB),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "12Q", "-1G", "1.5G", "G", "512K"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid memsize"):
        parse_size(text)


def test_layout_splits_around_pci_hole() -> None:
    assert pc_layout(512 * MiB) == (Region(0, 512 * MiB, 0),)
    assert pc_layout(4 * GiB) == (
        Region(0, LOWMEM_LIMIT, 0), Region(HIGHMEM_BASE, 4 * GiB - LOWMEM_LIMIT, LOWMEM_LIMIT),
    )


def test_bounds_checked_access() -> None:
    mem = GuestMemory(16 * MiB)
    mem.write(0x1000, b"abc")
    assert mem.read(0x1000, 3) == b"abc"
    mem.write_u32(16 * MiB - 4, 0xDEADBEEF)
    assert mem.read_u32(16 * MiB - 4) == 0xDEADBEEF
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        mem.read(16 * MiB - 2, 4)
    with pytest.raises(GuestMemoryError):
        mem.write(HIGHMEM_BASE, b"x")


@pytest.mark.parametrize("shared", [False, True])
def test_memory_is_one_mapping_seen_by_both_regions(shared: bool) -> None:
    mem = GuestMemory(LOWMEM_LIMIT + 2 * MiB, shared=shared)
    mem.write(HIGHMEM_BASE, b"high")
    assert mem.map[LOWMEM_LIMIT : LOWMEM_LIMIT + 4] == b"high"
    with pytest.raises(GuestMemoryError):
        mem.read(LOWMEM_LIMIT - 2, 4)  # RAM does not continue into the hole
    mem.close()


def test_fresh_ram_is_anonymous_with_huge_pages_asked_for_unless_shared() -> None:
    mem = GuestMemory(64 * MiB)
    assert mem.anonymous and mem.fd == -1 and not mem.shareable
    flags = vm_flags(mem)
    assert "hg" in flags and "sh" not in flags, flags  # MADV_HUGEPAGE; private
    assert list(mem.data_extents()) == []
    mem.write(10 * MiB + 4096, b"x")
    assert all(s <= 10 * MiB + 4096 < e for s, e in mem.data_extents())
    mem.close()
    shared = GuestMemory(64 * MiB, shared=True)
    assert not shared.anonymous and shared.shareable
    assert os.readlink(f"/proc/self/fd/{shared.fd}").startswith("/memfd:hvf-guest-ram")
    assert "sh" in vm_flags(shared)
    shared.close()


def test_close_releases_the_file_once() -> None:
    mem = GuestMemory(16 * MiB, shared=True)
    mem.write(0, b"data")
    fd, inode = mem.fd, os.fstat(mem.fd).st_ino
    mem.close()
    try:  # the memfd is closed, so its pages are freed (the number may be reused)
        assert os.fstat(fd).st_ino != inode
    except OSError:
        pass
    assert mem.map.closed
    mem.close()  # again: nothing
