# SPDX-License-Identifier: BSD-2-Clause
"""hvf's exit statuses, as bhyve's (bhyve(8), EXIT STATUS).

Which errors exit with which status, as bhyve sorts them:

- :data:`USAGE` (64, sysexits' EX_USAGE; :class:`~hvf.errors.UsageError`): the command
  line does not parse. An unknown option or a missing option argument, more than one VM
  name or none, an option value of the wrong form where bhyve's option loop checks it:
  ``-c`` (not a count or ``key=n`` list), ``-m`` (not a size), ``-o`` (no ``=`` or no
  value), ``-p`` (not ``vcpu:hostcpu``), ``-l`` (no such LPC device). bhyve exits 1
  for an unknown option; hvf keeps 64 for every one of these.
- :data:`ERROR` (4, :class:`~hvf.errors.ConfigError` and every other
  :class:`~hvf.errors.HvfError`): the command line parses, but names a configuration
  hvf cannot run. Everything about ``-s`` (bhyve exits 4 from ``pci_parse_slot``), an
  LPC device refusing its options (bhyve's ``bootrom`` and ``tpm``), ``-k`` files,
  values out of range (vCPUs, topology, memory, host CPUs for ``-p``, a UUID, a VM name
  too long for its socket: :mod:`hvf.preflight`), options hvf does not implement,
  unknown variables with ``config.strict=true``, devices, back ends, kernels and
  KVM failing while the machine is built.

Each message names the option or variable, the value and what would be allowed.
"""

REBOOT = 0
POWEROFF = 1
HALT = 2
TRIPLE_FAULT = 3
#: A configuration hvf cannot run, or a failure while building or running the VM.
ERROR = 4
#: Command-line usage error (sysexits' EX_USAGE).
USAGE = 64
