# SPDX-License-Identifier: BSD-2-Clause
"""NVMe controller state: pause drains and flushes, a save restores into a new
controller that carries on where the guest left off, and saved state that no
controller could have written is refused with ValueError or DeviceError."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeVm
from hvf.errors import DeviceError, ImageError
from hvf.memory import GuestMemory, MiB
from hvf.plugins import nvme as nvme_plugin
from hvf.plugins.nvme import factory, spec
from hvf.plugins.nvme.controller import NvmeController
from hvf.plugins.nvme.testing import NvmeDriver
from hvf.plugins.pci.bus import PciBus

BDF = (0, 5, 0)
SIZE = 2 * MiB


def build(memory: GuestMemory, path: Path, **config: str) -> tuple[FakeVm, NvmeController]:
    vm = FakeVm(memory=memory)
    bus = PciBus()
    vm.attach(bus)
    dev = factory.create(vm=vm, slot=BDF, config={"path": str(path), "maxq": "4", **config})
    bus.add(BDF, dev)
    bus.assign_resources(enable_decoding=True)
    vm.loop.start()
    return vm, dev


def stop(vm: FakeVm, dev: NvmeController) -> None:
    vm.loop.stop()
    dev.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return path


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    m = GuestMemory(32 * MiB)
    yield m
    m.close()


def test_quiesce_drains_and_flushes(memory: GuestMemory, image: Path) -> None:
    vm, dev = build(memory, image)
    try:
        d = NvmeDriver(vm, memory, BDF)
        d.enable()
        d.create_queue_pair(1, 32)
        buf = d.alloc(256 * 1024)
        for i in range(8):
            d.submit(1, spec.IO_WRITE, prp1=buf, prp2=d.prps(buf, 128 * 1024)[1],
                     cdw=(i * 256, 0, 255), ring=False)
        d.ring(1)
        d.wait(1, 1)
        nvme_plugin.hvf_vm_pause(vm=vm)  # the plugin's pause hook: every NVMe device
        stats = dev.stats()
        assert stats["block_in_flight"] == 0 and stats["block_flushes"] >= 1
        assert len(d.wait(1, 7)) == 7
    finally:
        stop(vm, dev)


def test_save_and_restore_carry_on(memory: GuestMemory, image: Path) -> None:
    vm, dev = build(memory, image, ioslots="1")
    d = NvmeDriver(vm, memory, BDF)
    try:
        d.enable()
        d.create_queue_pair(1, 16, cq_size=2)  # one completion fits
        d.create_queue_pair(2, 16)
        assert d.admin(spec.ADMIN_SET_FEATURES, cdw=(spec.FEAT_ASYNC_EVENT_CONFIG, 0xFF)).status == 0
        assert d.use_doorbell_buffers() == 0
        aer = d.submit(0, spec.ADMIN_ASYNC_EVENT)
        buf = d.alloc(4096)
        for lba in range(3):  # one posted, one waiting for room, one not yet taken
            d.submit(1, spec.IO_READ, prp1=buf, cdw=(lba, 0, 0))
        deadline = time.monotonic() + 5
        while not dev.cqs[1].pending:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        saved = dev.save_state()
    finally:
        stop(vm, dev)
    assert saved["controller"]["aer_requests"] == [aer]
    assert len(saved["controller"]["cqs"][1]["pending"]) == 1
    assert saved["controller"]["sqs"][1]["head"] == 2
    vm, dev = build(memory, image, ioslots="1")
    try:
        dev.restore_state(copy.deepcopy(saved), dev.state_version)
        d.vm = vm
        assert dev.save_state()["controller"] == saved["controller"]
        bound = {addr for addr, _ in vm.vmfd.ioeventfds.values()}
        assert d.bar + spec.DOORBELLS + 8 in bound  # doorbell buffers still in use
        entries = d.wait(1, 3)
        assert [e.sq_head for e in entries] == [1, 2, 3] and {e.status for e in entries} == {0}
        assert d.command(2, spec.IO_READ, prp1=buf, cdw=(7, 0, 0)).status == 0
        assert memory.read(buf, 512) == bytes(range(256)) * 2
        d.write(spec.DOORBELLS + 8 * 3, 1)  # no queue 3: an error event
        (event,) = d.wait(0)
        assert event.cid == aer and event.dw0 & 7 == spec.EVENT_ERROR
    finally:
        stop(vm, dev)


def _paths(fields: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(fields, dict):
        for key, value in fields.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(fields, list):
        for i, value in enumerate(fields):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


@pytest.fixture(scope="module")
def saved_and_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, NvmeController]]:
    path = tmp_path_factory.mktemp("nvme-state") / "disk.img"
    path.write_bytes(bytes(SIZE))
    memory = GuestMemory(32 * MiB)
    vm, dev = build(memory, path)
    d = NvmeDriver(vm, memory, BDF)
    d.enable()
    d.create_queue_pair(1, 16)
    d.use_doorbell_buffers()
    d.submit(0, spec.ADMIN_ASYNC_EVENT)
    deadline = time.monotonic() + 5
    while not dev.events.requests:  # held: nothing is left for a restore to take
        assert time.monotonic() < deadline
        time.sleep(0.001)
    saved = dev.save_state()
    yield saved, dev
    stop(vm, dev)
    memory.close()


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**65), st.text(max_size=3),
                  st.binary(max_size=3), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_state_is_refused(saved_and_device: tuple[dict, NvmeController],
                                    data: st.DataObject) -> None:
    saved, dev = saved_and_device
    controller = saved["controller"]
    paths = [("controller",) + p for p in _paths(controller)]
    path = data.draw(st.sampled_from(paths))
    junk = data.draw(_JUNK)
    broken = copy.deepcopy(saved)
    node = broken
    for key in path[:-1]:
        node = node[key]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = junk
    try:
        dev.restore_state(broken, dev.state_version)
    except (ValueError, DeviceError):
        pass
    finally:
        dev.restore_state(copy.deepcopy(saved), dev.state_version)
    assert dev.save_state()["controller"] == controller


def test_restore_refuses_a_changed_image(memory: GuestMemory, image: Path,
                                         tmp_path: Path) -> None:
    vm, dev = build(memory, image)
    try:
        NvmeDriver(vm, memory, BDF).enable()
        saved = dev.save_state()
    finally:
        stop(vm, dev)
    assert saved["image"]["path"] == str(image) and saved["image"]["size"] == SIZE
    with image.open("r+b") as f:
        f.write(b"changed")
    vm, dev = build(memory, image)
    try:
        with pytest.raises(ImageError, match="changed since the snapshot.*pci.0.5.0.path=COPY"):
            dev.restore_state(copy.deepcopy(saved), dev.state_version)
        assert dev.csts == 0  # nothing was restored
    finally:
        stop(vm, dev)
    copied = tmp_path / "copy.img"  # another path of the same size is taken
    copied.write_bytes(image.read_bytes())
    vm, dev = build(memory, copied)
    try:
        dev.restore_state(copy.deepcopy(saved), dev.state_version)
        assert dev.csts == spec.CSTS_RDY
    finally:
        stop(vm, dev)
