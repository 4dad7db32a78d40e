"""Bad input that used to crash a build, exhaust memory or pass silently (issue 10, items 1-7, 11, 13):
each is now a bad item naming its file, or a listed skip with ``skip_bad``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils
from test_embedcache_support import REPO, build, coco_reader, metadata, write_pair

from embedcache import open_cache
from embedcache.prepare import BadDataError
from embedcache.readers import FolderReader

_LIMITED = """
import os, resource, sys
from pathlib import Path
from test_embedcache_support import metadata
from embedcache.prepare import BadDataError
from embedcache.readers import CocoReader, FolderReader
vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
limit = vm + (2 << 30)  # what the interpreter and torch already map, plus 2 GiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
root = Path(sys.argv[1])
reader = CocoReader(root, root / "ann.json") if (root / "ann.json").exists() else FolderReader(root)
try:
    metadata(reader)
except BadDataError as e:
    print(e)
"""


def _metadata_within_2gib(root) -> str:
    """The bad-item list of a metadata pass over ``root``, run in a child process that may use at most 2 GiB
    more than an idle interpreter: a regression fails this test instead of exhausting the machine."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    r = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout


def _ann(segmentation, category_id=1, ann_id=1):
    return {"id": ann_id, "image_id": 5, "category_id": category_id, "segmentation": segmentation}


# ---- item 1: a polygon with NaN (pycocotools rasterised it into 13.7 GB) ----


@pytest.mark.parametrize(
    "poly",
    [[2, 2, float("nan"), 2, 12, 12], [2, 2, 1e12, 2, 12, 12], [2, 2, 12, 2, 12], [2, 2, "x", 2, 12, 12]],
    ids=["nan", "huge", "odd-length", "string"],
)
def test_coco_polygon_with_nan_or_huge_coordinates_is_bad_input(tmp_path, poly):
    coco_reader(tmp_path, [_ann([poly])])
    out = _metadata_within_2gib(tmp_path)
    assert "annotation 1: bad segmentation (polygon" in out, out


# ---- item 2: a pixel budget, checked from the header before decoding ----


def test_huge_tiff_is_refused_from_its_header_naming_size(tmp_path):
    """20000x20000 uint8, zlib-tiled: 0.5 MB on disk, 400 MB decoded, 12.8 GB through the old metadata
    pass."""
    write_pair(tmp_path, "good", np.zeros((20, 20, 3), np.uint8), np.eye(20, dtype=np.uint8))
    tile = np.zeros((1024, 1024), np.uint8)
    for sub in ("images", "masks"):
        tiles = (tile for _ in range(20 * 20))  # 20 x 20 tiles of 1024 cover 20000 x 20000
        opts = dict(shape=(20000, 20000), dtype=np.uint8, tile=(1024, 1024), compression="zlib")
        tifffile.imwrite(tmp_path / sub / "huge.tif", tiles, **opts)
    out = _metadata_within_2gib(tmp_path)
    assert "20000x20000 pixels (400.0 MP) exceeds the pixel budget of 64.0 MP" in out, out


def test_pixel_budget_is_configurable_and_names_the_file(tmp_path):
    write_pair(tmp_path, "small", np.zeros((20, 20, 3), np.uint8), np.eye(20, dtype=np.uint8))
    write_pair(tmp_path, "big", np.zeros((30, 40, 3), np.uint8), np.eye(30, 40, dtype=np.uint8))
    with pytest.raises(BadDataError, match=r"big\.png: 40x30 pixels .* exceeds the pixel budget"):
        metadata(FolderReader(tmp_path), max_pixels=1000)
    meta, skipped = metadata(FolderReader(tmp_path), skip_bad=True, max_pixels=1000)
    assert meta["image_id"].tolist() == ["small"] and skipped[0]["path"].endswith("big.png")
    meta, _ = metadata(FolderReader(tmp_path), max_pixels=1200)  # 40 * 30 is within it
    assert meta["image_id"].tolist() == ["big", "small"]


# ---- item 3: 1x4000 and 4000x1 images (the encoder got a 0-pixel side) ----


@pytest.mark.parametrize("hw", [(1, 4000), (4000, 1)], ids=["1x4000", "4000x1"])
def test_too_thin_image_is_bad_input_and_skippable(tmp_path, hw):
    data = tmp_path / "d"
    write_pair(data, "good", np.zeros((20, 20, 3), np.uint8), np.eye(20, dtype=np.uint8))
    thin = np.ones(hw, np.uint8)
    write_pair(data, "thin", np.zeros((*hw, 3), np.uint8), thin)
    with pytest.raises(BadDataError, match=r"thin\.png: .* too thin to encode"):
        build(data, tmp_path / "c.zarr")
    report = build(data, tmp_path / "c.zarr", skip_bad=True)  # the failed build left nothing in the way
    assert report["num_images"] == 1 and report["skipped"][0]["path"].endswith("thin.png")


# ---- items 4-6: RLE whose counts do not cover H*W, truncated RLE, unknown categories ----


def _square_rle():
    square = np.zeros((30, 40), np.uint8, order="F")
    square[5:25, 10:30] = 1  # 400 pixels
    rle = mask_utils.encode(np.asfortranarray(square))
    return rle["counts"].decode()


