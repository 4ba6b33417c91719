# SPDX-License-Identifier: BSD-2-Clause
"""Fetch, build and cache a small real Linux guest for tests and the demo.

The kit is made from Debian packages, fetched with apt but never installed:

* the kernel comes from ``linux-image-<ABI>-cloud-amd64``, the package that the
  metapackage ``linux-image-cloud-amd64`` currently depends on (its ``boot/vmlinuz-*``
  and ``boot/config-*``);
* the userland is ``bin/busybox`` from ``busybox-static``;
* the initramfs is a gzip-compressed newc cpio archive written here, in Python, with
  busybox, its applet links, ``/dev/console`` and an ``/init`` script that reports what
  the guest sees between ``=== hvf-guest <section>`` marker lines and then does what
  ``hvf.action=`` on the kernel command line asks (``poweroff``, ``reboot``, ``counter``
  or, by default, ``shell``).

Cache layout (``cache_dir()``)::

    .lock                                   flock(2) held while fetching or building
    state.json                              what the last fetch resolved (read offline)
    kernel/<package>_<version>/vmlinuz-<release>, config-<release>
    busybox/<version>/busybox
    initramfs/initramfs-<hash>.cpio.gz      hash of init script, applets and busybox

Everything is written under a temporary name and renamed into place, so a reader never
sees a half-written file, and a second call, once everything is cached, runs no apt
command at all.  ``refresh=True`` (``python -m hvf.testing.guestkit --refresh``)
resolves the package versions again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from hvf.errors import HvfError

__all__ = [
    "APPLETS",
    "INIT_SCRIPT",
    "MARKER",
    "Apt",
    "AptUnavailable",
    "CpioEntry",
    "Guest",
    "GuestKitError",
    "KernelInfo",
    "build_initramfs",
    "cache_dir",
    "ensure_guest",
    "fetch_busybox",
    "fetch_kernel",
    "kernel_cmdline",
    "newc_archive",
    "parse_cpio",
    "parse_kernel_dependency",
    "parse_report",
]

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: Prefix of the init script's section marker lines: ``=== hvf-guest cpus`` etc.
MARKER = "=== hvf-guest "
#: Bumped whenever the archive layout changes, so cached initramfs images are rebuilt.
INITRAMFS_FORMAT = 1
#: How long one apt command may take before it counts as failed.
APT_TIMEOUT_S = 900

T = TypeVar("T")

_KERNEL_DEP = re.compile(r"^\s*\|?Depends:\s*(linux-image-(\S+)-cloud-amd64)\s*$", re.M)


class GuestKitError(HvfError):
    """The guest kit could not be fetched, extracted or built."""


class AptUnavailable(GuestKitError):
    """apt or dpkg is missing: not a Debian-like host."""


# --------------------------------------------------------------------------- cpio


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive; ``data`` is a symlink's target for links."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    nlink: int = 0  # 0: 2 for directories, 1 otherwise

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _newc_header(entry: CpioEntry, ino: int, namesize: int) -> bytes:
    nlink = entry.nlink or (2 if stat.S_ISDIR(entry.mode) else 1)
    fields = (
        ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, len(entry.data),
        0, 0, entry.rdev[0], entry.rdev[1], namesize, 0,
    )  # fmt: skip
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise GuestKitError(f"cpio member {entry.name!r}: header field {value} out of range")
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """Return an uncompressed newc ("070701") cpio archive of ``entries`` plus the trailer.

    Names are stored without a leading ``/``; each header-plus-name and each body is
    padded with NULs to a multiple of four bytes, as the kernel's unpacker expects.
    """
    out = io.BytesIO()
    seen: set[str] = set()
    trailer = CpioEntry("TRAILER!!!", 0, nlink=1)
    for ino, entry in enumerate([*entries, trailer], start=1):
        name = entry.name.lstrip("/") or "."
        if entry is not trailer:
            if name in seen:
                raise GuestKitError(f"cpio member {name!r} appears twice")
            seen.add(name)
        raw_name = name.encode() + b"\0"
        header = _newc_header(entry, 0 if entry is trailer else ino, len(raw_name))
        out.write(header + raw_name + b"\0" * _pad4(len(header) + len(raw_name)))
        out.write(entry.data + b"\0" * _pad4(len(entry.data)))
    return out.getvalue()


def parse_cpio(archive: bytes) -> list[CpioEntry]:
    """Parse a newc cpio archive (the inverse of :func:`newc_archive`, trailer dropped)."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        header = archive[pos : pos + 110]
        if len(header) < 110 or header[:6] != b"070701":
            raise GuestKitError(f"cpio archive: bad newc header at offset {pos}")
        f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_end = pos + 110 + namesize
        name = archive[pos + 110 : name_end - 1].decode()
        pos = name_end + _pad4(110 + namesize)
        data = archive[pos : pos + filesize]
        if len(data) != filesize:
            raise GuestKitError(f"cpio archive: member {name!r} truncated")
        pos += filesize + _pad4(filesize)
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, f[1], data, (f[9], f[10]), f[2], f[3], f[5], f[4]))


