"""SAM's automatic mask generator (AMG) on a cached embedding: every object of an image without prompts.

The recipe is ``SamAutomaticMaskGenerator`` on the whole image (no crop layers): a regular grid of single
positive points, each decoded with the multimask output (3 masks per point), masks kept when their predicted
IoU is above ``pred_iou_thresh`` and their stability score (the IoU of the mask thresholded at ``+offset``
and at ``-offset``) at least ``stability_score_thresh``, then box NMS at ``box_nms_thresh`` ranked by
predicted IoU. The pieces segment_anything has are used as they are (``build_point_grid``,
``calculate_stability_score``, ``batched_mask_to_box``, the RLE helpers, ``MaskData``).

What differs from ``SamAutomaticMaskGenerator``:

- the embedding is the cache's (or a fresh one from ``trainer.automatic``), never re-encoded;
- the points go through the model's own forward (``PromptedDecoder``: ``image_embeddings`` once, then
  ``decode_prompts`` once per chunk of ``points_per_batch`` points), so LoRA, a tuned decoder or an encoder
  tail predict as they train; point-only prompts are padded as ``PromptEncoder`` pads them, so for a plain
  SAM the masks are ``SamAutomaticMaskGenerator``'s (tested);
- ``grid_candidates`` keeps every candidate above a floor (RLE, predicted IoU, stability, box), so that
  ``select`` can re-score other thresholds without decoding again (``--amg-sweep``);
- the result is one ``(H, W)`` int32 label image: masks are painted largest first, so a small object on top
  of a large one stays visible (micro-sam's rule for turning AMG masks into instances), ids 1..n.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from segment_anything.utils.amg import (
    MaskData,
    area_from_rle,
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
    mask_to_rle_pytorch,
    rle_to_mask,
)
from torchvision.ops import batched_nms

from trainer.decoder import PromptedDecoder
from trainer.evaluate import postprocess
from trainer.prompts import Prompts, to_input_frame


@dataclass(frozen=True, kw_only=True)
class AmgConfig:
    """``SamAutomaticMaskGenerator``'s settings (its defaults) for one crop layer."""

    points_per_side: int = 32
    """Grid points along each side of the image: ``points_per_side**2`` prompts."""
    points_per_batch: int = 64
    """Points per decoder call; memory grows with it (3 masks each, upsampled to the original size)."""
    pred_iou_thresh: float = 0.88
    """Keep a mask when its predicted IoU is above this."""
    stability_score_thresh: float = 0.95
    """Keep a mask when its stability score is at least this."""
    stability_score_offset: float = 1.0
    """The logit offset the stability score thresholds at, either side of 0."""
    box_nms_thresh: float = 0.7
    """Box IoU above which the lower-rated of two masks is dropped."""

    def __post_init__(self):
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError(
                f"points_per_side and points_per_batch must be >= 1, got {self.points_per_side}, "
                f"{self.points_per_batch}"
            )
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


SWEEP = {"pred_iou_thresh": (0.0, 0.2, 0.5, 0.7, 0.88), "stability_score_thresh": (0.6, 0.8, 0.9, 0.95)}
"""The thresholds ``--amg-sweep`` re-scores, every pair of them, from one decoding per image. Predicted IoU
goes down to 0: a model tuned on boxes only (LiteMedSAM) rates its single-point masks far below SAM's 0.88
(0.1 to 0.2 on isbi2012 cells), and SAM's default then keeps nothing."""


def sweep_configs(cfg: AmgConfig) -> list[AmgConfig]:
    """``cfg`` with every pair of ``SWEEP`` thresholds (the rest of ``cfg`` unchanged)."""
    return [
        AmgConfig(**{**cfg.__dict__, "pred_iou_thresh": i, "stability_score_thresh": s})
        for i, s in product(SWEEP["pred_iou_thresh"], SWEEP["stability_score_thresh"])
    ]


