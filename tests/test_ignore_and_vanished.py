"""Issue 18 items 10 and 5 (trainer side): a semantic ``--ignore-index`` region is kept in the cache and is
neither trained nor scored; objects that vanish at the input size are left out of training and validation
alike.

The caches here are built with a stand-in image encoder (a pooled copy of the input): these tests are about
masks, labels and scores, and the real vit_tiny encoder costs ~4 s per image on two CPU cores.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import ImageEncoderViT
from test_embedcache_support import build, read_png, write_pair

import kernels
import trainer.evaluate
from embedcache import masks as mk
from embedcache import open_cache
from embedcache.cache import CacheError
from embedcache.verify import verify
from trainer.config import LossConfig
from trainer.data import ImageStore, choose_objects, read_batch
from trainer.evaluate import evaluate
from trainer.losses import masked_dice, semantic_loss
from trainer.semantic import evaluate_semantic

IGNORE = 255
CPU = torch.device("cpu")


def _pooled(self, x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, S, S)`` -> ``(B, 256, 64, 64)``: finite, non-zero and cheap, in place of the encoder."""
    return F.adaptive_avg_pool2d(x, 64).mean(1, keepdim=True).abs().expand(-1, 256, -1, -1) + 1.0


@pytest.fixture(scope="module")
def cheap_encoder():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageEncoderViT, "forward", _pooled)
        yield


@pytest.fixture(scope="module")
def semantic(tmp_path_factory, cheap_encoder):
    """Two images with classes 1 and 2 and a band of ignored pixels, and their cache."""
    root = tmp_path_factory.mktemp("semantic")
    rng = np.random.default_rng(0)
    for stem, (h, w) in (("a", (48, 64)), ("b", (72, 40))):
        labels = np.zeros((h, w), np.uint8)
        labels[5:15, 5:20] = 1
        labels[20:30, 10:30] = 2
        labels[h - 8 : h - 2, 3:] = IGNORE
        write_pair(root / "data", stem, rng.integers(0, 255, (h, w, 3), dtype=np.uint8), labels)
    build(root / "data", root / "c.zarr", mask_kind="semantic", ignore_index=IGNORE, min_object_area=1)
    return root / "data", root / "c.zarr"


def _labels(data, cache, i: int) -> np.ndarray:
    return read_png(data / "masks" / f"{cache.image_id[i]}.png")


def test_the_ignore_region_is_kept_in_both_frames_and_verified(semantic):
    data, path = semantic
    c = open_cache(path)
    for i in range(c.num_images):
        ignored = _labels(data, c, i) == IGNORE
        assert ignored.any() and np.array_equal(c.ignore_mask(i, "original"), ignored)
        h, w = ignored.shape
        want = mk.crop_to_input(ignored, (0, 0, w, h), (h, w), c.input_size[i], side=c.image_size)
        assert np.array_equal(c.ignore_mask(i, "input"), want)
    assert verify(path) == []


def test_a_cache_without_its_ignore_region_is_refused_with_a_rebuild_hint(semantic, tmp_path):
    """What an embedcache from before the ignore region was kept wrote for --ignore-index."""
    old = tmp_path / "old.zarr"
    shutil.copytree(semantic[1], old)
    shutil.rmtree(old / "ignore")
    with pytest.raises(CacheError, match=r"old\.zarr: built with --ignore-index 255 .* --overwrite"):
        open_cache(old)


def test_training_labels_mark_the_ignore_region_as_ignored(semantic):
    data, path = semantic
    c = open_cache(path)
    images = np.arange(c.num_images)
    batch = read_batch(ImageStore(c, "stream", CPU), images, 8, seed=0, epoch=0, semantic=True)
    for b in images:
        ignored = torch.from_numpy(c.ignore_mask(int(b), "input"))
        h, w = c.input_size[b]
        assert (batch.labels[b][ignored] == -100).all()
        inside = batch.labels[b, :h, :w][~ignored[:h, :w]]
        assert (inside >= 0).all() and set(inside.unique().tolist()) == {0, 1, 2}


