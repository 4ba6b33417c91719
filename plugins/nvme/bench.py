# SPDX-License-Identifier: BSD-2-Clause
"""Throughput of the NVMe controller model, driven from the host side (no guest, no
KVM): the controller on a fake machine with real guest RAM, its I/O thread and block
back end as in a VM, and :class:`~hvf.plugins.nvme.testing.NvmeDriver` as the guest's
driver, waiting for completions on the queue's MSI-X eventfd::

    python -m hvf.plugins.nvme.bench [--image PATH] [--size MiB] [--seconds S]
                                     [--nocache] [--ioslots N] [--doorbell-buffers]

Rows: 4 KiB random reads at queue depth 32 (IOPS), 1 MiB sequential reads and writes
at queue depth 8 (MB/s). The image is made (sparse, then filled) unless ``--image``
names one; its page cache is whatever the host has, so use ``--nocache`` for O_DIRECT.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hvf.memory import GuestMemory, MiB
from hvf.plugins.nvme import factory, spec
from hvf.plugins.nvme.testing import NvmeDriver
from hvf.plugins.pci.bus import PciBus
from hvf.testing.fakes import FakeVm

BDF = (0, 5, 0)
BLOCK = 512


def run(driver: NvmeDriver, depth: int, size: int, seconds: float,
        start: Callable[[int], tuple[int, int]]) -> tuple[int, float]:
    """Keep ``depth`` commands in flight for ``seconds``; ``start(slot)`` gives each
    new command's opcode and LBA. Returns the commands completed and the time taken."""
    buffers = [driver.alloc(size) for _ in range(depth)]
    prps = [driver.prps(gpa, size) for gpa in buffers]

    def submit(slot: int) -> None:
        opcode, lba = start(slot)
        driver.submit(1, opcode, prp1=prps[slot][0], prp2=prps[slot][1], cid=slot,
                      cdw=(lba, 0, size // BLOCK - 1), ring=False)

    for slot in range(depth):
        submit(slot)
    driver.ring(1)
    outstanding, done, began = depth, 0, time.perf_counter()
    deadline = began + seconds
    while outstanding:
        entries = driver.wait(1, 1, vector=1)
        while (entry := driver.poll(1)) is not None:
            entries.append(entry)
        for entry in entries:
            if entry.status:
                raise RuntimeError(f"command failed with status {entry.status:#x}")
            done += 1
            outstanding -= 1
            if time.perf_counter() < deadline:
                submit(entry.cid)
                outstanding += 1
        driver.ring(1)
    return done, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, help="image file (default: a new one)")
    parser.add_argument("--size", type=int, default=256, help="new image size in MiB")
    parser.add_argument("--seconds", type=float, default=5.0, help="per row")
    parser.add_argument("--nocache", action="store_true", help="O_DIRECT")
    parser.add_argument("--ioslots", type=int, default=32,
                        help="the controller's ioslots (default 32; the device's own is 8)")
    parser.add_argument("--doorbell-buffers", action="store_true",
                        help="Doorbell Buffer Config: ring only when EventIdx asks")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        image = args.image or Path(tmp) / "bench.img"
        if args.image is None:
            with image.open("wb") as f:
                for _ in range(args.size):
                    f.write(os.urandom(MiB))
        blocks = image.stat().st_size // BLOCK
        memory = GuestMemory(128 * MiB)
        vm = FakeVm(memory=memory)
        bus = PciBus()
        vm.attach(bus)
        config = {"path": str(image), "ioslots": str(args.ioslots)}
        if args.nocache:
            config["nocache"] = "true"
        dev = factory.create(vm=vm, slot=BDF, config=config)
        bus.add(BDF, dev)
        bus.assign_resources(enable_decoding=True)
        vm.loop.start()
        try:
            driver = NvmeDriver(vm, memory, BDF, vector_fd=lambda v: dev.msix.vectors[v].fd)
            driver.enable()
            driver.enable_msix()
            if args.doorbell_buffers and driver.use_doorbell_buffers():
                raise RuntimeError("Doorbell Buffer Config failed")
            driver.create_queue_pair(1, 256, vector=1)
            rows = _rows(driver, blocks, args.seconds)
        finally:
            vm.loop.stop()
            dev.close()
            memory.close()
    mode = "O_DIRECT" if args.nocache else "page cache"
    extra = ", doorbell buffers" if args.doorbell_buffers else ""
    print(f"hvf NVMe model, host side ({mode}{extra})")
    for name, value, unit in rows:
        print(f"  {name:<34} {value:>10.0f} {unit}")
    return 0


def _rows(driver: NvmeDriver, blocks: int, seconds: float) -> list[tuple[str, float, str]]:
    rng = random.Random(1)
    per_4k = 4096 // BLOCK
    count, took = run(driver, 32, 4096, seconds,
                      lambda slot: (spec.IO_READ, rng.randrange(blocks // per_4k) * per_4k))
    rows = [("4 KiB random read, QD 32", count / took, "IOPS")]
    for name, opcode in (("read", spec.IO_READ), ("write", spec.IO_WRITE)):
        position = [0]

        def sequential(slot: int, opcode: int = opcode) -> tuple[int, int]:
            lba = position[0]
            position[0] = (lba + MiB // BLOCK) % (blocks - MiB // BLOCK)
            return opcode, lba

        count, took = run(driver, 8, MiB, seconds, sequential)
        rows.append((f"1 MiB sequential {name}, QD 8", count * MiB / took / 1e6, "MB/s"))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
