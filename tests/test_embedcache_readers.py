"""Every reader and every bad-input case: a clear error naming the file, or with skip_bad a listed skip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from test_embedcache_support import build, read_png, tiny_dataset
from test_embedcache_support import coco_reader as _coco
from test_embedcache_support import metadata as _meta
from test_embedcache_support import write_pair as _write

from embedcache import open_cache
from embedcache.prepare import BadDataError
from embedcache.readers import FolderReader


def _objects(meta):
    """[(image, class, (H, W) bool mask)] rebuilt from the stored packed form."""
    from embedcache import masks as mk

    out = []
    off = meta["objects/mask_offset"]
    for j in range(len(meta["objects/image_index"])):
        i = meta["objects/image_index"][j]
        box = meta["objects/box"][j]
        crop = mk.unpack(meta["objects/mask_bits"][off[j] : off[j + 1]], box)
        out.append(
            (
                int(i),
                int(meta["objects/class_id"][j]),
                mk.crop_to_original(crop, box, meta["original_size"][i]),
            )
        )
    return out


def test_instance_masks_with_sparse_uint16_ids(tmp_path):
    labels = np.zeros((30, 40), np.uint16)
    labels[2:5, 3:9] = 7
    labels[10:20, 10:12] = 300
    labels[25, 39] = 65535
    _write(tmp_path, "a", np.zeros((30, 40, 3), np.uint8), labels, ".tif")
    meta, skipped = _meta(FolderReader(tmp_path, mask_kind="instance"), min_object_area=1)
    objs = _objects(meta)
    assert not skipped and len(objs) == 3
    for (_, cls, m), v in zip(objs, [7, 300, 65535]):
        assert cls == 1 and np.array_equal(m, labels == v)
    assert meta["objects/box"][0].tolist() == [3, 2, 9, 5]  # xyxy, x2/y2 exclusive
    assert meta["objects/area"].tolist() == [18, 20, 1]


def test_binary_masks_split_into_4_connected_components(tmp_path):
    m = np.zeros((20, 20), np.uint8)
    m[1:4, 1:4] = 255
    m[4, 4] = 255  # touches the square only diagonally: a separate object under 4-connectivity
    m[10:15, 2:18] = 255
    _write(tmp_path, "a", np.zeros((20, 20, 3), np.uint8), m)
    meta, _ = _meta(FolderReader(tmp_path, mask_kind="binary"), min_object_area=1)
    areas = sorted(int(a) for a in meta["objects/area"])
    assert areas == [1, 9, 80] and set(meta["objects/class_id"].tolist()) == {1}


def test_semantic_masks_keep_class_and_honour_ignore_index(tmp_path):
    m = np.zeros((20, 20), np.uint8)
    m[0:5, 0:5] = 2
    m[10:12, 10:12] = 2
    m[15:20, 0:20] = 1
    m[6:8, 6:8] = 255  # ignore
    _write(tmp_path, "a", np.zeros((20, 20, 3), np.uint8), m)
    meta, _ = _meta(FolderReader(tmp_path, mask_kind="semantic", ignore_index=255), min_object_area=1)
    objs = _objects(meta)
    assert [c for _, c, _ in objs] == [1, 2, 2]
    assert [int(o.sum()) for _, _, o in objs] == [100, 25, 4]
    meta, _ = _meta(FolderReader(tmp_path, mask_kind="semantic"), min_object_area=1)  # 255 is a class now
    assert 255 in meta["objects/class_id"].tolist()


def test_synthetic_instance_dataset_round_trips(tmp_path):
    data = tiny_dataset(tmp_path / "d", n_images=3)
    meta, _ = _meta(FolderReader(data))
    for i, _, m in _objects(meta):
        labels = read_png(data / "masks" / f"img{i:03d}.png")
        assert any(np.array_equal(m, labels == v) for v in np.unique(labels) if v)


def test_coco_polygons_and_rle(tmp_path):
    square = np.zeros((30, 40), np.uint8, order="F")
    square[5:10, 20:30] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode()
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = np.asfortranarray(square).ravel(order="F")
    change = np.flatnonzero(np.diff(np.r_[0, flat, 2 - flat[-1] if flat[-1] else 1]))  # run boundaries
    counts = np.diff(np.r_[0, change[change <= flat.size]]).tolist()
    if sum(counts) < flat.size:
        counts.append(flat.size - sum(counts))
    anns = [
        {
            "id": 1,
            "image_id": 5,
            "category_id": 3,
            "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
            "iscrowd": 0,
        },
        {"id": 2, "image_id": 5, "category_id": 4, "segmentation": compressed, "iscrowd": 0},
        {"id": 3, "image_id": 5, "category_id": 4, "segmentation": {"size": [30, 40], "counts": counts}},
        {"id": 4, "image_id": 5, "category_id": 9, "segmentation": compressed, "iscrowd": 1},
    ]
    reader = _coco(tmp_path, anns)
    meta, _ = _meta(reader)
    objs = _objects(meta)
    assert meta["image_id"].tolist() == ["5"]
    assert [c for _, c, _ in objs] == [3, 4, 4]  # the crowd region is not an object
    assert reader.crowd_skipped == 1
    poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[2, 2, 12, 2, 12, 12, 2, 12]], 30, 40)))
    assert np.array_equal(objs[0][2], poly.astype(bool))
    assert np.array_equal(objs[1][2], square.astype(bool)) and np.array_equal(objs[2][2], square.astype(bool))


# ---- bad input: each case fails naming the file, or is skipped and listed ----


def _good_and(tmp_path, make_bad):
    """A folder dataset with one good image plus what ``make_bad(root)`` adds; returns (root, bad name)."""
    img = np.zeros((20, 20, 3), np.uint8)
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:10] = 1
    _write(tmp_path, "good", img, m)
    return tmp_path, make_bad(tmp_path, img, m)


def _truncated(root, img, m):
    _write(
        root,
        "trunc",
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8),
        np.ones((64, 64), np.uint8),
    )
    p = root / "images" / "trunc.png"
    p.write_bytes(p.read_bytes()[:200])
    return "trunc.png"


def _unreadable_mask(root, img, m):
    _write(root, "badmask", img, m)
    (root / "masks" / "badmask.png").write_bytes(b"garbage")
    return "badmask.png"


def _size_mismatch(root, img, m):
    _write(root, "size", img, np.ones((21, 20), np.uint8))
    return "size.png"


def _no_mask(root, img, m):
    Image.fromarray(img).save(root / "images" / "lonely.png")
    return "lonely.png"


def _no_image(root, img, m):
    Image.fromarray(m).save(root / "masks" / "orphan.png")
    return "orphan.png"


def _duplicate_stem(root, img, m):
    _write(root, "dup", img, m)
    Image.fromarray(img).save(root / "images" / "dup.jpg")
    return "dup.jpg"


# an empty mask is not bad input: tests/test_images_without_objects.py
BAD_CASES = [_truncated, _unreadable_mask, _size_mismatch, _no_mask, _no_image, _duplicate_stem]


@pytest.mark.parametrize("make_bad", BAD_CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_an_error_naming_the_file(tmp_path, make_bad):
    root, name = _good_and(tmp_path, make_bad)
    with pytest.raises(BadDataError, match=name.replace(".", r"\.")):
        _meta(FolderReader(root))


@pytest.mark.parametrize("make_bad", BAD_CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_skipped_and_listed_with_skip_bad(tmp_path, make_bad):
    root, name = _good_and(tmp_path, make_bad)
    meta, skipped = _meta(FolderReader(root), skip_bad=True)
    assert "good" in meta["image_id"].tolist()
    assert any(s["path"].endswith(name) for s in skipped), skipped
    assert all(s["reason"] for s in skipped)


def test_coco_bad_input(tmp_path):
    images = [
        {"id": 1, "file_name": "imgs/a.png", "height": 30, "width": 40},
        {"id": 2, "file_name": "imgs/missing.png", "height": 30, "width": 40},
        {"id": 3, "file_name": "imgs/a.png", "height": 30, "width": 40},  # duplicate file_name
    ]
    reader = _coco(tmp_path, [], images)
    with pytest.raises(BadDataError, match=r"missing\.png") as e:
        _meta(reader)
    assert "duplicate" in str(e.value)
    single = [{"id": 1, "file_name": "imgs/a.png", "height": 31, "width": 40}]
    with pytest.raises(BadDataError, match=r"a\.png: image size"):
        _meta(
            _coco(
                tmp_path,
                [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]}],
                single,
            )
        )
    single[0]["height"] = 30
    with pytest.raises(ValueError, match=r"none of the 1 image\(s\) has an object"):  # kept, but alone
        _meta(_coco(tmp_path, [], single))


def test_skip_bad_build_lists_skips_in_the_report(tmp_path):
    root, _ = _good_and(tmp_path / "d", _size_mismatch)
    _no_mask(root, np.zeros((20, 20, 3), np.uint8), None)
    with pytest.raises(BadDataError, match=r"2 bad(.|\n)*lonely\.png(.|\n)*size\.png"):  # all at once
        build(root, tmp_path / "c.zarr")
    report = build(root, tmp_path / "c2.zarr", skip_bad=True, images_per_shard=1)
    assert report["num_images"] == 1 and report["num_skipped"] == 2
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in report["skipped"]) == ["lonely.png", "size.png"]


def test_coco_end_to_end_build(tmp_path):
    anns = [
        {"id": 1, "image_id": 5, "category_id": 3, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
        {"id": 2, "image_id": 5, "category_id": 7, "segmentation": [[20, 20, 30, 20, 30, 28]]},
    ]
    reader = _coco(tmp_path, anns)
    report = build(tmp_path, tmp_path / "c.zarr", coco=reader.json_path, val_fraction=0.0)
    c = open_cache(tmp_path / "c.zarr")
    assert report["num_objects"] == 2 and c.image_id.tolist() == ["5"]
    assert c.objects.class_id.tolist() == [3, 7] and c.signature["dataset"]["reader"] == "coco"
    assert c.masks([0, 1], "input").shape == (2, 1024, 1024)
