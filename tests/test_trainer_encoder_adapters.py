"""Training with an encoder tail on a partial vit_tiny cache: LoRA merges into plain SAM weights, Conv-LoRA
exports beside them and reloads through ``trainer.adapted``; both reproduce eval's masks; resume is exact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from segment_anything import SamPredictor

from embedcache import open_cache
from embedcache.build import BuildConfig, build_cache
from embedcache.models import build_sam
from embedcache.synthetic import make_dataset
from embedcache.tap import run_tail, split_tail
from trainer import checkpoint as ckpt
from trainer.cli import main
from trainer.config import load_config
from trainer.conv_lora import ConvLoRALinear
from trainer.data import ImageStore
from trainer.evaluate import iou_and_dice, predict_objects
from trainer.model import tuned_sam
from trainer.prompts import step_generator
from trainer.session import setup, train_step
from trainer.train import run
from trainer.tuned import load_tuned, sidecar_path

BASE = [
    "data.max_objects=2",
    "data.images_per_batch=2",
    "run.eval_every=0",
    "run.save_every=0",
    "run.overlays=0",
    "loss.focal=0",
    "loss.bce=1",
    "optim.lr=3e-3",
    "optim.warmup=0.1",
    "model.encoder_tail_blocks=1",
    "model.conv_lora_scales=[1,2,3]",
]


@pytest.fixture(scope="module")
def data_and_cache(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    data = make_dataset(root / "data", n_images=6, seed=1)
    out = root / "k1.zarr"
    build_cache(
        BuildConfig(
            data=data,
            out=out,
            model_type="vit_tiny",
            device="cpu",
            val_fraction=0.34,
            progress=False,
            tail_blocks=1,
        )
    )
    return data, out


@pytest.fixture(scope="module", params=["lora", "conv_lora"])
def trained(request, data_and_cache, tmp_path_factory) -> tuple[str, Path]:
    _, cache = data_and_cache
    out = tmp_path_factory.mktemp("runs") / request.param
    cfg = load_config(None, [*BASE, f"model.encoder_adapter={request.param}", "run.steps=6"])
    run(cache, cfg, out, progress=False)
    return request.param, out


def _predictor_on_cached_tap(sam, cache, image: int) -> SamPredictor:
    """``SamPredictor`` on ``sam`` with the features its own tail makes from the cached tap tokens."""
    predictor = SamPredictor(sam)
    tap = torch.from_numpy(cache.read_tap([image])).float()
    with torch.no_grad():
        predictor.features = run_tail(split_tail(sam.image_encoder, 1), tap)
    predictor.original_size = tuple(int(v) for v in cache.original_size[image])
    predictor.input_size = tuple(int(v) for v in cache.input_size[image])
    predictor.is_image_set = True
    return predictor


# with the trained fixture about 1 min a parameter on 2 cores: make test keeps under 15 min (an export
# round trip with an encoder tail, Conv-LoRA and decoder LoRA runs in tests/test_trainer_variants.py)
@pytest.mark.slow
def test_export_reloads_and_sam_predictor_reproduces_eval(trained, data_and_cache, tmp_path):
    adapter, run_dir = trained
    data, cache_path = data_and_cache
    out = tmp_path / "tuned.pth"
    assert main(["export", str(run_dir), "--out", str(out), "--which", "last"]) == 0
    plain = build_sam("vit_tiny", out)  # strict: SAM's own keys, whatever the adapter
    start = build_sam("vit_tiny")
    qkv = "blocks.1.attn.qkv.weight"
    changed = not torch.equal(plain.image_encoder.state_dict()[qkv], start.image_encoder.state_dict()[qkv])
    assert changed == (adapter == "lora")  # LoRA merged into qkv; Conv-LoRA's qkv is the frozen base
    assert not torch.equal(plain.image_encoder.neck[0].weight, start.image_encoder.neck[0].weight)  # tuned
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):  # the frozen prefix is the start's
        assert torch.equal(plain.image_encoder.state_dict()[name], start.image_encoder.state_dict()[name])
    assert sidecar_path(out, "conv_lora").is_file() == (adapter == "conv_lora")
    sam = load_tuned(out).sam  # the manifest names the preset and the sidecars
    assert isinstance(sam.image_encoder.blocks[1].attn.qkv, ConvLoRALinear) == (adapter == "conv_lora")

    cfg = load_config(run_dir / "config.yaml")
    _, tuned = tuned_sam(cfg, ckpt.resolve_weights(run_dir, "last"))
    cache = open_cache(cache_path)
    store = ImageStore(cache, "host", torch.device("cpu"), tail_blocks=1)
    image = int(cache.images_with_objects("val")[0])
    ours = predict_objects(tuned, store, image, "box", torch.device("cpu"))
    lo, hi = cache.object_range(image)
    # 1) on the cached tap tokens: exactly eval's masks
    predictor = _predictor_on_cached_tap(sam, cache, image)
    logits = []
    for j, mask in zip(range(lo, hi), ours):
        theirs, _, low = predictor.predict(box=cache.objects.box[j], multimask_output=False)
        assert np.array_equal(theirs[0], mask), f"object {j}: {np.sum(theirs[0] != mask)} pixels differ"
        logits.append(low)
    # 2) from the image, through the whole exported encoder in float32 (the cache's tap is float16)
    from PIL import Image

    with Image.open(data / "images" / f"{cache.image_id[image]}.png") as im:
        predictor.set_image(np.asarray(im.convert("RGB")))
    for j, mask, want in zip(range(lo, hi), ours, logits):
        theirs, _, low = predictor.predict(box=cache.objects.box[j], multimask_output=False)
        assert iou_and_dice(theirs[0], mask)[0] > 0.98, j
        assert np.linalg.norm(low - want) < 1e-2 * np.linalg.norm(want), j


def _train_box_bce(sam, cache, n_images: int = 2) -> float:
    """Mean per-pixel BCE of ``sam``'s box-prompted single-mask logits (original frame, ``SamPredictor`` on
    the cached tap tokens, one batched call per image) against the objects' masks of the first ``n_images``
    training images: the run's training loss (loss.bce=1), per object, averaged."""
    losses = []
    for image in cache.images_with_objects("train")[:n_images].tolist():
        predictor = _predictor_on_cached_tap(sam, cache, image)
        lo, hi = cache.object_range(image)
        boxes = torch.from_numpy(cache.objects.box[lo:hi])
        boxes = predictor.transform.apply_boxes_torch(boxes, predictor.original_size)
        logits, _, _ = predictor.predict_torch(None, None, boxes, multimask_output=False, return_logits=True)
        truth = torch.from_numpy(np.stack(cache.masks(np.arange(lo, hi), "original"))).float()
        losses.append(F.binary_cross_entropy_with_logits(logits[:, 0], truth, reduction="none").mean((1, 2)))
    return torch.cat(losses).mean().item()


