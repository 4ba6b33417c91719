# SPDX-License-Identifier: BSD-2-Clause
"""vhost-user-blk on real KVM against Debian's qemu-storage-daemon: the virtio_blk test
guest (tests/guests/virtio_blk.c) writes, flushes, reads back and checks a pattern while
the daemon serves the queues from guest RAM; raw and qcow2 images (checked on the host
with qemu-img); the daemon stopped (SIGTERM) and started again mid-run; the VM suspended mid-write
and restored (into shared RAM the daemon can map) carrying on to a correct read-back."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from hvf.testing import bootdisk
from test_incremental_checkpoint import guest_ram
from test_migration import finished, listening, start_migration
from test_snapshot import Hvf, ctl, poweroff, suspend_exit, wait_served, wait_until
from test_virtio_blk_guest import IMAGE_SIZE, SECTOR, pattern

from conftest import run_guest, run_hvf

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                       reason="qemu-storage-daemon (Debian's qemu-system-common) is not "
                              "installed; scripts/setup installs it"),
]

MACHINE = ("-s", "0,hostbridge", "-s", "31,lpc", "-l", "pc-testdev", "-l", "debugcon,stdio")


class StorageDaemon:
    """``qemu-storage-daemon`` exporting ``image`` as vhost-user-blk on ``socket``."""

    def __init__(self, image: Path, socket: Path, fmt: str = "raw", queues: int = 1, *,
                 locking: bool = True) -> None:
        self.image, self.socket, self.fmt, self.queues = image, socket, fmt, queues
        self.locking = locking  # off: a second daemon on an image the first has open
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.log = self.socket.with_suffix(".log")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["qemu-storage-daemon",
                 "--blockdev", f"driver=file,node-name=file0,filename={self.image}"
                               + ("" if self.locking else ",locking=off"),
                 "--blockdev", f"driver={self.fmt},node-name=disk0,file=file0",
                 "--export", ("type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                              f"addr.path={self.socket},writable=on,num-queues={self.queues}")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"qemu-storage-daemon did not start: {self.errors}")
            time.sleep(0.02)

    @property
    def errors(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the daemon crashes (a raw image keeps what was written)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM: the daemon flushes (qcow2 metadata included) and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[StorageDaemon]:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    d = StorageDaemon(img, tmp_path / "vhost.sock")
    yield d
    d.kill()


def check_image(img: Path, sectors: int) -> None:
    with img.open("rb") as f:
        head = f.read(sectors * SECTOR)
    expected = pattern(sectors)
    if head != expected:
        first = next(i for i in range(len(head)) if head[i] != expected[i])
        pytest.fail(f"image differs from the pattern at sector {first // SECTOR}")


def blk_lines(sectors: int) -> list[str]:
    return [f"blk capacity {IMAGE_SIZE // SECTOR}", f"blk wrote {sectors}",
            f"blk flushed {sectors}", f"blk read {sectors} ok"]


def test_guest_io_through_qemu_storage_daemon(guests: dict[str, Path],
                                               daemon: StorageDaemon) -> None:
    r = run_guest(guests["virtio_blk"], "-l", "debugcon,stdio",
                  "-s", f"3,vhost-user-blk,socket={daemon.socket}", timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[-6:-2] == blk_lines(2048), r.stdout
    assert lines[-2].startswith("blk id ") and lines[-1] == "blk done", r.stdout
    assert "lost" not in r.stderr, r.stderr
    daemon.kill()
    check_image(daemon.image, 2048)


@pytest.mark.skipif(shutil.which("qemu-img") is None,
                    reason="qemu-img (Debian's qemu-utils) is not installed")
def test_qcow2_image_served_by_the_daemon(guests: dict[str, Path], tmp_path: Path) -> None:
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, str(IMAGE_SIZE)],
                   check=True)
    d = StorageDaemon(qcow, tmp_path / "vhost.sock", fmt="qcow2")
    try:
        r = run_guest(guests["virtio_blk"], "-l", "debugcon,stdio",
                      "-s", f"3,vhost-user-blk,socket={d.socket}", timeout=300)
    finally:
        d.stop()
    assert r.returncode == 1 and r.stdout.splitlines()[-6:-2] == blk_lines(2048), r.stdout
    raw = tmp_path / "converted.img"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, raw], check=True)
    check_image(raw, 2048)


@pytest.mark.skipif(shutil.which("qemu-img") is None or not bootdisk.SEABIOS.exists(),
                    reason="needs qemu-img (qemu-utils) and SeaBIOS (seabios)")
def test_seabios_boots_a_qcow2_image_through_the_daemon(tmp_path: Path) -> None:
    """The boot program as a qcow2 image: SeaBIOS reads 1 MiB through int 13h and checks
    it, writes its pattern; the image, converted back to raw, holds that pattern."""
    raw = bootdisk.make_disk(tmp_path / "boot.img", tag="vuboot")
    qcow = tmp_path / "boot.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw.path, qcow],
                   check=True)
    d = StorageDaemon(qcow, tmp_path / "vhost.sock", fmt="qcow2")
    console = tmp_path / "com1.log"
    try:
        r = run_hvf([*bootdisk.seabios_args(console, debug=tmp_path / "debug.log"),
                     "-s", f"4,vhost-user-blk,socket={d.socket},bootindex=0", "vu-boot"],
                    timeout=120)
    finally:
        d.stop()
    text = console.read_text(errors="replace")
    assert r.returncode == 1, f"status {r.returncode}\n{text}\n{r.stderr[-2000:]}"
    assert raw.report(text).passed, text
    back = tmp_path / "back.img"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, back], check=True)
    attrs.evolve(raw, path=back).check_written()


def test_daemon_restarted_mid_run_the_guest_carries_on(
        guests: dict[str, Path], daemon: StorageDaemon, tmp_path: Path) -> None:
    """One request in flight (``depth=1``): resuming from the used index is then exact
    whatever the daemon did with the request it had taken. With several, a daemon
    without in-flight tracking (qemu-storage-daemon 7.2) that pushed a later request's
    completion and not an earlier one's would see the later run twice (see
    :mod:`hvf.plugins.virtio.vhost_user_blk`)."""
    sectors = 16384
    args = [*MACHINE, "-s", f"3,vhost-user-blk,socket={daemon.socket}",
            "--kernel", guests["virtio_blk"], "--append", f"n={sectors} depth=1", "vu-restart"]
    with Hvf(args, tmp_path, "a") as vm:
        wait_until(lambda: "blk capacity" in vm.stdout, 120, "the guest to start", vm)
        time.sleep(0.5)
        daemon.stop()  # SIGTERM: the daemon finishes the requests it took, then exits
        assert "blk done" not in vm.stdout, vm.stdout  # the guest is still at work
        time.sleep(0.5)
        daemon.start()
        assert vm.wait(300) == 1, (vm.stdout, vm.stderr)
        assert "reconnected" in vm.stderr, vm.stderr
    assert vm.stdout.splitlines()[-6:-2] == blk_lines(sectors), vm.stdout
    daemon.kill()
    check_image(daemon.image, sectors)


def test_suspend_mid_write_and_restore_into_shared_memory(
        guests: dict[str, Path], daemon: StorageDaemon, tmp_path: Path) -> None:
    """A restore normally maps the RAM file copy-on-write; with a vhost-user disk in the
    snapshot's configuration RAM is loaded into a memfd the daemon maps, and the guest's
    read-back after the restore checks every sector."""
    sectors, name, snap = 16384, "vu-suspend", tmp_path / "snap"
    args = [*MACHINE, "-s", f"3,vhost-user-blk,socket={daemon.socket}",
            "--kernel", guests["virtio_blk"], "--append", f"n={sectors}", name]
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_until(lambda: "blk capacity" in vm.stdout, 120, "the guest to start", vm)
        time.sleep(1)
        suspend_exit(name, vm, snap)
        assert f"blk wrote {sectors}" not in vm.stdout, "suspended too late: writes done"
        first = vm.stdout
    with Hvf(["-r", snap], tmp_path, "b") as vm:
        assert vm.wait(300) == 1, (vm.stdout, vm.stderr)
        rest = vm.stdout
    assert (first + rest).splitlines()[-6:-2] == blk_lines(sectors), (first, rest)
    daemon.kill()
    check_image(daemon.image, sectors)


#: Sectors the mid-read-back tests write and read back: 16 MiB, whose read-back lasts
#: seconds here (the guest checks every word), time enough to stop it in the middle.
READ_BACK = IMAGE_SIZE // SECTOR // 4


def reading_back(name: str, vm: Hvf, sectors: int) -> None:
    """Wait until the guest is in its read-back, the daemon writing guest RAM."""
    wait_until(lambda: f"blk flushed {sectors}" in vm.stdout, 300, "the writes to end", vm)
    time.sleep(0.3)


def test_an_incremental_checkpoint_takes_in_what_the_daemon_wrote(
        guests: dict[str, Path], daemon: StorageDaemon, tmp_path: Path) -> None:
    """Mid read-back only the daemon writes the guest's data buffers: its own dirty log
    (LOG_SHMFD) goes into the layer, so the layered RAM equals a full save of the same
    paused guest, and the restored guest's read-back checks every sector."""
    sectors, name = READ_BACK, "vu-incremental"
    snap, whole = tmp_path / "snap", tmp_path / "whole"
    args = [*MACHINE, "-s", f"3,vhost-user-blk,socket={daemon.socket}",
            "--kernel", guests["virtio_blk"], "--append", f"n={sectors}", name]
    with Hvf(args, tmp_path, "a") as vm:
        wait_served(name, vm)
        wait_until(lambda: "blk capacity" in vm.stdout, 120, "the guest to start", vm)
        reading_back(name, vm, sectors)
        ctl(name, "checkpoint", snap)  # from here the guest only reads its data buffers
        time.sleep(0.5)
        layer = ctl(name, "suspend", "--incremental", snap)
        assert f"blk read {sectors}" not in vm.stdout, "suspended too late: read-back done"
        ctl(name, "checkpoint", whole)  # the same paused guest, all of it
        print(f"\nincremental checkpoint mid read-back: {layer['ram_bytes_written']} bytes")
        assert guest_ram(snap) == guest_ram(whole)
        first = vm.stdout
        poweroff(name, vm)
    with Hvf(["-r", snap], tmp_path, "b") as vm:
        assert vm.wait(300) == 1, (vm.stdout, vm.stderr)
        rest = vm.stdout
    assert (first + rest).splitlines()[-6:-2] == blk_lines(sectors), (first, rest)


