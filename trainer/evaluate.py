"""Validation: box and point prompts scored at the original resolution, correct on any number of processes.

- **box**: the tight GT box (the cache's box, scaled to the input frame as ``SamPredictor`` scales it),
  ``multimask_output=False``, mask = logits > 0 after ``Sam.postprocess_masks``. This is exactly
  ``SamPredictor.predict(box=...)`` on the cached embedding.
- **point**: one positive click at the interior point farthest from the mask boundary (scipy's Euclidean
  distance transform), ``multimask_output=True``, keeping the mask with the highest predicted IoU.
- **clicks** (``clicks`` N > 0): from each start, N rounds of one corrective click each (``trainer.clicks``),
  the previous logits as the mask prompt; mIoU after each round and the clicks needed to reach 85 / 90 % IoU.

Each process scores a disjoint share of the images; ``gather_for_metrics`` collects the per-object records.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from trainer.clicks import click_summary, next_click
from trainer.data import ImageStore, input_boxes
from trainer.decoder import Decoded, PromptedDecoder
from trainer.prompts import PAD, Prompts, farthest_interior_point, to_input_frame

PROMPT_TYPES = ("box", "point")


def postprocess(
    low_res: torch.Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int], side: int
) -> torch.Tensor:
    """``Sam.postprocess_masks`` for a ``side x side`` input frame: ``(n, C, 256, 256)`` logits ->
    ``(n, C, H, W)`` logits at original size (upsampled to the input frame, cropped to the image's
    ``input_hw``, resized).

    With ``side=256`` (LiteMedSAM) the first step is the identity, as in LiteMedSAM's own postprocessing."""
    x = F.interpolate(low_res, (side, side), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(x, original_hw, mode="bilinear", align_corners=False)


def iou_and_dice(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """IoU and dice of two bool masks of one shape; the one definition every score here uses.

    Both are 1 when both masks are empty: predicting nothing where there is nothing is right, and scoring it
    0 would punish the model for the data's empty objects.
    """
    inter = float(np.logical_and(pred, gt).sum())
    union = float(np.logical_or(pred, gt).sum())
    total = float(pred.sum() + gt.sum())
    return (inter / union if union else 1.0), (2 * inter / total if total else 1.0)


@torch.no_grad()
def predict_objects(
    model: PromptedDecoder, store: ImageStore, image: int, prompt: str, device: torch.device, chunk: int = 32
) -> list[np.ndarray]:
    """The ``(H, W)`` bool masks of every object of one cache image for one prompt type, at original size
    (``predict_rounds``' round 0)."""
    return predict_rounds(model, store, image, prompt, device, chunk)[0]


@torch.no_grad()
def predict_rounds(
    model: PromptedDecoder,
    store: ImageStore,
    image: int,
    prompt: str,
    device: torch.device,
    chunk: int = 32,
    *,
    clicks: int = 0,
    mask_prompt: bool = True,
) -> list[list[np.ndarray]]:
    """Every object of one cache image from one start (``box`` or ``point``), then ``clicks`` corrective
    rounds (``trainer.clicks``), as ``SamPredictor.predict`` is called by a user correcting its masks.

    Round 0 is the start alone: the box on the single-mask output, or the point on the multimask output the
    IoU head rates best. Each later round adds one click (``next_click`` on the last mask at original size)
    and, with ``mask_prompt``, the last round's low-res logits as the mask prompt; several prompts use the
    single-mask output, as ``SamPredictor`` is told with ``multimask_output=False``. An object predicted
    exactly keeps its mask (it needs no click). Objects go through the decoder ``chunk`` at a time (one call
    each per round): images with hundreds of objects would otherwise need gigabytes of working copies.

    Returns:
        ``rounds[r][j]``: the ``(H, W)`` bool mask of the image's object ``j`` after ``r`` clicks.
    """
    start, stop = store.cache.object_range(image)
    # the model's own forward, in its two halves: the image once, then each chunk of objects
    emb = model.image_embeddings(store.embeddings(np.array([image])).to(device).float())
    rounds = [[] for _ in range(clicks + 1)]
    for lo in range(start, stop, chunk):
        obj = np.arange(lo, min(stop, lo + chunk))
        for r, masks in enumerate(_chunk_rounds(model, emb, store.cache, obj, prompt, clicks, mask_prompt)):
            rounds[r].extend(masks)
    return rounds


def _chunk_rounds(
    model: PromptedDecoder,
    emb: torch.Tensor,
    cache,
    obj: np.ndarray,
    prompt: str,
    clicks: int,
    mask_prompt: bool,
) -> list[np.ndarray]:
    """``predict_rounds`` for the objects ``obj`` of one image with ``(1, 256, 64, 64)`` embedding ``emb``:
    one ``decode_prompts`` call whose ``refine`` shows each round's masks and makes the next clicks.

    Returns:
        ``(len(obj), H, W)`` bool masks after 0..``clicks`` clicks.
    """
    image, n, device = int(cache.objects.image_index[obj[0]]), len(obj), emb.device
    ih, iw = (int(v) for v in cache.input_size[image])
    oh, ow = (int(v) for v in cache.original_size[image])
    gts = cache.masks(obj, "original") if prompt == "point" or clicks else None
    if prompt == "box":
        xy, labels = np.zeros((n, 0, 2)), np.zeros((n, 0), np.int64)
        boxes = torch.from_numpy(input_boxes(cache, obj)).to(device)
        has_box = torch.ones(n, dtype=torch.bool, device=device)
    else:
        far = np.array([farthest_interior_point(m) for m in gts], np.float64)[:, None]
        xy, labels = to_input_frame(far, (oh, ow), (ih, iw)), np.ones((n, 1), np.int64)
        boxes = has_box = None  # no box slots: SAM pads point-only prompts with one padding point
    shown, done, rounds = None, np.zeros(n, bool), []

    def prompts_of(xy: np.ndarray, labels: np.ndarray, low_in: torch.Tensor | None) -> Prompts:
        return Prompts(
            point_coords=torch.from_numpy(xy.astype(np.float32)).to(device),
            point_labels=torch.from_numpy(labels).to(device),
            boxes=boxes,
            has_box=has_box,
            mask_input=low_in if mask_prompt else None,
        )

    def refine(r: int, out: Decoded, asked: Prompts) -> Prompts | None:
        """Show round ``r``'s masks, then give the next round's prompts (one click more), or ``None``."""
        nonlocal xy, labels, shown, done
        multimask = torch.full((n,), r == 0 and prompt == "point", device=device)
        low = out.shown(multimask)[:, None]
        full = (postprocess(low.float(), (ih, iw), (oh, ow), cache.image_size)[:, 0] > 0).cpu().numpy()
        shown = full if shown is None else np.where(done[:, None, None], shown, full)
        rounds.append(shown)
        if r == clicks:
            return None
        made = [next_click(p, g) for p, g in zip(shown, gts)]
        done |= np.array([c is None for c in made])
        new_xy = np.array([(c[0], c[1]) if c else (0.0, 0.0) for c in made], np.float64)
        new_label = np.array([c[2] if c else PAD for c in made], np.int64)
        xy = np.concatenate([xy, to_input_frame(new_xy, (oh, ow), (ih, iw))[:, None]], 1)
        labels = np.concatenate([labels, new_label[:, None]], 1)
        return prompts_of(xy, labels, low.float())

    index = torch.zeros(n, dtype=torch.long, device=device)  # every object is of the one image
    model.decode_prompts(emb, index, prompts_of(xy, labels, None), refine)
    return rounds


class Contender(NamedTuple):
    """A model to score or draw, with its label and the store it reads (embeddings, or tap tokens for a model
    with an encoder tail)."""

    label: str
    model: PromptedDecoder
    store: ImageStore


IOU_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
"""The per-object IoU quantiles ``evaluate`` reports beside the mean: a mean hides a few failed objects."""


def clicks_key(prompt: str) -> str:
    """The metrics key of a start's click curve: ``box_clicks``, ``point_clicks``."""
    return f"{prompt}_clicks"


@torch.no_grad()
def evaluate(
    model: PromptedDecoder,
    store: ImageStore,
    images: np.ndarray,
    accelerator,
    *,
    chunk: int = 32,
    per_object: bool = False,
    clicks: int = 0,
    mask_prompt: bool = True,
) -> dict:
    """Per prompt type ``{"miou", "dice", "n_objects", "iou_quantiles"}`` over all objects of ``images``
    (cache indices) that have a pixel in the input frame (as in training); ``iou_quantiles`` maps each of
    ``IOU_QUANTILES`` to that quantile of the per-object IoUs. With ``per_object`` each prompt type also has
    ``object_ids`` and ``ious``, sorted by object. With ``clicks`` N > 0, ``clicks_key(prompt)`` holds each
    start's click curve (``trainer.clicks.click_summary``: mIoU after 0..N corrective clicks, NoC85, NoC90);
    its round 0 is the prompt type's own score.

    Runs on every process with a disjoint share of the images; every process returns the same result.
    """
    was_training = model.training
    model.eval()
    cache = store.cache
    records = []  # (object index, prompt type, iou, dice, ious after 0..N clicks)
    mine = images[accelerator.process_index :: accelerator.num_processes]
    for image in np.intersect1d(mine, cache.images_with_objects("all")).tolist():
        start, stop = cache.object_range(image)
        gts = cache.masks(np.arange(start, stop), "original")
        for t, prompt in enumerate(PROMPT_TYPES):
            rounds = predict_rounds(
                model, store, image, prompt, accelerator.device, chunk, clicks=clicks, mask_prompt=mask_prompt
            )
            for j, g in enumerate(gts):
                if cache.objects.input_area[start + j] == 0:  # vanishes at the input size: not trained either
                    continue
                scores = [iou_and_dice(r[j], g) for r in rounds]
                records.append((start + j, t, *scores[0], [s[0] for s in scores]))
    gathered = accelerator.gather_for_metrics(records, use_gather_object=True)
    # each object is scored once; the dict guards against repeats
    unique = {(r[0], r[1]): r for r in gathered}
    result = {}
    for t, prompt in enumerate(PROMPT_TYPES):
        rows = sorted(r for r in unique.values() if r[1] == t)
        ious = [r[2] for r in rows]
        result[prompt] = {
            "miou": float(np.mean(ious)) if rows else float("nan"),
            "dice": float(np.mean([r[3] for r in rows])) if rows else float("nan"),
            "n_objects": len(rows),
            "iou_quantiles": {
                str(q): (float(np.quantile(ious, q)) if rows else float("nan")) for q in IOU_QUANTILES
            },
        }
        if per_object:
            result[prompt].update(object_ids=[int(r[0]) for r in rows], ious=[float(v) for v in ious])
        if clicks:
            result[clicks_key(prompt)] = click_summary(np.array([r[4] for r in rows]).reshape(len(rows), -1))
    model.train(was_training)
    return result
