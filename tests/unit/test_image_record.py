# SPDX-License-Identifier: BSD-2-Clause
"""The image record a snapshot keeps of each disk, and the restore's check of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hvf.errors import ImageError
from hvf.plugins.block.image import open_image
from hvf.plugins.block.record import ImageRecord, check_restored_image, record_image
from hvf.plugins.virtio.blk_state import record_nothing

from hypothesis import given
from hypothesis import strategies as st


def image(path: Path, size: int = 1 << 20):  # type: ignore[no-untyped-def]
    with path.open("wb") as f:
        f.truncate(size)
    return open_image(path)


def test_a_record_round_trips_and_the_same_image_passes(tmp_path: Path) -> None:
    img = image(tmp_path / "a.img")
    record = record_image(img)
    assert ImageRecord.from_fields(record.to_fields()) == record
    check_restored_image(img, record, "disk", "pci.0.3.0.path")
    img.close()


def test_a_written_image_is_refused_by_the_same_path(tmp_path: Path) -> None:
    img = image(tmp_path / "a.img")
    record = record_image(img)
    img.close()
    (tmp_path / "a.img").write_bytes(bytes(1 << 20))  # same size, rewritten
    again = open_image(tmp_path / "a.img")
    with pytest.raises(ImageError, match="changed since the snapshot .*it is another file|"
                                         "changed since the snapshot .*modified"):
        check_restored_image(again, record, "disk", "pci.0.3.0.path")
    again.close()


def test_another_path_is_checked_for_size_only(tmp_path: Path) -> None:
    img = image(tmp_path / "a.img")
    record = record_image(img)
    other = image(tmp_path / "b.img")
    check_restored_image(other, record, "disk", "pci.0.3.0.path")
    small = image(tmp_path / "c.img", 1 << 19)
    with pytest.raises(ImageError, match="is 524288 bytes but the snapshot's disk"):
        check_restored_image(small, record, "disk", "pci.0.3.0.path")
    for i in (img, other, small):
        i.close()


def test_version_1_virtio_blk_state_upgrades_to_no_record() -> None:
    assert record_nothing({"device": {}, "pci": {}})["device"] == {"image": None}
    with pytest.raises(ValueError, match="'device'"):
        record_nothing({"pci": {}})


@given(st.dictionaries(st.sampled_from(["path", "device", "inode", "rdev", "size",
                                        "mtime_ns", "other"]),
                       st.one_of(st.integers(-2, 1 << 65), st.text(max_size=4), st.none())))
def test_saved_records_are_validated(fields: dict[str, object]) -> None:
    try:
        ImageRecord.from_fields(fields)
    except ValueError:
        pass
