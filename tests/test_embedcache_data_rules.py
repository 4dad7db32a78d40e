"""Dataset rules of issue 18 (items 1, 2, 4, 5, 6, 9): every path stays inside the data folder and is a
regular file, the channel-to-RGB rule is explicit, objects below a minimum area or vanishing at the input
size are counted, damaged masks are reported, and COCO flags are integers. Each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
from test_embedcache_support import build, coco_reader, metadata, metadata_report, write_pair

from embedcache.cli import main
from embedcache.prepare import BadDataError
from embedcache.readers import FolderReader
from embedcache.verify import verify

SQUARE = [[2, 2, 12, 2, 12, 12, 2, 12]]


def _grey(hw) -> np.ndarray:
    return np.zeros((*hw, 3), np.uint8)


# ---- item 5: objects that vanish at the model's input size ----


def _strip_mask() -> np.ndarray:
    """3000x3000 with object 1: a 2-row strip (rows 2-3) that the 1024 input never samples (it takes rows
    1, 4, 7, ...), so it vanishes; and object 2: a 40x40 square that survives."""
    m = np.zeros((3000, 3000), np.uint8)
    m[2:4, 100:200] = 1
    m[500:540, 500:540] = 2
    return m


def test_vanishing_objects_are_counted_and_the_cache_verifies(tmp_path):
    write_pair(tmp_path / "d", "big", _grey((3000, 3000)), _strip_mask())
    report = build(tmp_path / "d", tmp_path / "c.zarr", val_fraction=0.0)
    assert report["num_objects"] == 2
    assert report["objects_vanished"]["count"] == 1
    assert report["objects_vanished"]["images"][0]["path"].endswith("big.png")
    assert verify(tmp_path / "c.zarr") == []


def test_a_build_where_every_object_vanishes_fails_naming_it(tmp_path, capsys):
    """Before: exit 0 and a cache that verify called corrupt (its empty input-mask array has no chunk)."""
    m = _strip_mask()
    m[m == 2] = 0
    write_pair(tmp_path / "d", "big", _grey((3000, 3000)), m)
    out = tmp_path / "c.zarr"
    args = [
        "build",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(out),
        "--model",
        "vit_tiny",
        "--device",
        "cpu",
    ]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "all 1 object(s) vanish at vit_tiny's input size (the largest has 200 pixels" in err, err
    assert not out.exists()


# ---- item 6: a minimum object area, and masks whose values are not clean ----


def _jpeg_like_mask() -> np.ndarray:
    """Two 20x20 squares of 255 with grey edges (values 250, 3) and six specks of 1-4 pixels around them, as
    a binary mask saved as JPEG and back as PNG looks."""
    m = np.zeros((60, 80), np.uint8)
    m[5:25, 5:25] = 255
    m[30:50, 40:60] = 255
    m[5:25, 25] = 250
    for y, x, size in [(2, 40, 1), (10, 70, 2), (55, 5, 1), (40, 10, 2), (28, 30, 1), (56, 75, 2)]:
        m[y : y + size, x : x + size] = 3
    return m


def test_small_objects_are_dropped_and_unclean_masks_reported(tmp_path):
    write_pair(tmp_path, "jpeg", _grey((60, 80)), _jpeg_like_mask())
    meta, report = metadata_report(FolderReader(tmp_path, mask_kind="binary"))
    assert sorted(meta["objects/area"].tolist()) == [400, 420]  # the two squares, not eight "instances"
    assert report["min_object_area"] == 10
    assert report["objects_below_min_area"]["count"] == 6
    assert report["objects_below_min_area"]["images"][0]["path"].endswith("masks/jpeg.png")
    (unclean,) = report["unclean_masks"]
    assert unclean["path"].endswith("jpeg.png") and "3 foreground values (3, 250, 255)" in unclean["reason"]
    meta, report = metadata_report(FolderReader(tmp_path, mask_kind="binary"), min_object_area=1)
    assert len(meta["objects/area"]) == 8 and report["objects_below_min_area"]["count"] == 0


def test_clean_binary_masks_are_not_reported(tmp_path):
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:10] = 1
    write_pair(tmp_path, "clean", _grey((20, 20)), m)
    _, report = metadata_report(FolderReader(tmp_path, mask_kind="binary"))
    assert report["unclean_masks"] == [] and report["objects_below_min_area"]["count"] == 0


def test_an_image_whose_objects_are_all_below_the_minimum_is_bad_input(tmp_path):
    m = np.zeros((20, 20), np.uint8)
    m[5:8, 5:8] = 1
    write_pair(tmp_path, "tiny", _grey((20, 20)), m)
    with pytest.raises(
        BadDataError, match=r"tiny\.png: all 1 object\(s\) are below --min-object-area 10 pixels"
    ):
        metadata(FolderReader(tmp_path))


def test_the_build_prints_its_warnings(tmp_path, capsys):
    write_pair(tmp_path / "d", "jpeg", _grey((60, 80)), _jpeg_like_mask())
    args = ["build", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "c.zarr"), "--model", "vit_tiny"]
    assert main([*args, "--mask-kind", "binary", "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: 6 object(s) below --min-object-area 10 pixels left out in 1 image(s)" in err
    assert "warning: " in err and "jpeg.png: binary mask holds 3 foreground values" in err


# ---- item 9: COCO iscrowd must be the integer 0 or 1 ----


@pytest.mark.parametrize("flag", ["no", True, 1.0, 2, None], ids=["no", "true", "1.0", "2", "null"])
def test_a_non_integer_iscrowd_is_refused_naming_the_annotation(tmp_path, flag):
    ann = {"id": 7, "image_id": 5, "category_id": 1, "segmentation": SQUARE, "iscrowd": flag}
    with pytest.raises(BadDataError, match=rf"a\.png: .*annotation 7: iscrowd {flag!r} is not the integer 0"):
        metadata(coco_reader(tmp_path, [ann]))


def test_integer_iscrowd_still_works(tmp_path):
    anns = [
        {"id": 1, "image_id": 5, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 1, "segmentation": SQUARE, "iscrowd": 1},
        {"id": 3, "image_id": 5, "category_id": 1, "segmentation": SQUARE},
    ]
    reader = coco_reader(tmp_path, anns)
    meta, _ = metadata(reader)
    assert len(meta["objects/area"]) == 2 and reader.crowd_skipped == 1
