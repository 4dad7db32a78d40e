"""The instance task: one prompted mask per object, as SAM trains and as ``SamPredictor`` is used.

Every micro-batch draws fresh prompts (jittered boxes and/or points) and runs SAM's interactive training:
a first round, then corrective-click rounds, each one batched prompt-encoder + mask-decoder call with
gradients, every round's loss summed (docs/training.md compares it with the SAM paper's recipe). Validation
is box and point mIoU at the original resolution (``trainer.evaluate``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import kernels
from trainer.config import Config
from trainer.data import Batch, ImageStore, image_file
from trainer.decoder import Decoded
from trainer.evaluate import Contender, evaluate, iou_and_dice, predict_objects
from trainer.losses import instance_loss
from trainer.plots import overlay
from trainer.prompts import (
    Prompts,
    box_prompts,
    corrective_click,
    initial_prompts,
    restart_with_click,
    single_point,
)


class InstanceTask:
    """SAM's own training: prompts from each object's mask, one mask (or SAM's three) per prompt."""

    reads_labels = False
    head = None
    scores_plain_sam = True
    scored_by_auto = None
    sweep_metrics = ("mean", "box", "point")  # box or point mIoU, or their mean
    score_name = "box mIoU"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @staticmethod
    def check(cfg: Config) -> None:
        if cfg.loss.ce > 0:
            raise ValueError("loss.ce is the semantic task's loss; set model.task=semantic")

    @staticmethod
    def resolve(cfg: Config, cache) -> Config:
        return cfg

    def train_images(self, cache) -> np.ndarray:
        return cache.images_with_objects("train")  # an image without objects has nothing to prompt

    def loss(
        self, model: nn.Module, batch: Batch, g: torch.Generator, accelerator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch with fresh prompts: SAM's interactive training, summed over rounds.

        With ``data.hardest_of``, the batch's candidates are first cut to each image's ``max_objects`` worst
        segmented from their boxes (``hardest_objects``; with ``data.hardest_starts=box`` only the box starts
        are, ``hardest_box_starts``). Round 0 is the drawn box or click(s). Each of the
        ``prompts.corrective_rounds`` rounds after it adds
        one click from the error region of the previous round's shown mask and, with probability
        ``prompts.mask_prompt_prob`` per object, that mask's detached logits as the mask prompt; with
        ``prompts.click_restart``, a share of the box starts is re-prompted by one click alone in the first
        corrective round instead (``restart_with_click``). Every round
        is one batched decoder call inside one forward of the (DDP-wrapped) model, and every round's loss
        counts (``instance_loss``: single-point prompts on the multimask outputs, the rest on output 0), an
        object started from clicks weighted by ``loss.point_start`` (and its corrective rounds by
        ``loss.point_refine`` on top).
        """
        p = self.cfg.prompts
        d, has_box = self.cfg.data, None
        if d.hardest_of and d.hardest_starts == "box":
            batch, has_box = hardest_box_starts(
                model, batch, d.max_objects, p.box_fraction, g, self.cfg.loss.backend
            )
        elif d.hardest_of:
            batch = hardest_objects(model, batch, d.max_objects, self.cfg.loss.backend)
        masks = batch.prompt_masks()
        asked = [initial_prompts(masks, batch.boxes, batch.valid_hw, p, g, has_box)]

        def refine(r: int, out: Decoded, prompts: Prompts) -> Prompts | None:
            if r == p.corrective_rounds:
                return None
            shown = out.shown(self.multimask(prompts)).detach()
            nxt = corrective_click(
                prompts, shown, masks, batch.valid_hw, g, mask_prompt_prob=p.mask_prompt_prob
            )
            if r == 0 and p.click_restart > 0:
                nxt = restart_with_click(nxt, masks, p.click_restart, g)
            asked.append(nxt)
            return nxt

        rounds = model(batch.embeddings, batch.image_index, asked[0], refine=refine)
        # (P,) 1 for a box start; for a click start loss.point_start in the first round and
        # loss.point_start * loss.point_refine in the corrective rounds (x 1.0 is exact)
        c = self.cfg.loss
        box_start = asked[0].has_box
        first = torch.where(box_start, 1.0, c.point_start)
        later = torch.where(box_start, 1.0, c.point_start * c.point_refine)
        # the loss's targets: the objects' coverage (data.targets: coverage) or their bool masks
        soft = batch.targets is not None
        targets = batch.targets if soft else batch.masks
        total, per_round = 0.0, []
        for r, (out, prompts) in enumerate(zip(rounds, asked)):
            multimask = self.multimask(prompts)
            weight = first if r == 0 else later
            loss, logged = instance_loss(
                out.logits, out.iou, targets, batch.valid_hw, c, multimask, weight, soft=soft
            )
            total = total + loss
            per_round.append(logged)
        logged = {k: torch.stack([r[k] for r in per_round]).mean() for k in per_round[0]}
        if len(per_round) > 1:
            logged.update(iou_first=per_round[0]["iou"], iou_last=per_round[-1]["iou"])
        return total, logged

    def multimask(self, prompts: Prompts) -> torch.Tensor:
        """``(P,)`` bool: the objects trained (and shown) on the multimask outputs."""
        return single_point(prompts) & self.cfg.prompts.multimask

    def prompts_in(self, batch: Batch) -> int:
        if not self.cfg.data.hardest_of:
            return batch.num_objects
        # the objects hardest_objects keeps: at most max_objects of each image's candidates
        per_image = torch.bincount(batch.image_index, minlength=len(batch.image_ids))
        return int(per_image.clamp(max=self.cfg.data.max_objects).sum())

    def validate(self, model: nn.Module, store: ImageStore, images: np.ndarray, accelerator) -> dict:
        return evaluate(model, store, images, accelerator)

    def evaluate(
        self,
        model: nn.Module,
        store: ImageStore,
        images: np.ndarray,
        accelerator,
        *,
        clicks: int,
        mask_prompt,
    ) -> dict:
        return evaluate(
            model, store, images, accelerator, per_object=True, clicks=clicks, mask_prompt=mask_prompt
        )

    def score(self, metrics: dict) -> float:
        return metrics["box"]["miou"]

    def overlays(
        self, folder: Path, images: np.ndarray, first: Contender, second: Contender, n: int
    ) -> list[Path]:
        return box_overlays(folder, images, first, second, n)


def hardest_objects(model: nn.Module, batch: Batch, keep: int, backend: str = "auto") -> Batch:
    """The ``keep`` objects of each image the model segments worst from their boxes (``data.hardest_of``).

    Every object of ``batch`` is predicted from its tight box (output 0, no gradient, one decoder call) and
    scored by its hard IoU against the loss's targets; per image the ``keep`` lowest (ties in object order)
    stay, in their order in ``batch``. An image with ``keep`` objects or fewer keeps all of them. One host
    read (the kept crops' size).

    Args:
        model: the (DDP-wrapped) model being trained, in the state the step's update starts from.
        batch: on its device, masks pasted (``Batch.to``); ``P`` candidate objects.
    Returns:
        the batch of the kept objects (``Batch.select``).
    """
    iou = box_iou_now(model, batch, backend)
    # rank within each image by IoU, lowest first: a stable sort by image, then IoU (IoU is in [0, 1])
    order = torch.sort(batch.image_index.double() * 2 + iou.double(), stable=True).indices
    counts = torch.bincount(batch.image_index, minlength=len(batch.image_ids))
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(batch.num_objects, device=order.device) - first[batch.image_index[order]]
    return batch.select(torch.sort(order[rank < keep]).values)


def box_iou_now(model: nn.Module, batch: Batch, backend: str = "auto") -> torch.Tensor:
    """``(P,)`` the hard IoU of every object of ``batch`` predicted from its tight box by ``model`` as it is
    (output 0, no gradient, one decoder call), against the loss's targets."""
    with torch.no_grad():
        out = model(batch.embeddings, batch.image_index, box_prompts(batch.boxes))
        soft = batch.targets is not None
        targets = batch.targets if soft else batch.masks
        return kernels.mask_losses(out.logits[:, 0], targets, batch.valid_hw, backend=backend, soft=soft).iou


def hardest_box_starts(
    model: nn.Module, batch: Batch, keep: int, box_fraction: float, g: torch.Generator, backend: str = "auto"
) -> tuple[Batch, torch.Tensor]:
    """``data.hardest_starts=box``: the hardest candidates of each image start from their boxes, the click
    starts are ordinary ones (``box_start_rows`` on ``box_iou_now``).

    Args:
        batch: on its device, masks pasted (``Batch.to``); ``P`` candidate objects.
    Returns:
        the batch of the kept objects in their order in ``batch`` (``Batch.select``), and ``(P',)`` bool,
        which of them start from their box (``initial_prompts``'s ``has_box``).
    """
    iou = box_iou_now(model, batch, backend)
    rows, has_box = box_start_rows(
        iou.cpu(), batch.image_index.cpu(), len(batch.image_ids), keep, box_fraction, g
    )
    device = batch.image_index.device
    return batch.select(rows.to(device)), has_box.to(device)


def box_start_rows(
    iou: torch.Tensor,
    image_index: torch.Tensor,
    n_images: int,
    keep: int,
    box_fraction: float,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidates train and which of them start from their box, for ``hardest_box_starts``.

    Per image (in order), each of its ``min(keep, n)`` slots is a box start with probability ``box_fraction``
    (drawn from ``g``); the ``b`` box slots take the ``b`` candidates with the lowest IoU (ties in object
    order), the click slots a random draw from ``g`` among the rest.

    Args:
        iou: ``(P,)`` each candidate's box IoU, on the host; image_index: ``(P,)`` int64, its image.
    Returns:
        ``(P',)`` int64 rows into the candidates, ascending, and ``(P',)`` bool, box start or not.
    """
    rows, boxed = [], []
    for i in range(n_images):
        candidates = torch.nonzero(image_index == i)[:, 0]
        slots = min(keep, len(candidates))
        n_box = int((torch.rand(slots, generator=g, device=g.device) < box_fraction).sum())
        ranked = candidates[torch.sort(iou[candidates], stable=True).indices]
        rest = ranked[n_box:]
        clicks = rest[torch.randperm(len(rest), generator=g, device=g.device).cpu()[: slots - n_box]]
        rows += [ranked[:n_box], clicks]
        boxed += [torch.ones(n_box, dtype=torch.bool), torch.zeros(slots - n_box, dtype=torch.bool)]
    rows_t, boxed_t = torch.cat(rows), torch.cat(boxed)
    order = torch.sort(rows_t).indices
    return rows_t[order], boxed_t[order]


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
            channels=cache.signature["dataset"].get("channels"),
            title=str(cache.image_id[i]),
            labels=(first.label, second.label),
            scores=scores,
        )
        written.append(path)
    return written
