"""Prompt sampling in the preset's input frame (S x S pixels: 1024 for SAM, 256 for LiteMedSAM): jittered
boxes, points, corrective clicks, eval prompts.

Training prompts are drawn fresh every step from a ``torch.Generator`` seeded by ``(seed, step, rank)``, so a
resumed run draws the same prompts as an uninterrupted one without saving any RNG state. All objects of a step
are handled as one batch of tensors; there is no Python loop over objects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from trainer.config import PromptConfig

PAD, NEG, POS, BOX_TL, BOX_BR = -1, 0, 1, 2, 3  # SAM's point labels (2, 3 are the box corners)


@dataclass
class Prompts:
    """The prompts of ``P`` objects, in input-frame pixels (what ``ResizeLongestSide.apply_coords`` gives)."""

    point_coords: torch.Tensor
    """``(P, N, 2)`` float32 (x, y); N may be 0."""
    point_labels: torch.Tensor
    """``(P, N)`` int64: 1 positive, 0 negative, -1 padding (embedded as SAM's not-a-point)."""
    boxes: torch.Tensor | None
    """``(P, 4)`` float32 xyxy; ignored where ``has_box`` is False. ``None``: no box slots at all (point-only
    prompts, padded as ``PromptEncoder`` pads them; evaluation and the Predictor)."""
    has_box: torch.Tensor | None
    """``(P,)`` bool; ``None`` with ``boxes``."""
    mask_input: torch.Tensor | None = None
    """``(P, 1, 256, 256)`` float32 low-res logits of a previous prediction, or ``None``."""
    has_mask: torch.Tensor | None = None
    """``(P,)`` bool: which objects get ``mask_input`` as their mask prompt (``None``: all, when given)."""

    def add_points(self, coords: torch.Tensor, labels: torch.Tensor) -> Prompts:
        """A copy with ``(P, k, 2)`` coords and ``(P, k)`` labels appended."""
        return replace(
            self,
            point_coords=torch.cat([self.point_coords, coords], 1),
            point_labels=torch.cat([self.point_labels, labels], 1),
        )


def box_prompts(boxes: torch.Tensor) -> Prompts:
    """``P`` prompts of one box each and no point: ``(P, 4)`` float32 xyxy boxes in the input frame."""
    p, dev = boxes.shape[0], boxes.device
    return Prompts(
        point_coords=torch.zeros((p, 0, 2), device=dev),
        point_labels=torch.zeros((p, 0), dtype=torch.long, device=dev),
        boxes=boxes,
        has_box=torch.ones(p, dtype=torch.bool, device=dev),
    )


def to_input_frame(xy: np.ndarray, original_hw, input_hw) -> np.ndarray:
    """``(..., 2)`` x, y in original pixels -> the input frame, each axis by its own ratio, as
    ``ResizeLongestSide.apply_coords`` scales them for ``SamPredictor`` (MedSAM's square stretch scales the
    two axes differently). The one place prompts change frame: cache boxes, eval clicks, the Predictor.

    Args:
        xy: ``(..., 2)`` float x, y; boxes as ``(..., 2, 2)`` corners.
        original_hw, input_hw: ``(h, w)`` sizes, or arrays of them that broadcast against ``xy[..., 0]``
            with a trailing ``2`` (``(n, 1, 2)`` for ``n`` boxes' corners).

    Returns:
        float64 ``xy`` scaled by ``(input_w / original_w, input_h / original_h)``.
    """
    ratio = np.asarray(input_hw, np.float64)[..., ::-1] / np.asarray(original_hw, np.float64)[..., ::-1]
    return np.asarray(xy, np.float64) * ratio


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-step's prompt draws: a pure function of (seed, step, rank)."""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(mixed)


def jitter_boxes(
    boxes: torch.Tensor, valid_hw: torch.Tensor, cfg: PromptConfig, g: torch.Generator
) -> torch.Tensor:
    """SAM's box noise: each coordinate moves by N(0, jitter * side), capped at ``box_jitter_max_px``.

    Args:
        boxes: ``(P, 4)`` float32 xyxy in the input frame.
        valid_hw: ``(P, 2)`` input size (h, w); the result stays inside it and keeps x2 > x1, y2 > y1.
    """
    # (P, 4): w, h, w, h
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=g, device=boxes.device) * side * cfg.box_jitter
    noise = noise.clamp(-cfg.box_jitter_max_px, cfg.box_jitter_max_px)
    out = boxes + noise
    w, h = valid_hw[:, 1].to(out), valid_hw[:, 0].to(out)
    x1 = torch.minimum(out[:, 0].clamp(min=0), w - 1)
    y1 = torch.minimum(out[:, 1].clamp(min=0), h - 1)
    x2 = torch.maximum(torch.minimum(out[:, 2], w), x1 + 1)
    y2 = torch.maximum(torch.minimum(out[:, 3], h), y1 + 1)
    return torch.stack([x1, y1, x2, y2], 1)


