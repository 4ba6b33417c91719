# SPDX-License-Identifier: BSD-2-Clause
"""Keeping hvf's log out of a guest's console on the same terminal.

The rule: when a guest console writes to standard output (a ``stdio`` backend, or
the debug console's default) and standard error is the same terminal, hvf's log
lines ("unhandled port", a device's complaint about its driver...) would land in the
middle of the guest's output. While the machine exists they go to ``NAME.log`` in the
runtime directory instead (created afresh, mode 0600), and hvf says so once; errors
still reach the terminal too. Otherwise the log stays on standard error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from hvf.config import Config
from hvf.control import runtime_dir

log = logging.getLogger("hvf")

#: The configuration value of a console backend on this process's terminal.
STDIO = "stdio"
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def console_shares_stderr(config: Config) -> bool:
    """Whether a guest console writes to stdout and stdout is stderr's terminal."""
    if not any(value == STDIO for _key, value in config.items()):
        return False
    try:
        return (os.isatty(1) and os.isatty(2)
                and os.fstat(1).st_rdev == os.fstat(2).st_rdev)
    except OSError:
        return False


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def divert(config: Config, name: str) -> Callable[[], None] | None:
    """Send the log to ``NAME.log`` if :func:`console_shares_stderr`; returns what
    puts it back (None when nothing was changed)."""
    if not console_shares_stderr(config):
        return None
    path = runtime_dir() / f"{name}.log"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        log.warning("the log stays on this terminal: cannot write %s: %s", path, e.strerror)
        return None
    log.warning("log messages go to %s while the guest's console is on this terminal", path)
    return _install(fd)


def _install(fd: int) -> Callable[[], None]:
    root = logging.getLogger()
    to_file = logging.StreamHandler(open(fd, "w", encoding="utf-8", errors="replace"))
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    on_terminal = [h for h in root.handlers
                   if isinstance(h, logging.StreamHandler) and _is_stderr(h)]
    for handler in on_terminal:
        handler.addFilter(_errors_only)
    root.addHandler(to_file)

    def restore() -> None:
        root.removeHandler(to_file)
        to_file.close()
        to_file.stream.close()
        for handler in on_terminal:
            handler.removeFilter(_errors_only)

    return restore


def _is_stderr(handler: logging.StreamHandler) -> bool:  # type: ignore[type-arg]
    try:
        return bool(handler.stream.fileno() == 2)
    except (OSError, ValueError, AttributeError):
        return False