def test_the_semantic_loss_gives_ignored_pixels_no_gradient():
    """At the logits' own resolution (upsample factor 1) every pixel has its own logit: an ignored one gets
    exactly no gradient from ce or dice, and changing its logits changes nothing."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 16, 16), generator=g)
    labels[:, 4:9, 2:12] = -100  # ignored
    labels[1, 12:] = -100  # padding
    valid = torch.tensor([[16, 16], [12, 16]])
    cfg = LossConfig(focal=0, iou_head=0, ce=1, dice=1, backend="torch")
    loss, _ = semantic_loss(logits, labels, valid, cfg)
    loss.backward()
    assert logits.grad[:, :, 4:9, 2:12].abs().max() == 0 and logits.grad.abs().max() > 0
    moved = logits.detach().clone()
    moved[:, :, 4:9, 2:12] += 5 * torch.randn(2, 3, 5, 10, generator=g)
    assert torch.equal(semantic_loss(moved, labels, valid, cfg)[0], loss.detach())


@pytest.mark.parametrize("factor", [1, 4])
def test_masked_dice_over_the_valid_rectangle_is_the_kernels_dice(factor):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, 8, generator=g)
    targets = torch.rand(3, 8 * factor, 8 * factor, generator=g) > 0.6
    valid = torch.tensor([[8 * factor, 8 * factor], [5 * factor, 8 * factor], [3, 2]])
    counted = kernels.reference.valid_mask(valid, 8 * factor, 8 * factor)
    dice, iou = masked_dice(logits, targets, counted)
    want = kernels.mask_losses(logits, targets, valid, backend="torch")
    torch.testing.assert_close(dice, want.dice)
    torch.testing.assert_close(iou, want.iou)


class _ConstantClass(torch.nn.Module):
    """A semantic model whose every pixel says ``cls`` (stands in for ``PromptedDecoder`` with a head)."""

    def __init__(self, cls: int, num_classes: int):
        super().__init__()
        self.cls, self.num_classes = cls, num_classes
        self.semantic_head = SimpleNamespace(prompt="none")

    def forward(self, embeddings, index, prompts):
        logits = torch.zeros(embeddings.shape[0], self.num_classes, 256, 256)
        logits[:, self.cls] = 10.0
        return SimpleNamespace(logits=logits)


ONE_PROCESS = SimpleNamespace(
    process_index=0,
    num_processes=1,
    device=CPU,
    reduce=lambda t, op: t,
    gather_for_metrics=lambda records, use_gather_object: records,
)


def test_semantic_validation_does_not_score_the_ignore_region(semantic):
    data, path = semantic
    c = open_cache(path)
    images = np.arange(c.num_images)
    got = evaluate_semantic(_ConstantClass(1, 3), ImageStore(c, "stream", CPU), images, ONE_PROCESS, 3)
    labels = [_labels(data, c, int(i)) for i in images]
    scored = sum(int((lab != IGNORE).sum()) for lab in labels)
    class_1 = sum(int((lab == 1).sum()) for lab in labels)
    # predicting class 1 everywhere: IoU = class-1 pixels / every scored pixel (ignored ones were counted)
    assert got["semantic"]["per_class_iou"] == [0.0, pytest.approx(class_1 / scored), 0.0]


# ---- item 5: objects that vanish at the input size ----


@pytest.fixture(scope="module")
def vanishing(tmp_path_factory, cheap_encoder):
    """An image halved to the input size (2048 wide: rows and columns at odd positions survive) with a kept
    block and a 1-pixel object at an even position that vanishes, and an image whose only object vanishes."""
    root = tmp_path_factory.mktemp("vanishing")
    rng = np.random.default_rng(1)
    mixed = np.zeros((64, 2048), np.uint8)
    mixed[10:30, 100:160] = 1
    mixed[40, 400] = 2  # source rows/columns 2r + 1 are sampled: (40, 400) is not
    gone = np.zeros((64, 2048), np.uint8)
    gone[20, 1000] = 1
    for stem, labels in (("mixed", mixed), ("gone", gone)):
        write_pair(root / "data", stem, rng.integers(0, 255, (*labels.shape, 3), dtype=np.uint8), labels)
    build(root / "data", root / "c.zarr", min_object_area=1, val_fraction=0.0)
    c = open_cache(root / "c.zarr")
    assert c.objects.input_area.tolist() == [0, 300, 0]  # image "gone" first: ids are sorted
    return c


def test_vanished_objects_are_not_trained(vanishing):
    c = vanishing
    assert c.images_with_objects("all").tolist() == [1]  # "gone" has nothing left to prompt
    picked = choose_objects(c, np.arange(c.num_images), 8, seed=0, epoch=0)
    assert [p.tolist() for p in picked] == [[], [1]]


def test_vanished_objects_are_not_scored(vanishing, monkeypatch):
    c = vanishing

    def exact(model, store, image, prompt, device, chunk, **kw):  # which objects are scored, not how well
        return [c.masks(np.arange(*c.object_range(image)), "original")]

    monkeypatch.setattr(trainer.evaluate, "predict_rounds", exact)
    got = evaluate(
        torch.nn.Identity(), ImageStore(c, "stream", CPU), np.arange(2), ONE_PROCESS, per_object=True
    )
    assert got["box"]["object_ids"] == got["point"]["object_ids"] == [1]