def sample_points(region: torch.Tensor, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` distinct pixels drawn uniformly from each object's region, in one batched ``topk``.

    Args:
        region: ``(P, H, W)`` bool.
    Returns:
        ``(P, k, 2)`` float32 (x, y) pixel centres' integer coordinates and ``(P, k)`` bool, False where the
        region had fewer than ``k`` pixels (those points are to be padded).
    """
    p, h, w = region.shape
    if k == 0:
        return region.new_zeros((p, 0, 2), dtype=torch.float32), region.new_zeros((p, 0), dtype=torch.bool)
    score = torch.rand((p, h * w), generator=g, device=region.device)
    score = torch.where(region.reshape(p, -1), score, -1.0)
    top, idx = score.topk(k, dim=1)
    xy = torch.stack([idx % w, idx // w], -1).float()
    return xy, top >= 0


def _box_region(boxes: torch.Tensor, h: int, w: int, grow: float = 0.1) -> torch.Tensor:
    """``(P, h, w)`` bool: inside each xyxy box grown by ``grow`` of its side."""
    dx = (boxes[:, 2] - boxes[:, 0]) * grow
    dy = (boxes[:, 3] - boxes[:, 1]) * grow
    xs = torch.arange(w, device=boxes.device).float()
    ys = torch.arange(h, device=boxes.device).float()
    in_x = (xs[None] >= (boxes[:, 0] - dx)[:, None]) & (xs[None] < (boxes[:, 2] + dx)[:, None])
    in_y = (ys[None] >= (boxes[:, 1] - dy)[:, None]) & (ys[None] < (boxes[:, 3] + dy)[:, None])
    return in_y[:, :, None] & in_x[:, None, :]


def valid_region(valid_hw: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(P, h, w)`` bool: the un-padded part of the input frame of each object."""
    ys = torch.arange(h, device=valid_hw.device)
    xs = torch.arange(w, device=valid_hw.device)
    return (ys[None, :, None] < valid_hw[:, 0, None, None]) & (xs[None, None, :] < valid_hw[:, 1, None, None])


def initial_prompts(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    valid_hw: torch.Tensor,
    cfg: PromptConfig,
    g: torch.Generator,
    has_box: torch.Tensor | None = None,
) -> Prompts:
    """The first-round prompts of a step: a jittered box for a ``box_fraction`` of objects, points for the
    rest.

    Args:
        masks: ``(P, S, S)`` bool targets in the input frame.
        boxes: ``(P, 4)`` float32 tight boxes in the input frame.
        valid_hw: ``(P, 2)`` int input size (h, w) of each object's image.
        has_box: ``(P,)`` bool, which objects start from their box when the caller has drawn it; None draws
            it here (``box_fraction``).
    """
    p, h, w = masks.shape
    if has_box is None:
        has_box = torch.rand(p, generator=g, device=masks.device) < cfg.box_fraction
    jittered = jitter_boxes(boxes, valid_hw, cfg, g)
    n_pos = max(
        cfg.pos_points if not bool(has_box.all()) else 0, cfg.box_points if bool(has_box.any()) else 0
    )
    n_neg = cfg.neg_points if not bool(has_box.all()) else 0
    pos_xy, pos_ok = sample_points(masks, n_pos, g)
    # positives: point-prompted objects use pos_points of them, box-prompted ones box_points
    want = torch.where(has_box, cfg.box_points, cfg.pos_points)
    pos_ok &= torch.arange(n_pos, device=masks.device)[None] < want[:, None]
    region = ~masks & _box_region(boxes, h, w) & valid_region(valid_hw, h, w)
    neg_xy, neg_ok = sample_points(region, n_neg, g)
    neg_ok &= ~has_box[:, None]
    coords = torch.cat([pos_xy, neg_xy], 1)
    labels = torch.cat(
        [torch.where(pos_ok, POS, PAD), torch.where(neg_ok, NEG, PAD)],
        1,
    ).long()
    return Prompts(point_coords=coords, point_labels=labels, boxes=jittered, has_box=has_box)


def single_point(prompts: Prompts) -> torch.Tensor:
    """``(P,)`` bool: the objects whose prompt is one click and no box, the ambiguous prompt for which SAM
    predicts (and trains) its three multimask outputs."""
    return ((prompts.point_labels != PAD).sum(1) == 1) & ~prompts.has_box


def corrective_click(
    prompts: Prompts,
    low_res_logits: torch.Tensor,
    masks: torch.Tensor,
    valid_hw: torch.Tensor,
    g: torch.Generator,
    *,
    mask_prompt_prob: float,
) -> Prompts:
    """One round of SAM's iterative training: add a click drawn from the error region of the last prediction.

    A false-negative pixel becomes a positive click, a false-positive pixel a negative one; an object
    predicted perfectly gets a padding point. Each object, with probability ``mask_prompt_prob``, also gets
    the previous logits as its mask prompt (the others get none: SAM's no-mask embedding).

    Args:
        low_res_logits: ``(P, 256, 256)`` the previous round's chosen mask logits (detached).
        masks: ``(P, S, S)`` bool targets.
    """
    p, h, w = masks.shape
    pred = (
        F.interpolate(low_res_logits[:, None].float(), (h, w), mode="bilinear", align_corners=False)[:, 0] > 0
    )
    fn = masks & ~pred
    fp = pred & ~masks & valid_region(valid_hw, h, w)
    xy, ok = sample_points(fn | fp, 1, g)
    xi, yi = xy[:, 0, 0].long(), xy[:, 0, 1].long()
    is_fn = fn[torch.arange(p, device=masks.device), yi, xi]
    label = torch.where(ok[:, 0], torch.where(is_fn, POS, NEG), PAD).long()
    out = prompts.add_points(xy, label[:, None])
    if mask_prompt_prob > 0:
        has_mask = torch.rand(p, generator=g, device=masks.device) < mask_prompt_prob
        out = replace(out, mask_input=low_res_logits[:, None].detach().float(), has_mask=has_mask)
    return out


def restart_with_click(prompts: Prompts, masks: torch.Tensor, share: float, g: torch.Generator) -> Prompts:
    """A corrective round's prompts with a ``share`` of the box-started objects restarted from one click.

    A restarted object's prompt becomes a single positive click drawn uniformly inside its mask, in the
    round's last point slot, every other slot padding, no box and no mask prompt: exactly a click start.

    Args:
        prompts: the round's ``(P, N, ...)`` prompts (``corrective_click``'s output), ``N >= 1``.
        masks: ``(P, S, S)`` bool targets.
    """
    p = masks.shape[0]
    restart = prompts.has_box & (torch.rand(p, generator=g, device=masks.device) < share)
    xy, ok = sample_points(masks, 1, g)
    coords = prompts.point_coords.clone()
    coords[restart, -1] = xy[restart, 0]
    labels = torch.where(restart[:, None], PAD, prompts.point_labels)
    labels[:, -1] = torch.where(restart, torch.where(ok[:, 0], POS, PAD), labels[:, -1])
    has_mask = None if prompts.has_mask is None else prompts.has_mask & ~restart
    return replace(
        prompts,
        point_coords=coords,
        point_labels=labels,
        has_box=prompts.has_box & ~restart,
        has_mask=has_mask,
    )


def farthest_interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The (x, y) pixel of a ``(H, W)`` bool mask farthest from its boundary (image borders count as
    boundary).

    Ties go to the first pixel in row-major order, so the point is deterministic.
    """
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)
