# SPDX-License-Identifier: BSD-2-Clause
"""Numbers from the virtio 1.x specification that the transport and devices share."""

# Device status bits (§2.1).
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 0x40, 0x80

# Transport feature bits (§6).
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1

#: "No MSI-X vector" in config_msix_vector and queue_msix_vector.
NO_VECTOR = 0xFFFF

# Device types (§5).
TYPE_CONSOLE = 3
TYPE_RNG = 4
