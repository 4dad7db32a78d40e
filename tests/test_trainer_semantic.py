"""The semantic task's loss points to the classes: a quick check that an all-background target, loss or
predictor cannot pass (the end-to-end learning run is ``test_semantic_mode_learns_the_foreground_classes``,
slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from embedcache import open_cache
from embedcache.build import BuildConfig, build_cache
from embedcache.synthetic import make_dataset
from trainer.config import DEFAULT_CONFIG, load_config
from trainer.data import ImageStore, read_batch
from trainer.model import build_start_sam, build_trainable
from trainer.prompts import step_generator
from trainer.task import TASKS, make_task

SEMANTIC = ["model.task=semantic", "model.semantic_prompt=box", "loss.ce=1", "loss.dice=1", "loss.focal=0"]


class _KeepLogits(nn.Module):
    """The model, keeping the class logits of its last forward (with their gradient after ``backward``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.logits: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.logits = out.logits
        self.logits.retain_grad()
        return out


def _semantic_cache(tmp_path: Path, *, n_images: int, seed: int) -> Path:
    """A vit_tiny cache of ``n_images`` synthetic images with semantic masks, all in the train split."""
    data = make_dataset(tmp_path / "data", n_images=n_images, seed=seed, kind="semantic")
    out = tmp_path / "c.zarr"
    kinds = dict(model_type="vit_tiny", device="cpu", mask_kind="semantic")
    build_cache(BuildConfig(data=data, out=out, **kinds, val_fraction=0.0, progress=False))
    return out


def test_the_semantic_loss_descends_toward_every_class_from_the_start(tmp_path):
    """At the start every class token is the same, so every pixel's class logits tie and the model predicts
    all background (validation mIoU 0). The first step follows the loss's gradient: the class each pixel
    gains most on, ``argmax(-dL/dlogits)``, must be its own class, for every class of the image (per-class
    IoU with the labels). With all-background targets, a loss blind to the foreground or a flipped sign, it
    is background or the wrong class everywhere, and this fails."""
    cache = open_cache(_semantic_cache(tmp_path, n_images=1, seed=1))
    cfg = TASKS["semantic"].resolve(load_config(None, SEMANTIC), cache)
    task = make_task(cfg)
    model = _KeepLogits(build_trainable(build_start_sam(cfg), cfg).train())
    store = ImageStore(cache, "host", torch.device("cpu"))
    batch = read_batch(store, task.train_images(cache), 2, 0, 0, semantic=True)
    loss, _ = task.loss(model, batch, step_generator(0, 0, 0, torch.device("cpu")), None)
    loss.backward()
    logits = model.logits[0]  # (C, 256, 256)
    torch.testing.assert_close(logits.amax(0), logits.amin(0))  # the start: the classes tie (all background)

    # the labels at the logits' grid (the input frame is S x S, the logits 256 x 256), inside the image
    labels = batch.labels[0]
    step = labels.shape[-1] // logits.shape[-1]
    h, w = (int(v) // step for v in batch.image_valid_hw[0])
    labels = labels[::step, ::step][:h, :w].numpy()
    gains = (-model.logits.grad[0]).argmax(0)[:h, :w].numpy()
    present = np.unique(labels[labels >= 0])
    assert len(present) >= 3, present  # background and at least two foreground classes
    ious = {
        int(c): np.logical_and(gains == c, labels == c).sum() / np.logical_or(gains == c, labels == c).sum()
        for c in present
    }
    assert min(ious.values()) > 0.5, ious


def test_a_semantic_sweep_scores_trials_by_the_semantic_miou(tmp_path):
    """``trainer sweep`` of a semantic recipe: each trial's rung score is its validation semantic mIoU on the
    held-out training images, what ``trainer run`` picks its best checkpoint by."""
    import json

    from trainer import checkpoint as ckpt
    from trainer.sweep import sweep

    path = _semantic_cache(tmp_path, n_images=4, seed=2)
    fast = ["model.model_type=vit_tiny", "model.checkpoint=null", "data.images_per_batch=1", "run.steps=1"]
    out = tmp_path / "sw"
    overrides = [*SEMANTIC, *fast, "data.hardest_of=0"]  # the default's hardest_of is the instance task's
    got = sweep(path, [DEFAULT_CONFIG], overrides, out, lrs=[1e-3], holdout=0.5, min_steps=1)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["metric"] == "semantic mIoU" and len(summary["held_out_images"]) == 2
    folder = ckpt.step_dir(out / "trials" / summary["best"], 1)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert summary["trials"][0]["scores"]["1"] == state["evals"]["1"]["semantic"]["miou"]
    assert "Validation semantic mIoU on 50% of the training images" in got["table"]