# ------------------------------------------------------------------- init script

#: Applets linked to /bin/busybox in the archive (the init also runs
#: ``busybox --install -s`` for the rest once /proc is mounted).
APPLETS: tuple[str, ...] = (
    "basename", "cat", "cttyhack", "dmesg", "echo", "grep", "head", "ls", "mkdir",
    "mount", "poweroff", "readlink", "reboot", "setsid", "sh", "sleep", "tail", "uname",
)  # fmt: skip

INIT_SCRIPT = r"""#!/bin/busybox sh
# hvf guest kit /init: report what the guest sees, then act on hvf.action=.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s 2>/dev/null

echo "=== hvf-guest uname"
uname -a
echo "=== hvf-guest cpus"
grep -c ^processor /proc/cpuinfo
echo "=== hvf-guest pci"
for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev" ] || continue
    driver=none
    if [ -L "$dev/driver" ]; then
        driver=$(basename "$(readlink "$dev/driver")")
    fi
    echo "${dev##*/} vendor=$(cat "$dev/vendor") device=$(cat "$dev/device")" \
         "class=$(cat "$dev/class") driver=$driver"
done
echo "=== hvf-guest serial"
cat /proc/tty/driver/serial
echo "=== hvf-guest interrupts"
cat /proc/interrupts
echo "=== hvf-guest cmdline"
cat /proc/cmdline
echo "=== hvf-guest ready"

action=shell
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    hvf.action=*) action="${arg#hvf.action=}" ;;
    esac
done
case "$action" in
poweroff)
    poweroff -f
    ;;
reboot)
    reboot -f
    ;;
counter)
    n=0
    while :; do
        echo "tick $n"
        n=$((n + 1))
        sleep 1
    done
    ;;
*)
    [ "$action" = shell ] || echo "hvf-guest: unknown hvf.action=$action, starting a shell"
    setsid cttyhack sh
    poweroff -f
    ;;
esac
# PID 1 must not exit: the kernel would panic.
while :; do sleep 3600; done
"""


def initramfs_entries(busybox: bytes, init_script: str = INIT_SCRIPT) -> list[CpioEntry]:
    """The members of the guest kit's initramfs, parents before children."""
    entries = [CpioEntry.directory(".")]
    entries += [
        CpioEntry.directory(d)
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
                  "etc", "root", "run", "tmp")  # fmt: skip
    ]
    entries.append(CpioEntry.chardev("dev/console", 5, 1))
    entries.append(CpioEntry.chardev("dev/null", 1, 3, 0o666))
    entries.append(CpioEntry.file("bin/busybox", busybox, 0o755))
    entries += [CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in APPLETS]
    entries.append(CpioEntry.file("init", init_script.encode(), 0o755))
    return entries


def build_initramfs(busybox: Path, out: Path) -> Path:
    """Write the guest initramfs (gzip-compressed newc cpio) to ``out``; return ``out``.

    The result is byte-for-byte reproducible (fixed mtimes, no gzip timestamp) and
    replaces ``out`` atomically.
    """
    try:
        binary = Path(busybox).read_bytes()
    except OSError as exc:
        raise GuestKitError(f"cannot read busybox binary {busybox}: {exc.strerror}") from exc
    archive = newc_archive(initramfs_entries(binary))
    data = gzip.compress(archive, compresslevel=9, mtime=0)
    out = Path(out)
    _write_atomic(out, data)
    return out


def initramfs_hash(busybox: bytes) -> str:
    """Content hash keying a cached initramfs: format, init script, applets, busybox."""
    h = hashlib.sha256()
    h.update(f"hvf-initramfs-{INITRAMFS_FORMAT}\0".encode())
    h.update(INIT_SCRIPT.encode() + b"\0")
    h.update(" ".join(APPLETS).encode() + b"\0")
    h.update(busybox)
    return h.hexdigest()


