# SPDX-License-Identifier: BSD-2-Clause
"""The guest kit: newc cpio writer, initramfs contents, init script, cache, apt parsing."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from hvf.errors import HvfError
from hvf.testing import guestkit
from hvf.testing.guestkit import CpioEntry, GuestKitError, newc_archive, parse_cpio

ONLINE = os.environ.get("HVF_GUESTKIT_ONLINE") == "1"

SAMPLE_DEPENDS = """\
linux-image-cloud-amd64
  Depends: linux-image-6.1.0-56-cloud-amd64
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HVF_CACHE", str(tmp_path / "c"))
    return tmp_path / "c" / "guest-kit"


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any apt or dpkg command fails the test."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(guestkit.subprocess, "run", forbidden)
    monkeypatch.setattr(guestkit.subprocess, "Popen", forbidden)


def _fake_busybox(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF fake busybox" + bytes(range(256)) * 3)
    path.chmod(0o755)
    return path


def _host_busybox() -> str | None:
    """A busybox to run: $PATH's, else one the kit already cached (never fetched here)."""
    found = shutil.which("busybox")
    if found:
        return found
    cached = sorted(guestkit.cache_dir().glob("busybox/*/busybox"))
    return str(cached[-1]) if cached else None


# ----------------------------------------------------------------------------- cpio


def test_newc_round_trip_and_layout() -> None:
    entries = [
        CpioEntry.directory("."),
        CpioEntry.directory("bin"),
        CpioEntry.file("bin/a", b"xyz", 0o755),  # 3 bytes: 1 byte of padding
        CpioEntry.file("empty", b""),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.chardev("dev/console", 5, 1),
    ]
    archive = newc_archive(entries)
    assert archive.startswith(b"070701")
    assert len(archive) % 4 == 0
    back = parse_cpio(archive)
    assert [e.name for e in back] == [e.name for e in entries]
    for want, got in zip(entries, back, strict=True):
        assert got.mode == want.mode and got.data == want.data and got.rdev == want.rdev
    by_name = {e.name: e for e in back}
    assert stat.S_ISLNK(by_name["bin/sh"].mode) and by_name["bin/sh"].data == b"busybox"
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1) and console.data == b""
    assert by_name["."].nlink == 2 and by_name["bin/a"].nlink == 1
    # The trailer closes the archive, and every header starts 4-byte aligned.
    assert b"TRAILER!!!\0" in archive[-128:]
    pos = 0
    for _ in range(len(entries) + 1):
        assert pos % 4 == 0 and archive[pos : pos + 6] == b"070701"
        namesize = int(archive[pos + 94 : pos + 102], 16)
        filesize = int(archive[pos + 54 : pos + 62], 16)
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + (-filesize % 4)
    assert pos == len(archive)


@pytest.mark.parametrize("size", range(9))
def test_newc_padding_every_length(size: int) -> None:
    data = bytes(range(1, size + 1))
    name = "f" * (size + 1)
    archive = newc_archive([CpioEntry.file(name, data)])
    (entry,) = parse_cpio(archive)
    assert entry.name == name and entry.data == data
    header_and_name = 110 + len(name) + 1
    body = header_and_name + (-header_and_name % 4)
    assert archive[header_and_name:body] == b"\0" * (body - header_and_name)
    assert archive[body : body + size] == data


def test_newc_rejects_duplicates_and_garbage() -> None:
    with pytest.raises(GuestKitError, match="twice"):
        newc_archive([CpioEntry.directory("a"), CpioEntry.directory("/a")])
    with pytest.raises(GuestKitError, match="bad newc header"):
        parse_cpio(b"070707" + b"0" * 200)
    assert issubclass(GuestKitError, HvfError)


