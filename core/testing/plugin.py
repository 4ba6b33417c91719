# SPDX-License-Identifier: BSD-2-Clause
"""The ``hvf`` pytest plugin (the ``pytest11`` entry point): fixtures for testing hvf
devices, and the ``kvm`` marker.

* ``@pytest.mark.kvm``: the test needs a usable ``/dev/kvm``; it is skipped, with the
  reason, where there is none.
* :func:`hvf_guest`: build a test guest from assembler or C source at test time.
* :func:`hvf_run`: run ``python -m hvf`` with a command line, or boot a guest.
* :func:`hvf_machine`: build an in-process :class:`hvf.vm.Machine`, to drive its
  devices' registers from the host side (:mod:`hvf.testing.fakes` has the accessors).
* :func:`hvf_runtime_dir`: a private control-socket directory (the other fixtures
  use it).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from hvf.kvm import kvm_unavailable_reason
from hvf.testing.guests import build_guest
from hvf.testing.process import run_guest, run_hvf

if TYPE_CHECKING:
    from hvf.vm import Machine

#: The guest of a machine given no kernel: ``main`` returns 0, so it exits at once.
EXIT_GUEST = """\
	.include "guest.inc"
	.text
	.globl	main
main:
	xorl	%eax, %eax
	ret
"""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kvm: needs a usable /dev/kvm (skipped with the reason where it is absent)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hvf_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private control-socket directory, ``HVF_RUNTIME_DIR`` for the session, so test
    VMs never meet other VMs' sockets (hvf's own suite uses it for every test)."""
    path = tmp_path_factory.mktemp("hvf-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HVF_RUNTIME_DIR", str(path))
        yield path


class GuestBuilder:
    """Builds test guests (:func:`hvf.testing.guests.build_guest`) under ``out``, one
    directory per distinct source, so a guest is built once per session."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, source: str | os.PathLike[str], *, name: str = "guest",
                 suffix: str = ".S", depends: Iterable[Path] = ()) -> Path:
        """The ``.elf`` of the guest ``source``: its text (a ``str``, written to
        ``NAME`` + ``suffix``, ``.S`` or ``.c``) or its file (a path, built where it
        lies, so that its own includes are found; ``depends`` lists them). The program
        defines ``main`` and may include ``guest.inc``, ``libc.h`` and ``virtio.h``."""
        if not isinstance(source, str):
            path = Path(source).resolve()
            return build_guest(path, self._dir(str(path)), depends=depends)
        out = self._dir(f"{name}{suffix}\0{source}")
        path = out / f"{name}{suffix}"
        if not path.exists():  # the directory is named after the source's hash
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(source)
        return build_guest(path, out, depends=depends)

    def _dir(self, key: str) -> Path:
        return self.out / hashlib.sha256(key.encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def hvf_guest(tmp_path_factory: pytest.TempPathFactory) -> GuestBuilder:
    """``hvf_guest(source, *, name="guest", suffix=".S", depends=()) -> Path``: build a
    multiboot test guest from GNU assembler (or freestanding C) source, given as text
    or as a file, and return its ``.elf`` (see :class:`GuestBuilder`). Raises
    :class:`hvf.testing.guests.GuestBuildError` with the tool's output."""
    return GuestBuilder(tmp_path_factory.mktemp("hvf-guests"))


class HvfRunner:
    """Runs hvf to completion: :meth:`__call__` with a whole command line,
    :meth:`guest` to boot a kernel on :data:`hvf.testing.BASE_ARGS`."""

    def __call__(self, args: Sequence[str | os.PathLike[str]], *, timeout: float = 120,
                 env: dict[str, str] | None = None,
                 input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """``python -m hvf ARGS``: ``returncode`` is hvf's exit status (bhyve's), with
        ``stdout`` and ``stderr`` as text (:func:`hvf.testing.run_hvf`)."""
        return run_hvf(args, timeout=timeout, env=env, input=input)

    def guest(self, kernel: os.PathLike[str] | str, *extra: str, append: str | None = None,
              timeout: float = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Boot ``kernel`` with ``extra`` options (``-s 3,mydev``): its debug console
        (port 0x402) is ``stdout``; a guest whose ``main`` returns v exits with
        ``(v << 1) | 1`` (:func:`hvf.testing.run_guest`)."""
        return run_guest(kernel, *extra, append=append, timeout=timeout, env=env)


@pytest.fixture
def hvf_run(hvf_runtime_dir: Path) -> HvfRunner:
    """``hvf_run(args, *, timeout=120, env=None, input=None)`` and
    ``hvf_run.guest(kernel, *extra, append=None, timeout=120, env=None)``: run hvf in a
    subprocess and return its :class:`subprocess.CompletedProcess` (see
    :class:`HvfRunner`)."""
    return HvfRunner()


class MachineFactory(Protocol):
    """The :func:`hvf_machine` fixture."""

    def __call__(self, args: Sequence[str | os.PathLike[str]] = (),
                 config: Mapping[str, object] | None = None) -> Machine: ...


def _flatten(tree: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)


@pytest.fixture
def hvf_machine(hvf_runtime_dir: Path,
                hvf_guest: GuestBuilder) -> Iterator[MachineFactory]:
    """``hvf_machine(args=(), config=None) -> Machine``: a machine built in this process
    (not running) from the command line ``args`` (without ``vmname``) and then the
    configuration tree ``config`` (dotted keys or nested mappings, as ``-o``), as
    ``hvf`` builds it: every plugin installed takes part. With no kernel or boot ROM
    it gets a guest that exits at once. Closed at teardown; skips the test where
    ``/dev/kvm`` is unusable."""
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs KVM: {reason}")
    from hvf.cli import parse_args
    from hvf.pluginmanager import Plugins
    from hvf.vm import Machine

    machines: list[Machine] = []

    def build(args: Sequence[str | os.PathLike[str]] = (),
              config: Mapping[str, object] | None = None) -> Machine:
        plugins = Plugins()
        tree = parse_args([str(a) for a in args], plugins)
        for key, value in _flatten(config or {}):
            tree.set(key, value)
        if not tree.get("name"):
            tree.set("name", f"machine{len(machines)}")
        if not tree.get("boot.kernel") and not tree.get("lpc.bootrom"):
            tree.set("boot.kernel", str(hvf_guest(EXIT_GUEST, name="exit")))
        vm = Machine(tree, plugins)
        machines.append(vm)
        vm.build()
        return vm

    yield build
    for vm in reversed(machines):
        vm.close()
