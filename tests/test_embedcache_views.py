"""Cached augmentation views (``--views``): exact transforms of images, masks and boxes; build, verify, info,
partial caches; the trainer's per-epoch view draw, its resume and the identity-only validation."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from test_embedcache_support import assert_same_cache, build, cli_build, tiny_dataset

from embedcache import CacheError, open_cache
from embedcache import masks as mk
from embedcache.build import CacheExistsError
from embedcache.cli import main as embedcache_main
from embedcache.encode import EXIT_AFTER_SHARDS_ENV
from embedcache.images import load_image
from embedcache.info import info_text
from embedcache.models import build_sam
from embedcache.presets import get_preset
from embedcache.verify import verify
from embedcache.views import VIEWS, parse_views, view_metadata
from trainer.config import load_config
from trainer.data import ImageStore, Prefetcher, read_batch
from trainer.order import micro_batches, view_of

NUMPY_OPS = {
    "identity": lambda a: a,
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot180": lambda a: np.rot90(a, 2),
    "transpose": lambda a: a.swapaxes(0, 1),
    "rot90": lambda a: np.rot90(a, 1),
    "rot270": lambda a: np.rot90(a, -1),
    "antitranspose": lambda a: np.rot90(a, 2).swapaxes(0, 1),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_a_view_is_its_numpy_transform_and_maps_boxes_exactly(name):
    rng = np.random.default_rng(0)
    a = rng.random((7, 11, 3))
    view = VIEWS[name]
    assert np.array_equal(view.apply(a), NUMPY_OPS[name](a))
    assert view.hw(7, 11) == NUMPY_OPS[name](a).shape[:2]
    mask = np.zeros((7, 11), bool)
    mask[2:5, 1:9] = rng.random((3, 8)) > 0.3
    mask[2, 1] = mask[4, 8] = True  # the tight box is (1, 2, 9, 5)
    assert view.box(mk.mask_box(mask), 7, 11) == mk.mask_box(view.apply(mask))


def test_parse_views_names_presets_and_refuses_unknown_names():
    assert parse_views("none") == ("identity",)
    assert parse_views("flips") == ("identity", "hflip", "vflip")
    assert parse_views("d4") == tuple(VIEWS) and len(VIEWS) == 8
    assert parse_views("vflip,hflip,vflip") == ("identity", "vflip", "hflip")
    with pytest.raises(ValueError, match="flop"):
        parse_views("hflip,flop")


def test_view_metadata_transforms_original_masks_and_rederives_the_input_frame():
    """Original frame: the identity's masks transformed. Input frame: the nearest rule applied to those (not
    the identity's input frame transformed: the rule's ties do not flip)."""
    preset = get_preset("lite_medsam")
    rng = np.random.default_rng(1)
    h, w = 37, 53
    full = np.zeros((h, w), bool)
    full[3:30, 5:44] = rng.random((27, 39)) > 0.5
    full[3, 5] = full[29, 43] = True
    box = mk.mask_box(full)
    meta = {
        "original_size": np.array([[h, w]], np.int32),
        "objects/image_index": np.array([0]),
        "objects/box": np.array([box], np.float32),
        "objects/mask_offset": np.array([0, mk.pack(full, box).size]),
        "objects/mask_bits": mk.pack(full, box),
    }
    side = preset.image_size
    for name in ("hflip", "rot90"):
        view = VIEWS[name]
        got = view_metadata(meta, view, preset)
        vh, vw = view.hw(h, w)
        assert got["original_size"].tolist() == [[vh, vw]]
        assert got["input_size"].tolist() == [list(preset.input_hw(vh, vw))]
        vbox = got["objects/box"][0]
        crop = mk.unpack(got["objects/mask_bits"], vbox)
        assert np.array_equal(mk.crop_to_original(crop, vbox, (vh, vw)), view.apply(full))
        want_in = mk.crop_to_input(
            view.apply(full), (0, 0, vw, vh), (vh, vw), got["input_size"][0], side=side
        )
        in_box = got["objects/input_box"][0]
        in_crop = mk.unpack(got["objects/input_mask_bits"], in_box)
        assert np.array_equal(mk.crop_to_original(in_crop, in_box, (side, side)), want_in)
        assert got["objects/input_area"][0] == want_in.sum()


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory):
    """3 tiny images (2 train, 1 val) in the identity and hflip, as a partial cache (1 tail block)."""
    root = tmp_path_factory.mktemp("views")
    data = tiny_dataset(root / "data", n_images=3)
    build(data, root / "c.zarr", views="hflip", tail_blocks=1)
    return data, root / "c.zarr"


def test_flipped_view_masks_boxes_and_embeddings_are_the_flipped_image_s(views_cache):
    data, path = views_cache
    c = open_cache(path)
    v = c.view("hflip")
    assert c.views == ("identity", "hflip") and c.signature["views"] == ["identity", "hflip"]
    for j in range(c.num_objects):
        assert np.array_equal(v.masks([j])[0], c.masks([j])[0][:, ::-1])
    # the view's embedding is SamPredictor's features of the flipped image (float16 rounding apart)
    sam = build_sam("vit_tiny").eval()
    predictor = SamPredictor(sam)
    i = 0
    image = load_image(data / str(c.image_path[i]))
    predictor.set_image(np.ascontiguousarray(image[:, ::-1]))
    want = predictor.features[0].float()
    got = torch.from_numpy(v.read_embeddings([i])[0]).float()
    assert float((got - want).norm() / want.norm()) < 2e-3
    identity = torch.from_numpy(c.read_embeddings([i])[0]).float()
    assert float((identity - want).norm() / want.norm()) > 0.05  # the test can tell the views apart
    # partial caches store each view's tap tokens
    assert v.read_tap([i]).shape == c.read_tap([i]).shape
    assert not np.array_equal(v.read_tap([i]), c.read_tap([i]))


def test_verify_checks_every_view_and_info_reports_bytes_per_view(views_cache):
    _, path = views_cache
    assert verify(path) == []
    text = info_text(path)
    assert "views        2: identity, hflip" in text
    assert "view hflip" in text and "view identity" in text


def test_verify_names_a_view_whose_mask_is_not_the_transformed_original(views_cache, tmp_path):
    import shutil

    import zarr

    _, path = views_cache
    bad = tmp_path / "bad.zarr"
    shutil.copytree(path, bad)
    g = zarr.open_group(bad, mode="r+")
    bits = g["views/hflip/objects/mask_bits"]
    b = np.asarray(bits[...])
    b[0] ^= 0x80  # the first pixel of object 0's crop
    bits[...] = b
    problems = verify(bad, embeddings=False)
    assert any("object 0" in p and "hflip" in p for p in problems), problems


def test_a_views_build_stopped_mid_way_resumes_to_the_uninterrupted_cache(views_cache, tmp_path):
    """Killed after its first shard (every view of those images written), the same command finishes the
    cache bit for bit as the uninterrupted build, re-encoding only the rest."""
    data, ref = views_cache
    out = tmp_path / "c.zarr"
    extra = ("--views", "hflip", "--tail-blocks", "1")
    r = cli_build(data, out, *extra, env={EXIT_AFTER_SHARDS_ENV: "1"}, check=False)
    assert r.returncode == 75, r.stderr
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)
    report = build(data, out, views="hflip", tail_blocks=1)
    assert report["runs"][-1]["shards_encoded"] == 1
    assert_same_cache(ref, out)
    assert verify(out) == []


def test_other_views_onto_a_views_cache_are_refused_and_a_missing_view_is_named(views_cache):
    data, path = views_cache
    with pytest.raises(CacheExistsError, match="views"):
        build(data, path, views="vflip", tail_blocks=1)
    assert open_cache(path).views == ("identity", "hflip")  # untouched
    with pytest.raises(CacheError, match="c.zarr: has no view 'vflip' \\(it holds identity, hflip\\)"):
        open_cache(path).view("vflip")


def test_an_unknown_view_name_is_a_one_line_error_and_writes_nothing(views_cache, tmp_path, capsys):
    data, _ = views_cache
    out = tmp_path / "c.zarr"
    argv = ["build", "--data", str(data), "--out", str(out), "--model", "vit_tiny", "--device", "cpu"]
    assert embedcache_main([*argv, "--views", "hflip,flop", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("embedcache build: error: unknown view(s) ['flop']") and "\n" not in err
    assert not out.exists()


def test_training_reads_one_view_per_image_per_epoch_and_resume_reads_the_same(views_cache):
    """The draw is a pure function of (seed, epoch, image), so batches from a resumed position equal the
    uninterrupted run's; the flipped image's batch carries the view's boxes and embedding."""
    _, path = views_cache
    c = open_cache(path)
    store = ImageStore(c, "host", torch.device("cpu"))
    cfg = load_config(None, ["data.images_per_batch=1", "data.readers=1", "data.prefetch=1"]).data
    train = c.images_with_objects("train")

    def read(epoch, position, n):
        order = micro_batches(train, seed=3, world=1, rank=0, batch=1, epoch=epoch, position=position)
        jobs = [next(order) for _ in range(n)]
        loader = Prefetcher(store, jobs, cfg, seed=3, semantic=False, pin=False)
        return jobs, list(loader)

    jobs, full = read(0, 0, 8)
    _, resumed = read(1, 1, 5)  # epoch 1 from micro-batch 1 = the 4th batch on
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.boxes, b.boxes)
    drawn = {(e, int(i[0])): c.views[view_of(3, e, int(i[0]), 2)] for e, i in jobs}
    assert set(drawn.values()) == {"identity", "hflip"}  # both views are drawn over 4 epochs
    for (e, i), batch in zip(drawn, full):
        want = read_batch(store, np.array([i]), cfg.max_objects, 3, e, views=[drawn[(e, i)]])
        assert torch.equal(batch.embeddings, want.embeddings) and torch.equal(batch.boxes, want.boxes)
        assert batch.views == (drawn[(e, i)],)  # for tasks that key their own targets by view


