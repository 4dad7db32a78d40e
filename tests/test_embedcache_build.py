"""A built cache against docs/cache-api-contract.md: arrays, masks, split, signature, refusal, verify."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from test_embedcache_support import assert_same_cache, build, read_png, tiny_dataset

from embedcache import CacheError, open_cache
from embedcache import masks as mk
from embedcache.build import BuildConfig, CacheExistsError
from embedcache.cli import main
from embedcache.models import build_sam
from embedcache.signature import FORMAT_VERSION, SignatureMismatch, check_compatible
from embedcache.split import assign_split
from embedcache.verify import shard_file, verify


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 6-image synthetic dataset and its vit_tiny cache (3 shards of 2 images)."""
    root = tmp_path_factory.mktemp("built")
    data = tiny_dataset(root / "data")
    report = build(data, root / "cache.zarr")
    return data, root / "cache.zarr", report


def test_contract_arrays(built):
    data, path, report = built
    c = open_cache(path)
    assert (c.num_images, c.images_per_shard) == (6, 2) and report["num_images"] == 6
    assert c.embeddings.dtype == np.float16 and c.embeddings.shape == (6, 256, 64, 64)
    assert c.embeddings.chunks == (1, 256, 64, 64) and c.embeddings.shards == (2, 256, 64, 64)
    e = c.read_embeddings(np.array([4, 1]))
    assert e.shape == (2, 256, 64, 64) and e.dtype == np.float16 and np.isfinite(e).all()
    assert np.array_equal(e[1], c.embeddings[1])
    assert c.original_size.dtype == np.int32 and c.input_size.dtype == np.int32
    for i, stem in enumerate(c.image_id):
        h, w = read_png(data / "images" / f"{stem}.png").shape[:2]
        assert tuple(c.original_size[i]) == (h, w) and max(c.input_size[i]) == 1024
    assert c.image_id.tolist() == sorted(p.stem for p in (data / "images").iterdir())
    o = c.objects
    assert o.image_index.dtype == np.int64 and (np.diff(o.image_index) >= 0).all()
    assert o.box.dtype == np.float32 and o.class_id.dtype == np.int32 and o.area.dtype == np.int64
    assert c.num_objects == len(o.box) == report["num_objects"]
    starts = [c.object_range(i) for i in range(c.num_images)]
    assert starts[0][0] == 0 and starts[-1][1] == c.num_objects
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(starts, starts[1:]))


def test_masks_in_three_frames(built):
    data, path, _ = built
    c = open_cache(path)
    for i in (0, 3):
        labels = read_png(data / "masks" / f"{c.image_id[i]}.png")
        a, b = c.object_range(i)
        js = np.arange(a, b)
        original = c.masks(js, "original")
        values = [v for v in np.unique(labels) if v]
        assert len(original) == len(values)
        for m, v, j in zip(original, values, js):
            assert np.array_equal(m, labels == v)
            assert m.sum() == c.objects.area[j]
            x1, y1, x2, y2 = c.objects.box[j].astype(int)
            assert m[y1:y2, x1:x2].sum() == m.sum() and m[y1].any() and m[y2 - 1].any()
        inp = c.masks(js, "input")
        h, w = c.input_size[i]
        assert inp.shape == (len(js), 1024, 1024) and inp.dtype == bool
        assert not inp[:, h:].any() and not inp[:, :, w:].any()
        rows, cols = mk.nearest_index(labels.shape[0], h), mk.nearest_index(labels.shape[1], w)
        for m, full in zip(original, inp):
            assert np.array_equal(full[:h, :w], m[np.ix_(rows, cols)])
        low = c.masks(js, "lowres")
        assert low.shape == (len(js), 256, 256) and np.array_equal(low, mk.input_to_lowres(inp))
    with pytest.raises(ValueError):
        c.masks([0], "full")


def test_images_with_objects_leaves_out_images_without_any(built, tmp_path):
    # make an image without objects in place: hand image 1's objects to image 0 (the object order stays
    # sorted by image)
    path = tmp_path / "cache.zarr"
    shutil.copytree(built[1], path)
    index = zarr.open_group(path, mode="r+")["objects"]["image_index"]
    moved = index[...]
    assert (moved == 1).any()
    moved[moved == 1] = 0
    index[...] = moved
    c = open_cache(path)
    for split in ("train", "val", "all"):
        have = [i for i in c.image_indices(split).tolist() if c.object_range(i)[1] > c.object_range(i)[0]]
        assert c.images_with_objects(split).tolist() == have
        assert c.images_with_objects(split).dtype == np.int64
    assert c.images_with_objects("all").tolist() == [i for i in range(c.num_images) if i != 1]


