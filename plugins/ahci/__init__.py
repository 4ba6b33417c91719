# SPDX-License-Identifier: BSD-2-Clause
"""AHCI host bus adapter with ATA disks and ATAPI CD-ROMs (bhyve's ``ahci``, ``ahci-hd``, ``ahci-cd``)."""