def test_host_cpio_lists_archive(tmp_path: Path) -> None:
    tool = shutil.which("cpio")
    argv = [tool, "-t"] if tool else None
    if argv is None and (bb := _host_busybox()):
        argv = [bb, "cpio", "-t"]
    if argv is None:
        pytest.skip("no cpio or busybox on this host to cross-check the archive")
    entries = [CpioEntry.directory("bin"), CpioEntry.file("bin/x", b"hello"),
               CpioEntry.symlink("bin/y", "x"), CpioEntry.chardev("console", 5, 1)]  # fmt: skip
    listing = subprocess.run(
        argv, input=newc_archive(entries), capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["bin", "bin/x", "bin/y", "console"]


# ------------------------------------------------------------------------ initramfs


def test_build_initramfs_contents(tmp_path: Path) -> None:
    busybox = _fake_busybox(tmp_path / "busybox")
    out = guestkit.build_initramfs(busybox, tmp_path / "out" / "initramfs.cpio.gz")
    raw = out.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    entries = {e.name: e for e in parse_cpio(gzip.decompress(raw))}
    assert entries["bin/busybox"].data == busybox.read_bytes()
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["init"].mode == stat.S_IFREG | 0o755
    assert entries["init"].data.decode() == guestkit.INIT_SCRIPT
    assert entries["init"].data.startswith(b"#!/bin/busybox sh\n")
    assert entries["dev/console"].rdev == (5, 1)
    assert stat.S_ISCHR(entries["dev/console"].mode)
    for d in ("dev", "proc", "sys", "bin"):
        assert stat.S_ISDIR(entries[d].mode)
    for applet in ("sh", "mount", "cat", "poweroff", "reboot", "sleep", "grep", "cttyhack"):
        link = entries[f"bin/{applet}"]
        assert stat.S_ISLNK(link.mode) and link.data == b"busybox"
    # Parents come before their children, as the kernel's unpacker needs.
    names = list(entries)
    for name in names:
        parent = name.rpartition("/")[0]
        if parent:
            assert names.index(parent) < names.index(name)
    # Reproducible: same inputs, same bytes.
    again = guestkit.build_initramfs(busybox, tmp_path / "again.cpio.gz")
    assert again.read_bytes() == raw


def test_init_script_sections_and_actions() -> None:
    script = guestkit.INIT_SCRIPT
    for section in ("cpus", "pci", "serial", "interrupts", "cmdline", "ready"):
        assert f'echo "=== hvf-guest {section}"' in script
    for action in ("poweroff)", "reboot)", "counter)"):
        assert action in script
    assert "tick $n" in script and "setsid cttyhack sh" in script


def test_init_script_syntax(tmp_path: Path) -> None:
    bb = _host_busybox()
    if bb is None:
        pytest.skip("no busybox on this host or in the guest kit cache to run `sh -n`")
    script = tmp_path / "init"
    script.write_text(guestkit.INIT_SCRIPT)
    proc = subprocess.run([bb, "sh", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_parse_report_and_cmdline() -> None:
    text = (
        "[    0.1] booting\r\n=== hvf-guest cpus\r\n2\r\n=== hvf-guest pci\r\n"
        "0000:00:00.0 vendor=0x8086 device=0x1237 class=0x060000 driver=none\n"
        "=== hvf-guest ready\n"
    )
    report = guestkit.parse_report(text)
    assert report["cpus"] == ["2"]
    assert report["pci"][0].startswith("0000:00:00.0 vendor=0x8086")
    assert report["ready"] == []
    assert "booting" not in str(report)
    assert guestkit.kernel_cmdline("counter").endswith("hvf.action=counter")
    assert "console=ttyS0" in guestkit.kernel_cmdline()
    with pytest.raises(GuestKitError, match="unknown guest action"):
        guestkit.kernel_cmdline("dance")


# ----------------------------------------------------------------------- apt parsing


def test_parse_kernel_dependency() -> None:
    assert guestkit.parse_kernel_dependency(SAMPLE_DEPENDS) == (
        "linux-image-6.1.0-56-cloud-amd64",
        "6.1.0-56",
    )
    odd = "linux-image-cloud-amd64\n |Depends: linux-image-6.12.9+bpo-cloud-amd64\n  Depends: foo\n"
    assert guestkit.parse_kernel_dependency(odd)[1] == "6.12.9+bpo"
    with pytest.raises(GuestKitError, match="linux-image-<ABI>-cloud-amd64"):
        guestkit.parse_kernel_dependency("linux-image-cloud-amd64\n  Depends: <nothing>\n")


class FakeApt(guestkit.Apt):
    """Records apt calls; downloads are never real."""

    def __init__(self) -> None:
        super().__init__(updated=True)
        self.calls: list[str] = []

    def resolve_kernel(self) -> str:
        self.calls.append("resolve")
        return "linux-image-9.9.9-1-cloud-amd64"

    def candidate(self, package: str) -> str:
        self.calls.append(f"candidate {package}")
        return "9.9.9-1" if package.startswith("linux") else "1:1.0-1"

    def download(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append(f"download {package}={version}")
        return dest / "pkg.deb"


def test_cache_miss_then_offline_hit(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fake_extract(deb: Path, wanted: object, dest: Path) -> dict[str, Path]:
        if "busybox" in str(wanted):
            return {"bin/busybox": _fake_busybox(dest / "busybox")}
        (dest / "vmlinuz-9.9.9-1-cloud-amd64").write_bytes(b"kernel")
        (dest / "config-9.9.9-1-cloud-amd64").write_text("CONFIG_SERIAL_8250_PCI=y\n")
        return {
            "boot/vmlinuz-9.9.9-1-cloud-amd64": dest / "vmlinuz-9.9.9-1-cloud-amd64",
            "boot/config-9.9.9-1-cloud-amd64": dest / "config-9.9.9-1-cloud-amd64",
        }

    monkeypatch.setattr(guestkit, "_extract", fake_extract)
    apt = FakeApt()
    kernel = guestkit.fetch_kernel(apt=apt)
    busybox = guestkit.fetch_busybox(apt=apt)
    assert kernel.version == "9.9.9-1-cloud-amd64" and kernel.path.read_bytes() == b"kernel"
    assert kernel.package_version == "9.9.9-1"
    assert kernel.path.is_relative_to(cache) and busybox.is_relative_to(cache)
    assert ":" not in str(busybox.relative_to(cache))
    assert apt.calls[-1] == "download busybox-static=1:1.0-1"
    assert not list(cache.glob(".fetch-*")), "temporary fetch directories left behind"

    # Everything cached: no apt, no dpkg, no subprocess at all.
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(guestkit.subprocess, "run", forbidden)
    monkeypatch.setattr(guestkit.subprocess, "Popen", forbidden)
    monkeypatch.setattr(guestkit.Apt, "_run", forbidden)
    guest = guestkit.ensure_guest()
    assert guest.kernel == kernel.path and guest.kernel_version == kernel.version
    assert guest.initramfs.is_relative_to(cache / "initramfs")
    first = guest.initramfs.stat().st_mtime_ns
    assert guestkit.ensure_guest().initramfs.stat().st_mtime_ns == first  # not rebuilt

    # A changed busybox gives a new initramfs (content hash), still offline.
    busybox.write_bytes(b"another busybox")
    assert guestkit.ensure_guest().initramfs != guest.initramfs

    # refresh re-resolves; the same versions mean no new download.
    calls = len(apt.calls)
    guestkit.fetch_kernel(refresh=True, apt=apt)
    assert apt.calls[calls:] == ["resolve", "candidate linux-image-9.9.9-1-cloud-amd64"]


def test_cache_dir_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HVF_CACHE", str(tmp_path))
    assert guestkit.cache_dir() == tmp_path / "guest-kit"
    monkeypatch.delenv("HVF_CACHE")
    repo = Path(guestkit.__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        assert guestkit.cache_dir() == repo / ".cache" / "guest-kit"


def test_apt_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(guestkit.shutil, "which", lambda name: None)
    with pytest.raises(guestkit.AptUnavailable, match="apt-cache not found.*Debian"):
        guestkit.Apt().candidate("busybox-static")

    monkeypatch.setattr(guestkit.shutil, "which", lambda name: f"/usr/bin/{name}")

    def failing(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 100, "", "E: Unable to locate package nope")

    monkeypatch.setattr(guestkit.subprocess, "run", failing)
    with pytest.raises(GuestKitError, match=r"`apt-cache show --no-all-versions nope`.*locate"):
        guestkit.Apt(updated=True).candidate("nope")

    # Missing lists as a non-root user: say that apt-get update needs root.
    monkeypatch.setattr(guestkit.os, "geteuid", lambda: 1000)
    apt = guestkit.Apt(lists_dir=tmp_path)
    with pytest.raises(GuestKitError, match="apt-get update` needs root"):
        apt.retrying(lambda: apt.candidate("busybox-static"))


def test_apt_update_at_most_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(guestkit.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(guestkit.os, "geteuid", lambda: 0)
    ran: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        ran.append(argv)
        if argv[:2] == ["apt-get", "update"]:
            return subprocess.CompletedProcess(argv, 0, "", "")
        return subprocess.CompletedProcess(argv, 100, "", "E: 404 Not Found")

    monkeypatch.setattr(guestkit.subprocess, "run", fake_run)
    (tmp_path / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4").touch()
    apt = guestkit.Apt(lists_dir=tmp_path)
    with pytest.raises(GuestKitError, match="404"):
        apt.retrying(lambda: apt.candidate("busybox-static"))
    with pytest.raises(GuestKitError, match="404"):
        apt.retrying(lambda: apt.candidate("busybox-static"))
    assert [a[:2] for a in ran].count(["apt-get", "update"]) == 1
    assert len(ran) == 4  # show, update, show again; then only show


# --------------------------------------------------------------------------- online


@pytest.mark.skipif(not ONLINE, reason="set HVF_GUESTKIT_ONLINE=1 to fetch the real guest kit")
def test_real_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVF_CACHE", str(tmp_path))
    start = time.monotonic()
    guest = guestkit.ensure_guest()
    first = time.monotonic() - start
    assert guest.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert guest.kernel_version.endswith("-cloud-amd64")
    assert guest.kernel_config is not None
    config = guest.kernel_config.read_text()
    assert "CONFIG_SERIAL_8250=y" in config and "CONFIG_BLK_DEV_INITRD=y" in config
    entries = {e.name for e in parse_cpio(gzip.decompress(guest.initramfs.read_bytes()))}
    assert {"init", "bin/busybox", "dev/console"} <= entries

    start = time.monotonic()
    assert guestkit.ensure_guest() == guest
    assert time.monotonic() - start < min(first, 1.0)

    busybox = sorted((tmp_path / "guest-kit").glob("busybox/*/busybox"))[0]
    script = tmp_path / "init"
    script.write_text(guestkit.INIT_SCRIPT)
    subprocess.run([str(busybox), "sh", "-n", str(script)], check=True)
