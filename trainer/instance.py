"""The instance task: one prompted mask per object, as SAM trains and as ``SamPredictor`` is used.

Every micro-batch draws fresh prompts (jittered boxes and/or points), runs optional corrective-click rounds
without gradients, then ONE prompt-encoder + mask-decoder call with gradients, scored by SAM's focal + dice
+ IoU-head loss. Validation is box and point mIoU at the original resolution (``trainer.evaluate``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.config import Config
from trainer.data import Batch, ImageStore, image_file
from trainer.evaluate import Contender, evaluate, iou_and_dice, predict_objects
from trainer.losses import instance_loss
from trainer.plots import overlay
from trainer.prompts import corrective_click, initial_prompts


class InstanceTask:
    """SAM's own training: prompts from each object's mask, one mask (or SAM's three) per prompt."""

    reads_labels = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @staticmethod
    def resolve(cfg: Config, cache) -> Config:
        return cfg

    def train_images(self, cache) -> np.ndarray:
        return cache.images_with_objects("train")  # an image without objects has nothing to prompt

    def head(self, mask_decoder: nn.Module) -> None:
        return None

    def loss(
        self, model: nn.Module, batch: Batch, g: torch.Generator, accelerator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch, with fresh prompts; the only decoder call with gradients is the last.

        Corrective rounds run the unwrapped model under ``no_grad`` (its prediction only chooses the next
        click and mask prompt), then the final prompts go through the (DDP-wrapped) model once, with
        gradients.
        """
        p = self.cfg.prompts
        prompts = initial_prompts(batch.masks, batch.boxes, batch.valid_hw, p, g)
        plain = accelerator.unwrap_model(model)
        for _ in range(p.corrective_rounds):
            with torch.no_grad():
                logits, iou = plain(batch.embeddings, batch.image_index, prompts)
            # the mask the user would see: SAM's single output, or the multimask output it rates best
            pick = iou[:, 1:].argmax(1) + 1 if p.multimask else torch.zeros_like(iou[:, 0], dtype=torch.long)
            last = logits[torch.arange(logits.shape[0], device=logits.device), pick]
            prompts = corrective_click(
                prompts, last, batch.masks, batch.valid_hw, g, mask_prompt=p.mask_prompt
            )
        logits, iou = model(batch.embeddings, batch.image_index, prompts)
        sel = slice(1, 4) if p.multimask else slice(0, 1)
        loss, logged, _ = instance_loss(
            logits[:, sel], iou[:, sel], batch.masks, batch.valid_hw, self.cfg.loss
        )
        return loss, logged

    def prompts_in(self, batch: Batch) -> int:
        return batch.num_objects

    def validate(self, model: nn.Module, store: ImageStore, images: np.ndarray, accelerator) -> dict:
        return evaluate(model, store, images, accelerator)

    def score(self, metrics: dict) -> float:
        return metrics["box"]["miou"]

    def overlays(
        self, folder: Path, images: np.ndarray, first: Contender, second: Contender, n: int
    ) -> list[Path]:
        return box_overlays(folder, images, first, second, n)


def box_overlays(folder: Path, images: np.ndarray, first: Contender, second: Contender, n: int) -> list[Path]:
    """Image, ground truth and two models on box prompts, one PNG per image with objects, for up to ``n`` of
    ``images`` (cache indices); the files written."""
    cache = first.store.cache
    shown = np.intersect1d(images, cache.images_with_objects("all"))[:n].tolist()
    if shown:
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in shown:
        lo, hi = cache.object_range(i)
        gt = cache.masks(np.arange(lo, hi), "original")
        masks = [predict_objects(c.model, c.store, i, "box", c.store.device) for c in (first, second)]
        path = folder / f"{cache.image_id[i]}.png"
        scores = tuple(float(np.mean([iou_and_dice(p, g)[0] for p, g in zip(m, gt)])) for m in masks)
        overlay(
            gt,
            *masks,
            path,
            image_path=image_file(cache, i),
            title=str(cache.image_id[i]),
            labels=(first.label, second.label),
            scores=scores,
        )
        written.append(path)
    return written
