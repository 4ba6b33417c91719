# SPDX-License-Identifier: BSD-2-Clause
"""virtio-blk's saved state beyond the transport's, and its upgrade from version 1."""

from __future__ import annotations

import attrs

from hvf.plugins.block.record import ImageRecord
from hvf.snapshot_api import Fields, check_fields


@attrs.define
class BlkState:
    """The device's own saved state beyond the transport's (requests are drained before
    a save): the image as the snapshot saw it (None in snapshots of version 1)."""

    image: ImageRecord | None = None

    def to_fields(self) -> Fields:
        return {"image": None if self.image is None else self.image.to_fields()}

    @classmethod
    def from_fields(cls, fields: Fields) -> BlkState:
        """Rebuild; ``ValueError`` names a bad field."""
        check_fields(fields, ("image",))
        return cls(ImageRecord.from_fields(fields["image"]))


def record_nothing(fields: Fields) -> Fields:
    """Version 1 → 2: version 1 recorded no image."""
    device = fields.get("device")
    if not isinstance(device, dict):
        raise ValueError("saved field 'device' is not a mapping")
    return {**fields, "device": {**device, "image": None}}
