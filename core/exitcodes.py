# SPDX-License-Identifier: BSD-2-Clause
"""hvf's exit statuses, as bhyve's (bhyve(8), EXIT STATUS)."""

REBOOT = 0
POWEROFF = 1
HALT = 2
TRIPLE_FAULT = 3
ERROR = 4
#: Command-line usage error (sysexits' EX_USAGE).
USAGE = 64