# conv_lora by default: it has LoRA's A and B plus the routers, the experts and the balance term (lora alone
# is slow: make test keeps under 15 min)
@pytest.mark.parametrize("adapter", [pytest.param("lora", marks=pytest.mark.slow), "conv_lora"])
def test_one_step_moves_every_weight_by_adamw_on_the_gradient_of_the_training_loss(
    data_and_cache, adapter, tmp_path
):
    """``train_step``'s first update of an encoder-adapted model against the gradient of the same loss taken
    here on its own: the micro-batch the step drew, its prompts (the step's generator) and router noise, the
    task's loss plus the variants' terms, ``torch.autograd.grad`` on a copy of the model from before the step.

    AdamW's first step moves each weight ``w`` by ``-lr * (g / (|g| + eps) + weight_decay * w)`` (checked
    where ``|g| > 100 eps``; never by more than ``lr`` plus the decay), so a zero, random, sign-flipped or
    misrouted adapter update fails, as does a loss term left out of the step. At ``B = 0`` the adapters'
    ``B`` has a gradient and ``A`` none; ``B`` must move."""
    _, cache = data_and_cache
    args = [*BASE, f"model.encoder_adapter={adapter}", "run.steps=1", "optim.clip_norm=0"]
    cfg = load_config(None, [*args, "data.images_per_batch=1", "data.max_objects=1"])  # one tail pass
    s = setup(cache, cfg, tmp_path / "run", cpu=True)
    with s.lock:
        s.model.train()
        before = copy.deepcopy(s.model)  # one CPU process: the model is not DDP-wrapped
        loader, drawn = s.loader, []
        s.loader = (drawn.append(batch) or batch for batch in loader)
        stats = train_step(s)
        loader.close()
    assert ("conv_lora_balance" in stats.logged) == (adapter == "conv_lora")

    g = step_generator(cfg.run.seed, 0, 0, s.device)  # micro-step 0 of rank 0, as train_step draws it
    for variant in s.variants:
        variant.before_micro_step(before, g)
    loss, _ = s.task.loss(before, drawn[0], g, s.accelerator)
    loss = loss + sum(t for variant in s.variants for t in variant.loss_terms(before).values())
    trained = {n: p for n, p in before.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(trained.values()), allow_unused=True)
    after = dict(s.model.named_parameters())
    assert set(trained) == {n for n, p in after.items() if p.requires_grad}
    lr, eps, decay = stats.lr, 1e-8, cfg.optim.weight_decay  # eps: torch's AdamW default
    # not in the step's graph (a Conv-LoRA expert the routers did not pick): not stepped, not even decayed
    unused = [name for name, grad in zip(trained, grads) if grad is None]
    assert all(torch.equal(after[name], trained[name]) for name in unused), unused
    used = [(name, grad) for name, grad in zip(trained, grads) if grad is not None]
    step = torch.cat([(after[n] - trained[n] * (1 - lr * decay)).detach().flatten() for n, _ in used])
    grad = torch.cat([g.flatten() for _, g in used])
    sure = grad.abs() > 100 * eps  # below, g / (|g| + eps) hangs on the gradient's last bits
    want = -lr * grad[sure] / (grad[sure].abs() + eps)
    torch.testing.assert_close(step[sure], want, rtol=0, atol=1e-3 * lr)
    assert step.abs().max() <= lr * (1 + 1e-3)
    moved = [n for n in trained if n.startswith("encoder_tail.") and n.endswith("lora_b")]
    assert moved and all((after[n] != 0).any() for n in moved)  # B left zero: the adapter would do nothing


