"""``model.task=ais``: the AIS head, its loss and sidecar (fast, no cache), and on the vit_tiny reference
cache the task in the shared step (the loss falls, resume is exact) and ``AutoSegmenter`` on image files
equal to ``trainer eval --auto ais``'s labels (slow: the cache's build)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from embedcache import open_cache
from trainer import checkpoint as ckpt
from trainer.ais import AisHead, ais_loss, evaluate_ais, image_targets
from trainer.automatic import AutoSegmenter
from trainer.cli import main
from trainer.config import load_config
from trainer.data import ImageStore, image_file
from trainer.distance_maps import distance_targets
from trainer.export import export_model
from trainer.model import build_start_sam, build_trainable, trainable_parameters
from trainer.task import TASKS
from trainer.train import run
from trainer.tuned import MANIFEST, load_tuned, sidecar_path
from trainer.variants import variants_for


def _discs(side: int = 64) -> torch.Tensor:
    """``(1, 4, side, side)`` targets of two touching discs, every pixel weighted (the head is fully
    convolutional: a 16x16 embedding gives 64x64 maps, 16 times cheaper than the real 64x64 one)."""
    yy, xx = np.mgrid[:side, :side] * (64 / side)
    labels = np.zeros((side, side), np.int32)
    labels[np.hypot(yy - 32, xx - 25) < 8] = 1
    labels[np.hypot(yy - 32, xx - 40) < 8] = 2
    maps = distance_targets(labels)
    return torch.from_numpy(np.concatenate([maps, np.ones((1, side, side), np.float32)]))[None]


def test_the_loss_is_zero_for_the_targets_and_trains_the_head_down():
    targets = _discs()
    exact = torch.logit(targets[:, :3].clamp(1e-6, 1 - 1e-6))
    loss, terms = ais_loss(exact, targets)
    assert float(loss) < 1e-3 and set(terms) == {"dice_foreground", "dice_centre", "dice_boundary"}
    # the distances count only inside the target foreground: a wrong distance outside it costs nothing
    outside = exact.clone()
    outside[:, 1:][targets[:, :1].expand(-1, 2, -1, -1) == 0] = -9.0
    assert float(ais_loss(outside, targets)[0]) < 1e-3
    head = AisHead()
    torch.manual_seed(0)
    emb = torch.randn(1, 256, 16, 16)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss, _ = ais_loss(head(emb), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert head(emb).shape == (1, 3, 64, 64)
    assert losses[-1] < 0.8 * losses[0]


def test_the_ais_head_is_all_that_trains_and_it_exports_and_loads(tmp_path):
    cfg = load_config(None, ["model.task=ais", "model.lora_rank=2"])
    sam = build_start_sam(cfg)
    start = {k: v.clone() for k, v in sam.state_dict().items()}
    model = build_trainable(sam, cfg).eval()
    trained = {id(p) for p in trainable_parameters(model)}
    assert trained == {id(p) for p in model.ais_head.parameters()}  # SAM's decoder (LoRA too) stays frozen
    with torch.no_grad():
        for p in model.ais_head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for variant in variants_for(cfg.model):
        variant.merge(sam)
    emb = torch.randn(2, 256, 64, 64)
    index = torch.arange(2)
    with torch.no_grad():
        want = model(emb, index, None)
    assert want.logits.shape == (2, 3, 256, 256) and want.iou is None
    out = tmp_path / "ais.pth"
    written = export_model(sam, model, cfg.model, out)
    assert written == [out, sidecar_path(out, "ais"), sidecar_path(out, MANIFEST, ".json")]
    assert json.loads(sidecar_path(out, MANIFEST, ".json").read_text())["sidecars"] == ["ais"]
    state = torch.load(out, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in start.items())  # SAM itself is the starting one
    tuned = load_tuned(out)
    with torch.no_grad():
        got = tuned.model(emb, index, None)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.save({"state_dict": {"nope": torch.zeros(1)}}, sidecar_path(out, "ais"))
    with pytest.raises(ValueError, match="not a samtune AIS head file"):
        load_tuned(out)


def _ais_cfg(cache, *overrides):
    seed = int(cache.signature["checkpoint"].split(":")[1])
    return load_config(
        None,
        [
            "model.task=ais",
            f"model.init_seed={seed}",
            "data.images_per_batch=2",
            "optim.lr=1e-3",
            "run.eval_every=0",
            "run.save_every=0",
            "run.overlays=0",
            *overrides,
        ],
    )


def _losses(out) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "losses.jsonl").read_text().splitlines()]


@pytest.mark.slow  # the reference cache's build (shared by this file) and 12 steps: about a minute on 2 cores
def test_the_ais_task_learns_and_resumes_exactly(reference, tmp_path, monkeypatch):
    _, cache_path = reference
    cache = open_cache(cache_path)
    t = image_targets(cache, int(cache.images_with_objects("train")[0]))
    assert t.shape == (4, 256, 256) and 0 < float(t[0].mean()) < 1 and float(t[3].min()) == 0  # padding
    common = ["run.steps=6", "run.save_every=3", "optim.grad_accum=2", "data.images_per_batch=1"]
    run(cache_path, _ais_cfg(cache, *common), tmp_path / "a", progress=False)
    losses = _losses(tmp_path / "a")
    assert losses[-1] < 0.9 * losses[0]
    run(cache_path, _ais_cfg(cache, *common, "run.stop_at=3"), tmp_path / "b", progress=False)
    run(cache_path, _ais_cfg(cache, *common), tmp_path / "b", resume=True, progress=False)
    assert _losses(tmp_path / "b") == losses
    wa = load_file(ckpt.step_dir(tmp_path / "a", 6) / "model.safetensors")
    wb = load_file(ckpt.step_dir(tmp_path / "b", 6) / "model.safetensors")
    assert any(k.startswith("ais_head.") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return evaluate_ais(*args, **kwargs)

    # the run's task scores by evaluate_ais too: --auto ais must not score each model twice
    monkeypatch.setattr("trainer.ais.evaluate_ais", counted)
    monkeypatch.setattr("trainer.eval_run.evaluate_ais", counted)
    argv = ["eval", "--cache", str(cache_path), "--run", str(tmp_path / "a"), "--which", "last"]
    assert main([*argv, "--auto", "ais", "--overlays", "1", "--out", str(tmp_path / "eval")]) == 0
    assert len(calls) == 2  # start and tuned, once each
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for label in ("start", "tuned"):
        assert metrics[label]["auto"]["method"] == "ais" and metrics[label]["auto"]["n_true"] > 0
    assert "| tuned | ais |" in (tmp_path / "eval" / "table.md").read_text()


@torch.no_grad()
def _set_object_detector(head: AisHead, cache, store: ImageStore, images: np.ndarray) -> None:
    """Hand-set ``head`` to find the objects of the random vit_tiny cache: its first conv projects each
    embedding pixel on the objects' mean minus the background's (from the cache's masks of ``images``), the
    rest carries that one map up to the output (GroupNorm standardises it per image, the transposed convs
    repeat it 2x2), and the output is foreground with both distances low where it is high, so each object
    region seeds an instance."""
    emb = store.embeddings(images).float().permute(0, 2, 3, 1)  # (B, 64, 64, 256)
    fg = torch.stack([image_targets(cache, int(i))[0] for i in images]).float()  # (B, 256, 256)
    fg = torch.nn.functional.avg_pool2d(fg[:, None], 4)[:, 0] > 0.5  # at the embedding's 64 x 64
    direction = emb[fg].mean(0) - emb[~fg].mean(0)
    body = head.body
    for layer in (body[0][0], body[1], body[2][0], body[3], body[4][0], body[5]):
        layer.weight.zero_()
        layer.bias.zero_()
    body[0][0].weight[:, :, 1, 1] = direction
    body[1].weight[0] = 1  # (in, out, 2, 2): input channel 0 to every output channel and sub-pixel
    body[2][0].weight[:, 0, 1, 1] = 1
    body[3].weight[0] = 1
    body[4][0].weight[:, 0, 1, 1] = 1
    body[5].weight[:, 0, 0, 0] = torch.tensor([10.0, -10.0, -10.0])
    body[5].bias.copy_(torch.tensor([-5.0, 5.0, 5.0]))


@pytest.mark.slow  # shares the reference cache's build
def test_auto_segmenter_of_an_ais_export_equals_eval_labels(reference, tmp_path):
    _, cache_path = reference
    cache = open_cache(cache_path)
    cfg = _ais_cfg(cache)
    sam = build_start_sam(cfg)
    model = build_trainable(sam, cfg).eval()
    images = cache.images_with_objects("all")[:2]
    store = ImageStore(cache, "host", torch.device("cpu"))
    _set_object_detector(model.ais_head, cache, store, images)
    out = tmp_path / "ais.pth"
    export_model(sam, model, cfg.model, out)
    scores, labels = evaluate_ais(model, store, images, Accelerator(cpu=True), keep=len(images))
    assert scores["method"] == "ais" and scores["n_images"] == len(images)
    segmenter = AutoSegmenter(out, device="cpu")
    for i in images.tolist():
        got = segmenter.segment(image_file(cache, i))
        assert got.dtype == np.int32 and got.shape == tuple(cache.original_size[i])
        np.testing.assert_array_equal(got, labels[i])
        assert got.max() > 1  # several instances: the equality covers the watershed's split


def test_the_head_reads_the_encoder_tails_output_on_a_partial_cache(one_image_caches):
    """With ``model.encoder_tail_blocks``, the AIS head reads the tail's output on the cache's tap tokens
    (the one forward): moving the tail's LoRA moves the ``(1, 3, 256, 256)`` maps."""
    cache = open_cache(one_image_caches("instance"))
    cfg = load_config(None, ["model.task=ais", "model.encoder_tail_blocks=1", "model.encoder_adapter=lora"])
    cfg = TASKS[cfg.model.task].resolve(cfg, cache)
    model = build_trainable(build_start_sam(cfg), cfg).eval()
    tap, index = torch.from_numpy(cache.read_tap([0])).float(), torch.zeros(1, dtype=torch.long)
    torch.manual_seed(0)
    with torch.no_grad():
        before = model(tap, index, None).logits
        lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_b")]
        assert lora_b  # the tail carries the adapters
        for p in lora_b:
            p.add_(torch.randn_like(p) * 0.05)
        after = model(tap, index, None).logits
    assert before.shape == after.shape and before.shape[:2] == (1, 3)
    assert (after - before).abs().max() > 1e-3


def test_coverage_targets_are_the_original_maps_averaged_over_each_pixels_footprint(tmp_path):
    """``data.targets=coverage`` (the default): the foreground target of a low-res pixel is the share of its
    footprint in the original image that objects cover (written out the slow way: every original pixel split
    into ``h x w`` parts, counted per input pixel, then over each 4 x 4 block's valid input pixels), at the
    synthetic images' fractional ratios; the distances are the original maps averaged the same way; the
    nearest rule's maps stay what they were; the weights do not depend on the rule."""
    from embedcache.build import BuildConfig, build_cache
    from embedcache.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", n_images=2, seed=3, max_objects=4)
    build_cache(BuildConfig(data=data, out=tmp_path / "c.zarr", model_type="vit_tiny", progress=False))
    cache = open_cache(tmp_path / "c.zarr")
    for i in range(cache.num_images):
        soft, hard = image_targets(cache, i).float(), image_targets(cache, i, "nearest").float()
        (big_h, big_w), (h, w) = cache.original_size[i], cache.input_size[i]
        lo, hi = cache.object_range(i)
        full = np.zeros((big_h, big_w), np.int64)
        for m in cache.masks(np.arange(lo, hi), "original"):
            full |= m
        rows = np.repeat(full, h, axis=0).reshape(h, big_h, big_w).sum(1)
        share = np.repeat(rows, w, axis=1).reshape(h, w, big_w).sum(2) / (big_h * big_w)  # (h, w)
        ih, iw = -(-h // 4), -(-w // 4)
        padded, valid = np.zeros((ih * 4, iw * 4)), np.zeros((ih * 4, iw * 4))
        padded[:h, :w], valid[:h, :w] = share, 1
        want = padded.reshape(ih, 4, iw, 4).sum((1, 3)) / valid.reshape(ih, 4, iw, 4).sum((1, 3))
        np.testing.assert_allclose(soft[0, :ih, :iw].numpy(), want, atol=1e-3)  # float16 targets
        assert ((soft[0] > 0) & (soft[0] < 1)).any()  # soft on the edges
        assert torch.equal(soft[3], hard[3])
        inside = soft[0] > 0.99
        assert (soft[2][inside] < 1).all() and (soft[1:3][:, soft[0] == 0] == 1).all()
        lowres = cache.masks(np.arange(lo, hi), "lowres").any(0)
        assert torch.equal(hard[0] > 0, torch.from_numpy(lowres))
        agree = ((soft[0] >= 0.5) == (hard[0] > 0)).float().mean()
        assert agree > 0.98