def test_split_is_deterministic_and_recorded(built):
    _, path, _ = built
    c = open_cache(path)
    assert set(c.split) <= {"train", "val"}
    train, val = c.image_indices("train"), c.image_indices("val")
    assert len(val) == round(0.2 * 6) and sorted(np.r_[train, val].tolist()) == list(range(6))
    assert np.array_equal(c.image_indices("all"), np.arange(6))
    ids = list(c.image_id)
    again = assign_split(ids[::-1], 0.2, 0)[::-1]  # independent of listing order
    assert np.array_equal(again, c.split)
    assert not np.array_equal(
        assign_split([f"x{i}" for i in range(50)], 0.2, 0), assign_split([f"x{i}" for i in range(50)], 0.2, 1)
    )
    assert c.signature["dataset"]["split"] == {"method": "sha256-rank", "val_fraction": 0.2, "seed": 0}


def test_signature(built):
    _, path, _ = built
    s = open_cache(path).signature
    assert (
        s["format_version"] == FORMAT_VERSION == 3
        and s["model_type"] == "vit_tiny"
        and s["checkpoint"] == "random-init:0"
    )
    assert (
        s["encoder"]["embed_dim"] == 64
        and s["storage_dtype"] == "float16"
        and s["compute_dtype"] == "float32"
    )
    assert s["preprocessing"]["image_size"] == 1024 and s["preprocessing"]["pixel_mean"] == [
        123.675,
        116.28,
        103.53,
    ]
    assert len(s["dataset"]["fingerprint"]) == 64 and s["dataset"]["mask_kind"] == "instance"
    report = open_cache(path).build_report
    assert report["num_skipped"] == 0 and report["runs"][0]["shards_encoded"] == 3


def test_check_compatible(built, tmp_path):
    _, path, _ = built
    c = open_cache(path)
    check_compatible(c, "vit_tiny", None)
    check_compatible(c, "vit_tiny", "random-init:0")
    with pytest.raises(SignatureMismatch, match="model_type"):
        check_compatible(c, "vit_b", None)
    with pytest.raises(SignatureMismatch, match="checkpoint"):
        check_compatible(c, "vit_tiny", None, init_seed=1)
    ckpt = tmp_path / "w.pth"
    torch.save(build_sam("vit_tiny").state_dict(), ckpt)
    with pytest.raises(SignatureMismatch, match=r"cache\.zarr.*checkpoint"):
        check_compatible(c, "vit_tiny", ckpt)  # same weights, but the cache records random-init:0, not a file


def test_rerun_of_a_complete_cache_encodes_nothing(built):
    data, path, _ = built
    before = {k: shard_file(path, k).stat().st_mtime_ns for k in range(3)}
    report = build(data, path)
    assert len(report["runs"]) == 1
    assert {k: shard_file(path, k).stat().st_mtime_ns for k in range(3)} == before


def test_different_model_or_data_is_refused_unless_overwrite(built, tmp_path):
    data, path, _ = built
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(path, tmp_path / "c.zarr")
    with pytest.raises(CacheExistsError, match=r"checkpoint.*--overwrite"):
        build(tmp_path / "data", tmp_path / "c.zarr", init_seed=1)
    labels = read_png(tmp_path / "data" / "masks" / "img000.png")
    labels[0, 0] = labels.max()  # an edited mask: same files, new fingerprint
    Image.fromarray(labels).save(tmp_path / "data" / "masks" / "img000.png")
    with pytest.raises(CacheExistsError, match="fingerprint"):
        build(tmp_path / "data", tmp_path / "c.zarr")
    argv = [
        "build",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "c.zarr"),
        "--model",
        "vit_tiny",
    ]
    assert main([*argv, "--images-per-shard", "2", "--no-progress"]) == 2
    report = build(tmp_path / "data", tmp_path / "c.zarr", overwrite=True)
    assert report["runs"][0]["shards_encoded"] == 3
    assert open_cache(tmp_path / "c.zarr").objects.area.sum() != open_cache(path).objects.area.sum()