@pytest.mark.slow
def test_the_adapter_update_is_a_descent_direction_of_the_training_loss(trained, data_and_cache, tmp_path):
    """What the adapter is for, not only that it moved: with the decoder as tuned, the training loss falls
    from the adapter switched off (B = 0) to the tuned B and rises to -B (the update reversed), ~1.3e-4 each
    way on 2 images after 6 steps. A sign-flipped update fails; a random one still passes half the time.
    Slow: 6 encoder-tail passes per adapter (23-30 s on 2 loaded cores)."""
    _, run_dir = trained
    weights = load_file(ckpt.resolve_weights(run_dir, "last"))
    cfg, cache = load_config(run_dir / "config.yaml"), open_cache(data_and_cache[1])
    losses = []
    for scale in (1.0, 0.0, -1.0):
        path = tmp_path / f"b_times_{scale}.safetensors"
        scaled = {
            k: v * scale if k.startswith("encoder_tail.") and k.endswith("lora_b") else v
            for k, v in weights.items()
        }
        save_file(scaled, path)
        losses.append(_train_box_bce(tuned_sam(cfg, path)[0], cache))
    assert losses[0] < losses[1] < losses[2], losses


@pytest.mark.slow  # three short runs, about 40 s on 2 cores; exact resume is tested fast in test_trainer_run
def test_conv_lora_resume_gives_the_same_losses_and_weights(data_and_cache, tmp_path):
    """The router's training noise comes from torch's RNG, which accelerate's checkpoint restores."""
    _, cache = data_and_cache
    common = [*BASE, "model.encoder_adapter=conv_lora", "run.steps=4", "run.save_every=2"]
    common += ["data.images_per_batch=1", "data.max_objects=1", "optim.grad_accum=2"]
    run(cache, load_config(None, common), tmp_path / "a", progress=False)
    run(cache, load_config(None, [*common, "run.stop_at=2"]), tmp_path / "b", progress=False)
    run(cache, load_config(None, common), tmp_path / "b", resume=True, progress=False)
    rows_a = [json.loads(ln) for ln in (tmp_path / "a" / "losses.jsonl").read_text().splitlines()]
    rows_b = [json.loads(ln) for ln in (tmp_path / "b" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    wa = load_file(ckpt.step_dir(tmp_path / "a", 4) / "model.safetensors")
    wb = load_file(ckpt.step_dir(tmp_path / "b", 4) / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_tail_needs_a_partial_cache_with_the_same_k(data_and_cache, tmp_path, capsys):
    _, cache = data_and_cache
    args = ["run", "--cache", str(cache), "--out", str(tmp_path / "r"), *BASE, "run.steps=1"]
    assert main([*args, "model.encoder_tail_blocks=2", "model.encoder_adapter=lora"]) == 2
    assert "model.encoder_tail_blocks=2 needs a cache built with --tail-blocks 2" in capsys.readouterr().err
