# SPDX-License-Identifier: BSD-2-Clause
"""Build tiny multiboot test guests from GNU assembler or freestanding C.

A guest is one source file: ``NAME.S``, assembled with ``as --32``, or ``NAME.c``,
compiled freestanding with ``gcc -m32`` (:data:`CFLAGS`) together with the C runtime
(``libc.c``, ``virtio_lib.c``). Either way it is linked with the runtime ``common.S``
by ``ld -m elf_i386 -T link.ld`` into ``NAME.elf``. The runtime lives beside this
module and is on the include path after the source's own directory, so
``.include "guest.inc"``, ``#include "libc.h"`` and ``#include "virtio.h"`` find it.

The guest provides ``main`` (common.S): it is called in 32-bit protected mode with
``mb_info`` set, and what it returns in EAX is written to port 0xF4, so hvf with
``-l pc-testdev`` exits with ``(EAX << 1) | 1``. ``HVF_GUEST_AS``, ``HVF_GUEST_LD`` and
``HVF_GUEST_CC`` override the tools.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CFLAGS", "RUNTIME", "GuestBuildError", "build_guest", "dependencies"]

#: The directory of the runtime: ``common.S``, ``guest.inc``, ``link.ld``, the C runtime.
RUNTIME = Path(__file__).resolve().parent
#: What every guest is built with besides its own source.
_RUNTIME_SOURCES = ("common.S", "guest.inc", "link.ld")
#: What a C guest is compiled with, and the headers it may include.
_C_RUNTIME_SOURCES = ("libc.c", "virtio_lib.c")
_C_RUNTIME_HEADERS = ("libc.h", "virtio.h")

AS = os.environ.get("HVF_GUEST_AS", "as")
LD = os.environ.get("HVF_GUEST_LD", "ld")
CC = os.environ.get("HVF_GUEST_CC", "gcc")

#: Freestanding 32-bit code with no FPU/SSE state (KVM's instruction emulator, which
#: runs these guests on kvm_pvm hosts, has no x87/SSE state instructions), no CET
#: markers, and no loops turned into library calls.
CFLAGS: tuple[str, ...] = (
    "-m32", "-march=i686", "-ffreestanding", "-fno-builtin", "-nostdlib",
    "-fno-pic", "-fno-pie", "-fno-stack-protector", "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-mno-sse", "-mno-mmx", "-mno-80387", "-mgeneral-regs-only",
    "-fno-tree-loop-distribute-patterns", "-O2", "-Wall", "-Wextra",
)


class GuestBuildError(RuntimeError):
    """A guest could not be assembled, compiled or linked (the message holds the
    command and the tool's output)."""


def dependencies(source: Path, depends: Iterable[Path] = ()) -> list[Path]:
    """Every file the guest built from ``source`` depends on: the source, ``depends``
    (what it includes beyond the runtime), the runtime and this module."""
    runtime = _RUNTIME_SOURCES
    if source.suffix == ".c":
        runtime += _C_RUNTIME_SOURCES + _C_RUNTIME_HEADERS
    return [source, *depends, *(RUNTIME / name for name in runtime), Path(__file__).resolve()]


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


def _up_to_date(elf: Path, sources: list[Path]) -> bool:
    try:
        elf_mtime = elf.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(src.stat().st_mtime_ns < elf_mtime for src in sources)


def build_guest(source: os.PathLike[str] | str, out_dir: os.PathLike[str] | str, *,
                depends: Iterable[Path] = (), link_address: int | None = None) -> Path:
    """Build the guest ``source`` (``NAME.S`` or ``NAME.c``) into ``out_dir/NAME.elf``
    and return that path; ``link_address`` moves the image from 1 MiB (``ld -Ttext``).

    Nothing is rebuilt while the ``.elf`` is newer than every file of
    :func:`dependencies` (give ``depends``: the files ``source`` includes beyond the
    runtime). The build goes through a private temporary directory and a rename, so
    parallel builds into one ``out_dir`` are safe. Raises :class:`GuestBuildError`.
    """
    source = Path(source).resolve()
    if source.suffix not in (".S", ".c"):
        raise GuestBuildError(f"{source}: a guest source is NAME.S or NAME.c")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    elf = out / f"{source.stem}.elf"
    sources = dependencies(source, depends)
    for src in sources:
        if not src.is_file():
            raise GuestBuildError(f"missing guest source {src}")
    if _up_to_date(elf, sources):
        return elf

    include = ["-I", str(source.parent), "-I", str(RUNTIME)]
    with tempfile.TemporaryDirectory(prefix=f".{source.stem}-", dir=out) as tmp:
        tmpdir = Path(tmp)
        asm = [source] if source.suffix == ".S" else []
        c = [source, *(RUNTIME / name for name in _C_RUNTIME_SOURCES)] if not asm else []
        objs = []  # numbered: a guest may share a runtime file's name
        for src in [*asm, RUNTIME / "common.S", *c]:
            obj = str(tmpdir / f"{len(objs)}-{src.stem}.o")
            if src.suffix == ".S":
                _run([AS, "--32", *include, "-o", obj, str(src)])
            else:
                _run([CC, *CFLAGS, *include, "-c", "-o", obj, str(src)])
            objs.append(obj)
        tmp_elf = tmpdir / elf.name
        placed = [] if link_address is None else [f"-Ttext={link_address:#x}"]
        _run([LD, "-m", "elf_i386", "-T", str(RUNTIME / "link.ld"), *placed,
              "-z", "noexecstack", "-o", str(tmp_elf), *objs])
        os.replace(tmp_elf, elf)
    return elf