@pytest.mark.parametrize(
    "segmentation, reason",
    [
        ({"size": [30, 40], "counts": [100, 50]}, "sum to 150, not H\\*W = 30\\*40 = 1200"),
        ({"size": [30, 40], "counts": [1300, -100]}, "negative run length"),
        ({"size": [30, 40], "counts": [600.5, 599.5]}, "must be integers"),
        ({"size": [30, 40], "counts": _square_rle()[:-2]}, "sum to|truncated"),
        ({"size": [30, 40], "counts": _square_rle()[:3]}, "sum to|truncated"),
        ({"size": [30, 40], "counts": _square_rle() + "~"}, "outside its alphabet"),
        ({"size": [30, 41], "counts": [1230]}, "RLE size"),
    ],
    ids=["uncompressed-short", "negative", "float-counts", "truncated", "truncated-3", "bad-byte", "size"],
)
def test_rle_not_covering_the_image_is_bad_input(tmp_path, segmentation, reason):
    coco_reader(tmp_path, [_ann(segmentation)])
    with pytest.raises(BadDataError, match=rf"a\.png: annotation 1: bad segmentation .*({reason})"):
        metadata(coco_reader(tmp_path, [_ann(segmentation)]))


def test_whole_compressed_rle_is_still_read_exactly(tmp_path):
    meta, _ = metadata(coco_reader(tmp_path, [_ann({"size": [30, 40], "counts": _square_rle()})]))
    assert meta["objects/area"].tolist() == [400]


@pytest.mark.parametrize("category_id", [99, 0])
def test_category_missing_from_categories_is_bad_input(tmp_path, category_id):
    reader = coco_reader(tmp_path, [_ann([[2, 2, 12, 2, 12, 12]], category_id)], categories=[{"id": 1}])
    with pytest.raises(BadDataError, match=rf"a\.png: .*ann\.json: annotation 1: category_id {category_id} "):
        metadata(reader)


# ---- item 7: negative labels in an instance mask ----


@pytest.mark.parametrize("kind", ["instance", "binary", "semantic"])
def test_negative_mask_labels_are_bad_input(tmp_path, kind):
    m = np.zeros((20, 20), np.int16)
    m[:] = -1
    m[5:10, 5:10] = 1
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "neg.png")
    tifffile.imwrite(tmp_path / "masks" / "neg.tif", m)
    with pytest.raises(BadDataError, match=r"neg\.tif: mask holds negative labels \(min -1\)"):
        metadata(FolderReader(tmp_path, mask_kind=kind))


def test_negative_ignore_index_is_still_allowed(tmp_path):
    m = np.full((20, 20), -1, np.int16)
    m[5:10, 5:10] = 2
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "neg.png")
    tifffile.imwrite(tmp_path / "masks" / "neg.tif", m)
    meta, _ = metadata(FolderReader(tmp_path, mask_kind="semantic", ignore_index=-1))
    assert meta["objects/class_id"].tolist() == [2] and meta["objects/area"].tolist() == [25]


# ---- item 11: file names that are not UTF-8 ----


def test_non_utf8_file_names_are_named_and_skippable(tmp_path):
    data = tmp_path / "d"
    write_pair(data, "good", np.zeros((20, 20, 3), np.uint8), np.eye(20, dtype=np.uint8))
    for sub in ("images", "masks"):
        os.link(data / sub / "good.png", os.fsencode(data / sub) + b"/caf\xe9.png")
    with pytest.raises(BadDataError, match=r"caf\\xe9\.png: file name is not valid UTF-8"):
        build(data, tmp_path / "c.zarr")
    report = build(data, tmp_path / "c.zarr", skip_bad=True)
    assert report["num_images"] == 1 and len(report["skipped"]) == 2
    assert all(s["path"].endswith("caf\\xe9.png") for s in report["skipped"])
    assert open_cache(tmp_path / "c.zarr").image_id.tolist() == ["good"]


# ---- item 13: COCO entries with missing keys, and annotations of images that do not exist ----


def test_coco_missing_keys_and_orphan_annotations_are_named(tmp_path):
    images = [
        {"id": 5, "file_name": "imgs/a.png", "height": 30, "width": 40},
        {"id": 6, "file_name": "imgs/b.png", "width": 40},  # no height
    ]
    anns = [
        {"id": 1, "image_id": 5, "segmentation": [[2, 2, 12, 2, 12, 12]]},  # no category_id
        {"id": 2, "image_id": 77, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12]]},  # no such image
        {"id": 3, "image_id": 5, "category_id": 1},  # no segmentation
    ]
    reader = coco_reader(tmp_path, anns, images, categories=[{"id": 1}])
    with pytest.raises(BadDataError) as e:
        metadata(reader)
    msg = str(e.value)
    assert "ann.json: images[1]: no height" in msg
    assert "ann.json: annotation 2 refers to image_id 77, which is not in images" in msg
    assert "ann.json: annotation 3: no segmentation" in msg
    assert "a.png: " in msg and "annotation 1: no category_id" in msg
    with pytest.raises(BadDataError, match="4 bad input"):  # every image is bad: nothing left to build
        metadata(reader, skip_bad=True)