def kernel_cmdline(action: str = "poweroff", extra: str = "") -> str:
    """A kernel command line for the kit's guest on the first serial port."""
    if action not in ("poweroff", "reboot", "shell", "counter"):
        raise GuestKitError(f"unknown guest action {action!r} (poweroff, reboot, shell, counter)")
    base = f"console=ttyS0 panic=-1 hvf.action={action}"
    return f"{base} {extra}".strip()


def parse_report(text: str) -> dict[str, list[str]]:
    """Split the init script's console output into ``{section: lines}``.

    Lines before the first marker (kernel messages) are dropped; ``ready`` maps to
    the lines after the ``=== hvf-guest ready`` marker.  Carriage returns are removed.
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.replace("\r", "").splitlines():
        if line.startswith(MARKER):
            current = sections.setdefault(line[len(MARKER) :].strip(), [])
        elif current is not None:
            current.append(line)
    return sections


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where the kit lives: ``$HVF_CACHE/guest-kit``, ``<checkout>/.cache/guest-kit``
    when running from a source checkout, else ``${XDG_CACHE_HOME:-~/.cache}/hvf/guest-kit``."""
    env = os.environ.get("HVF_CACHE")
    if env:
        return Path(env).expanduser() / "guest-kit"
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "guest-kit"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hvf" / "guest-kit"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise GuestKitError(f"cannot create guest kit cache {root}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_state(root: Path) -> dict[str, dict[str, str]]:
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _save_state(root: Path, key: str, value: dict[str, str]) -> None:
    state = _load_state(root)
    state[key] = value
    _write_atomic(root / "state.json", json.dumps(state, indent=2, sort_keys=True).encode())


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+~_-]", lambda m: "%%%02x" % ord(m.group()), text)


# ----------------------------------------------------------------------------- apt


def parse_kernel_dependency(output: str) -> tuple[str, str]:
    """From ``apt-cache depends linux-image-cloud-amd64`` output, return the real
    kernel package and its ABI, e.g. ``("linux-image-6.1.0-56-cloud-amd64", "6.1.0-56")``.
    """
    found = _KERNEL_DEP.findall(output)
    if not found:
        raise GuestKitError(
            f"{KERNEL_METAPACKAGE} does not depend on a linux-image-<ABI>-cloud-amd64 "
            f"package; apt-cache depends said: {output.strip()[:300]!r}"
        )
    return found[0][0], found[0][1]


def _field(control: str, name: str) -> str | None:
    match = re.search(rf"^{re.escape(name)}:\s*(.+)$", control, re.M)
    return match.group(1).strip() if match else None


