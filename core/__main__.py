# SPDX-License-Identifier: BSD-2-Clause
"""``python -m hvf``: the same as the ``hvf`` command."""

from hvf.cli import console_main

console_main()
