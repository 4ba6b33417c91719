# SPDX-License-Identifier: BSD-2-Clause
"""What a snapshot records of each disk, and the check a restore makes.

At a save the front end drains its requests and calls :func:`record_image`: the image is
flushed (``fdatasync``) and its path and :class:`~hvf.plugins.block.image.ImageIdentity`
go into the device's state. At a restore :func:`check_restored_image` compares:

- the same path as recorded: the same file, size and modification time, or the restore
  is refused (the guest's view of the disk and the image would disagree);
- another path (``-r SNAP -o pci.B.S.F.path=COPY``, a copy the user vouches for): the
  size must match.

Snapshots whose devices recorded no image (``None``) restore with a warning.
"""

from __future__ import annotations

import logging
import os

import attrs

from hvf.errors import ImageError
from hvf.plugins.block.image import Image, ImageIdentity
from hvf.snapshot_api import Fields, check_fields, field_int

log = logging.getLogger(__name__)

_IDENTITY = ("device", "inode", "rdev", "size", "mtime_ns")


@attrs.frozen
class ImageRecord:
    """An image as a snapshot saw it."""

    path: str
    identity: ImageIdentity

    def to_fields(self) -> Fields:
        return {"path": self.path, **attrs.asdict(self.identity)}

    @classmethod
    def from_fields(cls, fields: object) -> ImageRecord | None:
        """Rebuild from :meth:`to_fields` (or None); ``ValueError`` names a bad field."""
        if fields is None:
            return None
        if not isinstance(fields, dict):
            raise ValueError("saved field 'image' is not a mapping")
        check_fields(fields, ("path", *_IDENTITY))
        path = fields["path"]
        if not isinstance(path, str) or not path:
            raise ValueError("saved field 'image.path' is not a path")
        return cls(path, ImageIdentity(*(field_int(fields, name, 64) for name in _IDENTITY)))


def record_image(image: Image) -> ImageRecord:
    """Flush ``image`` and record it (its requests must be finished)."""
    os.fdatasync(image.fd)
    return ImageRecord(image.path, image.identity())


def check_restored_image(image: Image, record: ImageRecord | None, where: str,
                         path_key: str) -> None:
    """Refuse ``image`` for a restore unless it is the image the snapshot recorded
    (``path_key``: the configuration key that names the image, for the message)."""
    if record is None:
        log.warning("%s: the snapshot does not record its disk image; %s is not checked",
                    where, image.path)
        return
    now = image.identity()
    if os.path.realpath(image.path) != os.path.realpath(record.path):
        if now.size != record.identity.size:
            raise ImageError(f"{where}: {image.path} is {now.size} bytes but the snapshot's "
                             f"disk ({record.path}) was {record.identity.size}")
        return
    differences = now.differences(record.identity)
    if differences:
        raise ImageError(f"{where}: {image.path} changed since the snapshot "
                         f"({'; '.join(differences)}); restoring would show the guest a disk "
                         "it did not write. Restore with the image as it was, or give a copy "
                         f"of it with -o {path_key}=COPY")
