# SPDX-License-Identifier: BSD-2-Clause
"""``python timed_hvf.py ARGS`` runs ``hvf ARGS`` exactly as ``python -m hvf ARGS`` does,
and writes timestamps (``time.monotonic()``, CLOCK_MONOTONIC, so comparable with the
parent's) as JSON to ``$HVF_BENCH_MARKS``:

- ``exec``: this script's first line (the interpreter has started);
- ``imported``: hvf's command-line module is imported;
- ``restore_start`` / ``restore_end``: around ``hvf.cli._restored_machine`` (load and
  check the snapshot, map its RAM, build the machine, load every chunk);
- ``vcpus_started``: the last vCPU thread has been started (the VM runs);
- ``t_load_state``, ``t_open_ram``, ``t_machine_init``, ``t_build``, ``t_restore_chunks``:
  seconds spent in the steps of the restore (reading and checking the snapshot, opening
  its RAM file, creating the KVM VM with that file mapped as its RAM and the vCPUs,
  building the devices, loading the chunks).

It wraps a few functions at run time and changes nothing else in hvf.
"""

import time

EXEC = time.monotonic()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from hvf import cli  # noqa: E402
from hvf.vcpu import Vcpu  # noqa: E402

marks = {"exec": EXEC, "imported": time.monotonic()}
_path = os.environ.get("HVF_BENCH_MARKS")


def _write() -> None:
    if _path:
        tmp = f"{_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(marks, f)
        os.replace(tmp, _path)


_restored_machine = cli._restored_machine


def _timed_restore(*args, **kwargs):  # type: ignore[no-untyped-def]
    marks["restore_start"] = time.monotonic()
    vm = _restored_machine(*args, **kwargs)
    marks["restore_end"] = time.monotonic()
    marks["vcpus"] = len(vm.vcpus)
    _started.clear()
    return vm


_start = Vcpu.start
_started: list[int] = []


def _timed_start(self):  # type: ignore[no-untyped-def]
    _start(self)
    _started.append(self.index)
    if len(_started) == marks.get("vcpus", 1):
        marks["vcpus_started"] = time.monotonic()
        _write()


def _timed(owner: object, attr: str, key: str) -> None:
    """Add the seconds spent in ``owner.attr`` to ``marks[key]``."""
    inner = getattr(owner, attr)

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        try:
            return inner(*args, **kwargs)
        finally:
            marks[key] = marks.get(key, 0.0) + time.monotonic() - t0

    setattr(owner, attr, wrapper)


cli._restored_machine = _timed_restore
Vcpu.start = _timed_start
# where the restore's time goes (each is called from _restored_machine by attribute)
from hvf import snapshot  # noqa: E402
from hvf.plugins.snapshot import ramfile, store  # noqa: E402
from hvf.vm import Machine  # noqa: E402

_timed(store.SnapshotStore, "load", "t_load_state")
_timed(ramfile, "open_ram", "t_open_ram")
_timed(Machine, "__init__", "t_machine_init")
_timed(Machine, "build", "t_build")
_timed(snapshot, "restore", "t_restore_chunks")

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
