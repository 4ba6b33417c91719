# SPDX-License-Identifier: BSD-2-Clause
"""hvf.iowait takes descriptors above 1023 (select(2) refuses them: a whole test run, or a
VM with many devices, gets there), and the MSI pending bit rests on it."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import pytest
from hvf.iowait import readable, writable


@pytest.fixture
def high_fd() -> Iterator[int]:
    """An eventfd numbered above 1023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}: no descriptor above 1023")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    high = os.dup2(fd, 1050)
    os.close(fd)
    try:
        yield high
    finally:
        os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_descriptor_above_1023_waits_and_reports(high_fd: int) -> None:
    assert readable([high_fd], 0) == []
    assert writable(high_fd, 0)
    os.eventfd_write(high_fd, 1)
    assert readable([high_fd], 0) == [high_fd]


def test_readable_keeps_the_callers_objects_in_order() -> None:
    a, b = os.pipe()
    try:
        os.write(b, b"x")
        assert readable([b, a], 0) == [a]
        assert readable([a, b], None) == [a]
    finally:
        os.close(a)
        os.close(b)
