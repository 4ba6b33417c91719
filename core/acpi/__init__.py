# SPDX-License-Identifier: BSD-2-Clause
"""ACPI tables for the guest, built from what the core and each plugin describe.

:func:`build_for` gathers the parts (the core's vCPUs and I/O APIC, then every
plugin's ``hvf_acpi_tables``); the builder it returns installs the tables in guest RAM
for direct kernel boot or hands them to firmware through fw_cfg's table loader.
"""

from hvf.acpi.builder import AcpiBuilder, AcpiTables, build_for

__all__ = ["AcpiBuilder", "AcpiTables", "build_for"]
