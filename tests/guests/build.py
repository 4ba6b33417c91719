# SPDX-License-Identifier: BSD-2-Clause
"""Build the hvf multiboot test guests.

Each guest ``NAME`` is ``tests/guests/NAME.S``, assembled with ``as --32``,
or ``tests/guests/NAME.c``, compiled freestanding with ``gcc -m32`` together
with the shared C runtime (``libc.c``, ``virtio_lib.c``).  Either way it is
linked with the shared runtime ``common.S`` using ``ld -m elf_i386 -T
link.ld`` and written to ``out_dir/NAME.elf``.

Usable as a library (``build_guest``) or as a script::

    python3 tests/guests/build.py OUT_DIR [NAME ...]
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

GUEST_DIR = pathlib.Path(__file__).resolve().parent

GUESTS: tuple[str, ...] = (
    "hello",
    "io",
    "pciscan",
    "barmove",
    "smp",
    "triplefault",
    "strictio",
    "outloop",
    "halt",
    "serial_echo",
    "serial_loopback",
    "serial_tx",
    "serial_rx",
    "counter",
    "counter_smp",
    "counter_rep",
    "mmioexec",
    "power",
    "virtio_rng",
    "virtio_console",
)

# Files every guest depends on besides its own NAME.S.
_COMMON_SOURCES: tuple[str, ...] = ("common.S", "guest.inc", "link.ld")

# Files a guest pulls in with `.include` beyond guest.inc (rebuild triggers).
_EXTRA_SOURCES: dict[str, tuple[str, ...]] = {
    name: ("serial_lib.S",)
    for name in ("serial_echo", "serial_loopback", "serial_tx", "serial_rx")
}
_EXTRA_SOURCES.update(
    {name: ("counter_lib.S",) for name in ("counter", "counter_smp", "counter_rep")}
)

# C guests (NAME.c): compiled with these shared sources and headers.
_C_SHARED_SOURCES: tuple[str, ...] = ("libc.c", "virtio_lib.c")
_C_HEADERS: tuple[str, ...] = ("libc.h", "virtio.h")

AS = os.environ.get("HVF_GUEST_AS", "as")
LD = os.environ.get("HVF_GUEST_LD", "ld")
CC = os.environ.get("HVF_GUEST_CC", "gcc")

# Freestanding 32-bit code with no FPU/SSE state (KVM's instruction emulator,
# which runs these guests on kvm_pvm hosts, has no x87/SSE state instructions),
# no CET markers, and no loops turned into library calls.
CFLAGS: tuple[str, ...] = (
    "-m32", "-march=i686", "-ffreestanding", "-fno-builtin", "-nostdlib",
    "-fno-pic", "-fno-pie", "-fno-stack-protector", "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-mno-sse", "-mno-mmx", "-mno-80387", "-mgeneral-regs-only",
    "-fno-tree-loop-distribute-patterns", "-O2", "-Wall", "-Wextra",
)


class GuestBuildError(RuntimeError):
    """Raised when a guest cannot be assembled or linked."""


def _main_source(name: str) -> pathlib.Path:
    """``NAME.c`` if there is one, else ``NAME.S``."""
    c_src = GUEST_DIR / f"{name}.c"
    return c_src if c_src.is_file() else GUEST_DIR / f"{name}.S"


def guest_sources(name: str) -> list[pathlib.Path]:
    """All files ``NAME.elf`` depends on (sources, linker script, this file)."""
    main_src = _main_source(name)
    c_extra = _C_SHARED_SOURCES + _C_HEADERS if main_src.suffix == ".c" else ()
    return (
        [main_src]
        + [GUEST_DIR / s for s in _EXTRA_SOURCES.get(name, ())]
        + [GUEST_DIR / s for s in c_extra]
        + [GUEST_DIR / s for s in _COMMON_SOURCES]
        + [pathlib.Path(__file__).resolve()]
    )


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise GuestBuildError(
            f"guest toolchain not found: {cmd[0]!r} ({exc}); "
            "install GNU binutils with i386 support (and gcc for C guests)"
        ) from exc
    except subprocess.CalledProcessError as exc:
        output = "\n".join(s for s in (exc.stdout, exc.stderr) if s)
        raise GuestBuildError(
            f"command failed (exit {exc.returncode}): {' '.join(cmd)}\n{output}"
        ) from exc


def _up_to_date(elf: pathlib.Path, sources: list[pathlib.Path]) -> bool:
    try:
        elf_mtime = elf.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(src.stat().st_mtime_ns < elf_mtime for src in sources)


def build_guest(name: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Build guest ``name`` into ``out_dir`` and return the ``.elf`` path.

    Nothing is rebuilt when the existing ``.elf`` is newer than all of its
    sources.  Raises ``GuestBuildError`` (with the tool's stderr) on failure
    and ``ValueError`` for an unknown guest.
    """
    if name not in GUESTS:
        raise ValueError(f"unknown guest {name!r}; known: {', '.join(GUESTS)}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    elf = out_dir / f"{name}.elf"
    sources = guest_sources(name)
    for src in sources:
        if not src.is_file():
            raise GuestBuildError(f"missing guest source {src}")
    if _up_to_date(elf, sources):
        return elf

    # Build in a private directory and rename into place, so that
    # concurrent builds into the same out_dir never see partial files.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as tmp:
        tmpdir = pathlib.Path(tmp)
        objs = []
        main_src = _main_source(name)
        asm = [main_src] if main_src.suffix == ".S" else []
        for src in asm + [GUEST_DIR / "common.S"]:
            obj = tmpdir / (src.stem + ".o")
            _run([AS, "--32", "-I", str(GUEST_DIR), "-o", str(obj), str(src)])
            objs.append(str(obj))
        if main_src.suffix == ".c":
            for src in [main_src] + [GUEST_DIR / s for s in _C_SHARED_SOURCES]:
                obj = tmpdir / (src.stem + ".o")
                _run([CC, *CFLAGS, "-I", str(GUEST_DIR), "-c", "-o", str(obj), str(src)])
                objs.append(str(obj))
        tmp_elf = tmpdir / elf.name
        _run(
            [LD, "-m", "elf_i386", "-T", str(GUEST_DIR / "link.ld"),
             "-z", "noexecstack", "-o", str(tmp_elf), *objs]
        )
        os.replace(tmp_elf, elf)
    return elf


def main(argv: list[str]) -> int:
    if not argv:
        print(f"usage: {sys.argv[0]} OUT_DIR [NAME ...]", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(argv[0])
    for name in argv[1:] or GUESTS:
        try:
            print(build_guest(name, out_dir))
        except (GuestBuildError, ValueError) as exc:
            print(exc, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
