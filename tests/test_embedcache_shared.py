"""The shared real datasets through the readers (metadata pass only; the encoder is covered elsewhere)."""

from __future__ import annotations

import numpy as np

from embedcache.prepare import collect_metadata
from embedcache.presets import PRESETS
from embedcache.readers import FolderReader


def _meta(root, kind):
    reader = FolderReader(root, mask_kind=kind)
    scan = reader.scan()
    assert not scan.bad
    meta, report = collect_metadata(
        reader,
        scan.records,
        scan_bad=[],
        skip_bad=False,
        val_fraction=0.2,
        seed=0,
        workers=2,
        preset=PRESETS["vit_tiny"],
    )
    assert not report["skipped"]
    return meta, report


def test_isbi2012_instances(shared_data):
    meta, report = _meta(shared_data / "isbi2012", "instance")
    assert len(meta["image_id"]) == 30 and (meta["original_size"] == 512).all()
    assert len(meta["objects/area"]) == 3332  # the README's count of derived instances
    assert meta["objects/area"].min() >= 20  # fragments < 20 px were dropped when the masks were derived
    assert (meta["input_size"] == 1024).all() and (meta["split"] == "val").sum() == 6
    assert report["objects_below_min_area"]["count"] == 0  # the default minimum (10) keeps every cell


def test_kvasir5_binary_components(shared_data):
    meta, report = _meta(shared_data / "kvasir5", "binary")
    assert len(meta["image_id"]) == 5
    per_image = np.bincount(meta["objects/image_index"], minlength=5)
    i = meta["image_id"].tolist().index("cju0roawvklrq0799vmjorwfv")
    # 2 polyp regions; the 1-pixel speck the README notes is below the default minimum area and reported
    assert per_image[i] == 2 and per_image.sum() == 6
    assert report["objects_below_min_area"]["count"] == 1
    assert report["objects_below_min_area"]["images"][0]["path"].endswith("cju0roawvklrq0799vmjorwfv.png")
    assert report["unclean_masks"] == []  # kvasir5's masks are 0/255