def test_identity_only_training_reads_no_other_view(views_cache):
    """``data.views=identity`` trains a views cache without augmentation: every batch is the identity's,
    the same as on the cache's identity alone, in the epochs where ``all`` draws the flipped view."""
    _, path = views_cache
    c = open_cache(path)
    store = ImageStore(c, "host", torch.device("cpu"))
    base = ["data.images_per_batch=1", "data.readers=1", "data.prefetch=1"]
    train = c.images_with_objects("train")
    order = micro_batches(train, seed=3, world=1, rank=0, batch=1, epoch=0, position=0)
    jobs = [next(order) for _ in range(8)]  # 4 epochs of the 2 training images

    def batches(views):
        cfg = load_config(None, [*base, f"data.views={views}"]).data
        return list(Prefetcher(store, jobs, cfg, seed=3, semantic=False, pin=False))

    drawn = [c.views[view_of(3, e, int(i[0]), 2)] for e, i in jobs]
    assert "hflip" in drawn  # so ``all`` would have read a flipped view here
    for (e, i), batch in zip(jobs, batches("identity")):
        want = read_batch(store, i, 8, 3, e)
        assert batch.views is None
        assert torch.equal(batch.embeddings, want.embeddings) and torch.equal(batch.boxes, want.boxes)
    assert ("hflip",) in [b.views for b in batches("all")]
    with pytest.raises(ValueError, match=r"data.views must be one of all\|identity, got 'some'"):
        load_config(None, ["data.views=some"])


@pytest.mark.slow  # a whole 2-step run with its validations: 13 s on the loaded 2-core machine
def test_validation_reads_the_identity_view(views_cache, tmp_path, monkeypatch):
    """A 2-step run: training batches come in drawn views, every other read (validation) in the identity."""
    from trainer.train import run

    _, path = views_cache
    calls = []
    embeddings = ImageStore.embeddings

    def spy(self, idx, views=None):
        calls.append((sys._getframe(1).f_code.co_name, views))
        return embeddings(self, idx, views)

    monkeypatch.setattr(ImageStore, "embeddings", spy)
    cfg = load_config(
        None,
        [
            "data.images_per_batch=1",
            "data.max_objects=1",
            "run.steps=2",
            "run.val_max_images=1",
            "run.save_every=0",
            "run.overlays=0",
        ],
    )
    run(path, cfg, tmp_path / "run", progress=False)
    train = [v for who, v in calls if who == "read_batch"]
    other = [v for who, v in calls if who != "read_batch"]
    assert train and all(v is not None for v in train)
    assert other and all(v is None for v in other), calls