def test_migrates_mid_read_back_to_another_daemon(
        guests: dict[str, Path], daemon: StorageDaemon, tmp_path: Path) -> None:
    """Pre-copy with the daemon's dirty log: the destination, on a second daemon for
    the same image (its socket given with -o, as a console path may be), finishes the
    read-back, every sector checked."""
    sectors, name = READ_BACK, "vu-migrate"
    other = StorageDaemon(daemon.image, tmp_path / "vhost-b.sock", locking=False)
    sock = tmp_path / "mig.sock"
    args = [*MACHINE, "-s", f"3,vhost-user-blk,socket={daemon.socket}",
            "--kernel", guests["virtio_blk"], "--append", f"n={sectors}", name]
    try:
        with Hvf(args, tmp_path, "a") as src, \
                Hvf(["--incoming", f"unix:{sock}", "-o", f"pci.0.3.0.socket={other.socket}"],
                    tmp_path, "b", runtime=tmp_path / "run-b") as dst:
            wait_served(name, src)
            wait_until(lambda: listening(dst), 60, "the destination to listen", dst)
            reading_back(name, src, sectors)
            status, reply = finished(start_migration(name, src, f"unix:{sock}"), 300)
            assert status == 0 and reply["state"] == "migrated", (reply, dst.stderr)
            print(f"\nmigrated mid read-back: downtime {reply['downtime_ms']} ms, "
                  f"{reply['rounds']} rounds")
            assert src.wait(30) == 0, src.stderr
            assert dst.wait(300) == 1, (dst.stdout, dst.stderr)
        assert f"blk read {sectors}" not in src.stdout, "migrated too late: read-back done"
        assert f"blk read {sectors} ok" in dst.stdout.splitlines(), (src.stdout, dst.stdout)
    finally:
        other.kill()


def test_bad_vhost_user_configuration_exits_4(tmp_path: Path) -> None:
    cases = {
        "3,vhost-user-blk": "no back end given",
        f"3,vhost-user-blk,socket={tmp_path / 'absent.sock'}": "cannot connect",
        "3,vhost-user-blk,socket=/x,queues=0": "queues=",
        "3,vhost-user-blk,path=/x": "invalid option 'path=/x'",
    }
    for slot, message in cases.items():
        r = run_hvf([*MACHINE, "-s", slot, "vu-bad"], timeout=60)
        assert r.returncode == 4 and message in r.stderr, (slot, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