def test_a_folder_that_is_not_a_cache_is_never_replaced(built, tmp_path):
    data, _, _ = built
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(CacheExistsError, match="not an embedcache cache"):
            build(data, tmp_path / "precious", overwrite=overwrite)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        BuildConfig(data=tmp_path, out=tmp_path / "x", model_type="vit_x")
    with pytest.raises(ValueError, match="val_fraction"):
        BuildConfig(data=tmp_path, out=tmp_path / "x", model_type="vit_tiny", val_fraction=1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        BuildConfig(data=tmp_path, out=tmp_path / "x", model_type="vit_tiny", ignore_index=255)


def test_info_and_verify_ok(built, capsys):
    _, path, _ = built
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for needle in ("vit_tiny", "random-init:0", "images       6", "on disk", "KiB total", "train 5, val 1"):
        assert needle in out
    assert main(["verify", str(path)]) == 0
    assert verify(path) == []


def _corrupt_copy(path, tmp_path, how):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(path, bad)
    g = zarr.open_group(bad, mode="r+")
    if how == "missing shard":
        shard_file(bad, 1).unlink()
    elif how == "nan embedding":
        e = g["embeddings"]
        block = e[2:4]
        block[1, 5, 6, 7] = np.nan
        e[2:4] = block
    elif how == "area":
        a = g["objects"]["area"][...]
        a[0] += 1
        g["objects"]["area"][...] = a
    elif how == "box":
        b = g["objects"]["box"][...]
        b[1, 2] += 3
        g["objects"]["box"][...] = b
    elif how == "input mask":
        bits = g["objects"]["input_mask_bits"][...]
        bits[len(bits) // 2] ^= 0x10
        g["objects"]["input_mask_bits"][...] = bits
    elif how == "input box shifted":  # same bits and area one pixel to the right: only the rule check sees it
        b = g["objects"]["input_box"][...]
        b[0, [0, 2]] += 1
        g["objects"]["input_box"][...] = b
    elif how == "marker":
        g["shard_done"][2] = 0
    elif how == "truncated shard":
        f = shard_file(bad, 0)
        f.write_bytes(f.read_bytes()[:1000])
    elif how == "input_size":
        s = g["input_size"][...]
        s[0, 0] -= 1
        g["input_size"][...] = s
    return bad


@pytest.mark.parametrize(
    "how",
    [
        "missing shard",
        "nan embedding",
        "area",
        "box",
        "input mask",
        "input box shifted",
        "marker",
        "truncated shard",
        "input_size",
    ],
)
def test_verify_fails_on_a_corrupted_cache(built, tmp_path, how, capsys):
    _, path, _ = built
    bad = _corrupt_copy(path, tmp_path, how)
    assert verify(bad), how
    assert main(["verify", str(bad)]) == 1
    assert "PROBLEM" in capsys.readouterr().out


def test_open_cache_refuses_incomplete_or_missing(built, tmp_path):
    _, path, _ = built
    with pytest.raises(CacheError, match="nothere"):
        open_cache(tmp_path / "nothere.zarr")
    bad = _corrupt_copy(path, tmp_path, "marker")
    with pytest.raises(CacheError, match=r"bad\.zarr.*not finished"):
        open_cache(bad)
    zarr.open_group(bad, mode="r+").attrs.update(status="prepared")
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(bad)


def _structure_damage(g: zarr.Group, how: str) -> None:
    """Damage that every chunk checksum accepts (the arrays are rewritten whole) but the layout forbids."""
    objects = g["objects"]
    index = objects["image_index"][...]
    if how == "index out of range":
        index[-1] = 6
    elif how == "index unsorted":
        index[0] = index[-1]
    if how.startswith("index"):
        objects["image_index"][...] = index
    elif how == "box outside its image":
        box = objects["box"][...]
        box[0, 2] = 10_000
        objects["box"][...] = box
    elif how == "short array":
        objects.create_array("class_id", data=objects["class_id"][...][:-1], overwrite=True)
    elif how == "offsets":
        offsets = objects["mask_offset"][...]
        offsets[1] += 1
        objects["mask_offset"][...] = offsets


@pytest.mark.parametrize(
    "how, needle",
    [
        ("index out of range", r"objects/image_index: not sorted, or outside 0\.\.5 \(holds 0\.\.6\)"),
        ("index unsorted", r"objects/image_index: not sorted"),
        ("box outside its image", r"objects/box: 1 box\(es\) outside their image, e\.g\. object 0"),
        ("short array", r"objects/class_id: \d+ rows, expected \d+"),
        ("offsets", r"objects/mask_offset: 2 object\(s\) whose byte count does not fit their box"),
    ],
    ids=["index-out-of-range", "index-unsorted", "box-outside", "short-array", "offsets"],
)
def test_open_cache_runs_the_structural_checks(built, tmp_path, how, needle):
    """Issue 18 item 7: the trainer opened (and trained on) a cache with image_index out of range; now every
    open_cache refuses it, naming the cache and the problem, and verify reports the same."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(built[1], bad)
    _structure_damage(zarr.open_group(bad, mode="r+"), how)
    with pytest.raises(CacheError, match=rf"bad\.zarr: invalid cache structure: {needle}"):
        open_cache(bad)
    assert any("invalid cache structure" in p for p in verify(bad))


def test_rebuild_is_reproducible(built, tmp_path):
    data, path, _ = built
    build(data, tmp_path / "again.zarr")
    assert_same_cache(path, tmp_path / "again.zarr")


def test_a_build_killed_while_preparing_starts_again(tmp_path):
    data = tiny_dataset(tmp_path / "data", n_images=2)
    build(data, tmp_path / "ref.zarr")
    build(data, tmp_path / "c.zarr")
    g = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    g.attrs.update(status="preparing")  # as a kill during the metadata pass leaves it
    del g["objects"]
    report = build(data, tmp_path / "c.zarr")
    assert len(report["runs"]) == 1 and report["runs"][0]["shards_encoded"] == 1
    assert_same_cache(tmp_path / "ref.zarr", tmp_path / "c.zarr")
