# SPDX-License-Identifier: BSD-2-Clause
"""``python -m hvf``: the same as the ``hvf`` command (with the garbage collector off
from the first import: see :func:`hvf.cli.console_main`)."""

import gc

gc.disable()

from hvf.cli import console_main  # noqa: E402

console_main()