@torch.no_grad()
def grid_candidates(
    model: PromptedDecoder,
    embedding: torch.Tensor,
    input_hw: tuple[int, int],
    original_hw: tuple[int, int],
    side: int,
    cfg: AmgConfig,
    *,
    floor: tuple[float, float] | None = None,
) -> MaskData:
    """Every grid point's three multimask outputs on one image, above a floor, at the original size.

    Args:
        model: a prompted decoder with SAM's mask and IoU heads (not a semantic head).
        embedding: ``(1, 256, 64, 64)`` image embedding, or the ``(1, 64, 64, C)`` tap tokens of a model with
            an encoder tail (``image_embeddings`` runs it once here).
        input_hw: the image's size in the input frame (after the preset's resize, before padding).
        original_hw: the image's original size ``(H, W)``.
        side: the preset's square input side (1024 for SAM, 256 for LiteMedSAM).
        floor: ``(pred_iou, stability)`` below which candidates are dropped here; default ``cfg``'s
            thresholds. ``select`` can then apply any thresholds at or above it.

    Returns:
        ``MaskData`` with ``rles`` (list of uncompressed RLEs at ``original_hw``), ``iou_preds`` ``(N,)``,
        ``stability_score`` ``(N,)``, ``boxes`` ``(N, 4)`` xyxy and ``points`` ``(N, 2)`` x, y in original
        pixels, for the N candidates above the floor.
    """
    if model.semantic_head is not None:
        raise ValueError("AMG needs SAM's mask and IoU heads; this model has a semantic head")
    iou_floor, stab_floor = floor or (cfg.pred_iou_thresh, cfg.stability_score_thresh)
    device = next(model.parameters()).device
    embedding = model.image_embeddings(embedding.to(device).float())  # once for every chunk
    oh, ow = original_hw
    points = build_point_grid(cfg.points_per_side) * np.array([ow, oh])  # SAM scales the grid to the image
    out = MaskData(
        iou_preds=torch.zeros(0, device=device),
        points=torch.zeros(0, 2, device=device),
        stability_score=torch.zeros(0, device=device),
        boxes=torch.zeros(0, 4, device=device),
        rles=[],
    )
    for lo in range(0, len(points), cfg.points_per_batch):
        xy = points[lo : lo + cfg.points_per_batch]
        n = len(xy)
        prompts = Prompts(
            point_coords=torch.as_tensor(
                to_input_frame(xy, original_hw, input_hw), dtype=torch.float32, device=device
            )[:, None],
            point_labels=torch.ones(n, 1, dtype=torch.int64, device=device),
            boxes=None,
            has_box=None,
        )
        decoded = model.decode_prompts(embedding, torch.zeros(n, dtype=torch.long, device=device), prompts)
        # (n * 3, H, W) logits of the multimask outputs, point after point as SAM flattens them
        logits = postprocess(decoded.logits[:, 1:].float(), input_hw, original_hw, side).flatten(0, 1)
        batch = MaskData(
            iou_preds=decoded.iou[:, 1:].float().flatten(),
            points=torch.as_tensor(xy, dtype=torch.float32).repeat_interleave(3, 0).to(device),
            stability_score=calculate_stability_score(logits, 0.0, cfg.stability_score_offset),
        )
        keep = (batch["iou_preds"] > iou_floor) & (batch["stability_score"] >= stab_floor)
        batch.filter(keep)
        masks = logits[keep] > 0
        batch["boxes"] = batched_mask_to_box(masks).float()
        batch["rles"] = mask_to_rle_pytorch(masks)
        out.cat(batch)
    return out


def select(candidates: MaskData, cfg: AmgConfig) -> MaskData:
    """The candidates that pass ``cfg``'s thresholds, then box NMS ranked by predicted IoU (a new
    ``MaskData``; ``candidates`` is left as it is)."""
    keep = (candidates["iou_preds"] > cfg.pred_iou_thresh) & (
        candidates["stability_score"] >= cfg.stability_score_thresh
    )
    chosen = MaskData(**{k: v for k, v in candidates.items()})
    chosen.filter(keep)
    nms = batched_nms(
        chosen["boxes"].float(),
        chosen["iou_preds"],
        torch.zeros(len(chosen["boxes"]), device=chosen["boxes"].device),
        iou_threshold=cfg.box_nms_thresh,
    )
    chosen.filter(nms)
    return chosen


def to_labels(masks: MaskData, original_hw: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` int32 instance labels from selected masks: painted largest first, so that smaller masks
    stay on top, then numbered 1..n in painting order among those still visible."""
    labels = np.zeros(original_hw, np.int32)
    order = sorted(range(len(masks["rles"])), key=lambda k: -area_from_rle(masks["rles"][k]))
    for k, j in enumerate(order, 1):
        labels[rle_to_mask(masks["rles"][j])] = k
    present = np.unique(labels)
    present = present[present > 0]
    remap = np.zeros(len(order) + 1, np.int32)
    remap[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return remap[labels]


def amg_labels(
    model: PromptedDecoder,
    embedding: torch.Tensor,
    input_hw: tuple[int, int],
    original_hw: tuple[int, int],
    side: int,
    cfg: AmgConfig | None = None,
) -> np.ndarray:
    """``(H, W)`` int32 instance labels of one image at its original size by AMG with ``cfg`` (default
    SAM's settings); see ``grid_candidates`` for the arguments."""
    cfg = cfg or AmgConfig()
    candidates = grid_candidates(model, embedding, input_hw, original_hw, side, cfg)
    return to_labels(select(candidates, cfg), original_hw)
