# SPDX-License-Identifier: BSD-2-Clause
"""NVMe controller (bhyve's ``nvme``) on the shared block back ends."""