@dataclass
class Apt:
    """The apt commands the kit runs; ``apt-get update`` at most once per instance."""

    updated: bool = False
    lists_dir: Path = field(default_factory=lambda: Path("/var/lib/apt/lists"))

    def _run(self, argv: Sequence[str], cwd: Path | None = None) -> str:
        if shutil.which(argv[0]) is None:
            raise AptUnavailable(
                f"{argv[0]} not found: the guest kit fetches Debian packages and needs "
                "apt (a Debian or Ubuntu host)"
            )
        env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
        cmd = " ".join(argv)
        try:
            proc = subprocess.run(
                list(argv), cwd=cwd, env=env, capture_output=True, text=True,
                timeout=APT_TIMEOUT_S, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise GuestKitError(f"`{cmd}` timed out after {exc.timeout:.0f} s") from exc
        except OSError as exc:
            raise GuestKitError(f"cannot run `{cmd}`: {exc.strerror}") from exc
        if proc.returncode != 0:
            raise GuestKitError(
                f"`{cmd}` failed with exit status {proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc.stdout

    def lists_present(self) -> bool:
        return any(self.lists_dir.glob("*_Packages*"))

    def update(self) -> bool:
        """Run ``apt-get update`` unless it already ran; return whether it ran now."""
        if self.updated:
            return False
        if os.geteuid() != 0:
            raise GuestKitError(
                "the apt package lists are missing or stale and `apt-get update` needs "
                "root: run `sudo apt-get update` once (apt-get download then works as "
                "any user), or point HVF_CACHE at a populated cache"
            )
        self.updated = True
        self._run(["apt-get", "update"])
        return True

    def retrying(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a sequence of apt lookups and downloads); if the package lists
        are missing, or ``fn`` fails, run ``apt-get update`` once and try again."""
        if not self.updated and not self.lists_present():
            self.update()
        try:
            return fn()
        except AptUnavailable:
            raise
        except GuestKitError as exc:
            if self.updated:
                raise
            if os.geteuid() != 0:
                raise GuestKitError(
                    f"{exc} (the apt package lists may be stale; `apt-get update` needs "
                    "root: run `sudo apt-get update` once)"
                ) from exc
            self.update()
            return fn()

    def resolve_kernel(self) -> str:
        """The real package behind ``linux-image-cloud-amd64``."""
        return parse_kernel_dependency(self._run(["apt-cache", "depends", KERNEL_METAPACKAGE]))[0]

    def candidate(self, package: str) -> str:
        """The version ``apt-get download`` would fetch."""
        out = self._run(["apt-cache", "show", "--no-all-versions", package])
        version = _field(out, "Version")
        if not version:
            raise GuestKitError(f"apt-cache show {package}: no Version field (package not found)")
        return version

    def download(self, package: str, version: str, dest: Path) -> Path:
        """``apt-get download package=version`` into ``dest``; return the .deb path."""
        for old in dest.glob("*.deb"):
            old.unlink()
        self._run(["apt-get", "download", f"{package}={version}"], cwd=dest)
        debs = sorted(dest.glob("*.deb"))
        if len(debs) != 1:
            raise GuestKitError(
                f"apt-get download {package}={version} left {len(debs)} .deb files in {dest}"
            )
        return debs[0]


def _extract(deb: Path, wanted: re.Pattern[str], dest: Path) -> dict[str, Path]:
    """Extract the regular files of ``deb`` whose path matches ``wanted`` into ``dest``
    (flat, by base name), streaming ``dpkg-deb --fsys-tarfile`` so nothing else is
    written.  Return ``{member path: extracted path}``."""
    if shutil.which("dpkg-deb") is None:
        raise AptUnavailable("dpkg-deb not found: the guest kit needs dpkg (a Debian host)")
    cmd = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    errors = tempfile.TemporaryFile()  # a file, not a pipe: no deadlock on chatter
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors)
    except OSError as exc:
        errors.close()
        raise GuestKitError(f"cannot run `{' '.join(cmd)}`: {exc.strerror}") from exc
    found: dict[str, Path] = {}
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                path = member.name.removeprefix("./")
                if not (member.isreg() and wanted.fullmatch(path)):
                    continue
                src = tar.extractfile(member)
                assert src is not None
                target = dest / Path(path).name
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                found[path] = target
        proc.stdout.read()
    except BaseException as exc:
        proc.kill()
        proc.wait()
        with errors:
            errors.seek(0)
            err = errors.read().decode(errors="replace").strip()
        if isinstance(exc, tarfile.TarError):
            raise GuestKitError(
                f"`{' '.join(cmd)}` produced a bad tar stream ({exc}): {err or 'no message'}"
            ) from exc
        raise
    finally:
        proc.stdout.close()
    proc.wait()
    with errors:
        errors.seek(0)
        err = errors.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise GuestKitError(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}: {err}")
    return found


# ------------------------------------------------------------------------- fetches


@dataclass(frozen=True)
class KernelInfo:
    """A cached kernel: bzImage path, its release (``uname -r``) and its config."""

    path: Path
    version: str
    config_path: Path
    package: str = ""
    package_version: str = ""


@dataclass(frozen=True)
class Guest:
    """Everything needed to boot the kit's guest."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    kernel_config: Path | None = None


def _cached(root: Path, key: str, names: Sequence[str]) -> dict[str, str] | None:
    entry = _load_state(root).get(key)
    if not isinstance(entry, dict):
        return None
    if all(isinstance(entry.get(n), str) and (root / entry[n]).is_file() for n in names):
        return entry
    return None


def _kernel_info(root: Path, entry: dict[str, str]) -> KernelInfo:
    return KernelInfo(
        root / entry["kernel"], entry["release"], root / entry["config"],
        entry["package"], entry["version"],
    )  # fmt: skip


def _install_dir(staging: Path, final: Path) -> None:
    """Rename a finished staging directory into place (replacing a stale one)."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)


def fetch_kernel(*, refresh: bool = False, apt: Apt | None = None) -> KernelInfo:
    """Return the cached Debian cloud kernel, fetching it first if needed.

    Without ``refresh`` a cached kernel is returned without running apt at all; with
    it the metapackage is resolved again and a newer kernel fetched if there is one.
    """
    root = cache_dir()
    names = ("kernel", "config")
    if not refresh and (entry := _cached(root, "kernel", names)):
        return _kernel_info(root, entry)
    apt = apt or Apt()

    def attempt() -> dict[str, str]:
        package = apt.resolve_kernel()
        version = apt.candidate(package)
        entry = _cached(root, "kernel", names)
        if entry and entry.get("package") == package and entry.get("version") == version:
            return entry
        rel_dir = Path("kernel") / _safe(f"{package}_{version}")
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            staging = Path(tmp) / "out"
            staging.mkdir()
            deb = apt.download(package, version, Path(tmp))
            files = _extract(deb, re.compile(r"boot/(vmlinuz|config)-.+"), staging)
            kernels = [p for p in files if p.startswith("boot/vmlinuz-")]
            configs = [p for p in files if p.startswith("boot/config-")]
            if len(kernels) != 1 or len(configs) != 1:
                raise GuestKitError(
                    f"{deb.name}: expected one boot/vmlinuz-* and one boot/config-*, "
                    f"found {sorted(files)}"
                )
            (root / "kernel").mkdir(exist_ok=True)
            _install_dir(staging, root / rel_dir)
        entry = {
            "package": package,
            "version": version,
            "release": kernels[0].removeprefix("boot/vmlinuz-"),
            "kernel": str(rel_dir / Path(kernels[0]).name),
            "config": str(rel_dir / Path(configs[0]).name),
        }
        _save_state(root, "kernel", entry)
        return entry

    with _locked(root):
        if not refresh and (entry := _cached(root, "kernel", names)):
            return _kernel_info(root, entry)  # another process fetched it meanwhile
        return _kernel_info(root, apt.retrying(attempt))


def fetch_busybox(*, refresh: bool = False, apt: Apt | None = None) -> Path:
    """Return the cached static busybox binary, fetching ``busybox-static`` if needed."""
    root = cache_dir()
    if not refresh and (entry := _cached(root, "busybox", ("path",))):
        return root / entry["path"]
    apt = apt or Apt()

    def attempt() -> dict[str, str]:
        version = apt.candidate(BUSYBOX_PACKAGE)
        entry = _cached(root, "busybox", ("path",))
        if entry and entry.get("version") == version:
            return entry
        rel_dir = Path("busybox") / _safe(version)
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            staging = Path(tmp) / "out"
            staging.mkdir()
            deb = apt.download(BUSYBOX_PACKAGE, version, Path(tmp))
            files = _extract(deb, re.compile(r"bin/busybox"), staging)
            if "bin/busybox" not in files:
                raise GuestKitError(f"{deb.name} has no bin/busybox")
            os.chmod(files["bin/busybox"], 0o755)
            (root / "busybox").mkdir(exist_ok=True)
            _install_dir(staging, root / rel_dir)
        entry = {"package": BUSYBOX_PACKAGE, "version": version, "path": str(rel_dir / "busybox")}
        _save_state(root, "busybox", entry)
        return entry

    with _locked(root):
        if not refresh and (entry := _cached(root, "busybox", ("path",))):
            return root / entry["path"]
        return root / apt.retrying(attempt)["path"]


def cached_initramfs(busybox: Path) -> Path:
    """Return the initramfs for ``busybox`` and the current init script, building it
    into the cache when its content hash is new."""
    root = cache_dir()
    try:
        digest = initramfs_hash(Path(busybox).read_bytes())
    except OSError as exc:
        raise GuestKitError(f"cannot read busybox binary {busybox}: {exc.strerror}") from exc
    out = root / "initramfs" / f"initramfs-{digest[:16]}.cpio.gz"
    if not out.is_file():
        build_initramfs(busybox, out)  # atomic and deterministic: no lock needed
    return out


def ensure_guest(*, refresh: bool = False) -> Guest:
    """Fetch (or find cached) the kernel and busybox and build the initramfs."""
    apt = Apt()
    kernel = fetch_kernel(refresh=refresh, apt=apt)
    busybox = fetch_busybox(refresh=refresh, apt=apt)
    initramfs = cached_initramfs(busybox)
    return Guest(kernel.path, initramfs, kernel.version, kernel.config_path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hvf.testing.guestkit [--refresh] [--json]``: fetch the kit and print
    its paths."""
    parser = argparse.ArgumentParser(
        prog="python -m hvf.testing.guestkit",
        description="Fetch and cache the Linux guest (Debian cloud kernel + busybox "
        "initramfs) that hvf's tests and demo boot.",
    )
    parser.add_argument("--refresh", action="store_true", help="resolve package versions again")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    try:
        guest = ensure_guest(refresh=args.refresh)
    except HvfError as exc:
        print(f"hvf.testing.guestkit: {exc}", file=sys.stderr)
        return 1
    info = {
        "kernel": str(guest.kernel),
        "initramfs": str(guest.initramfs),
        "kernel_version": guest.kernel_version,
        "kernel_config": str(guest.kernel_config),
        "cache": str(cache_dir()),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
