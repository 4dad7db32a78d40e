"""The AIS task: automatic instance segmentation from a small head on the image embedding, as micro-sam's AIS.

A convolutional decoder (``AisHead``) reads the ``(256, 64, 64)`` image embedding alone (no prompt, SAM's
mask decoder unused) and predicts three maps at SAM's low-res grid ``(256, 256)``, which is LiteMedSAM's
input frame: foreground, distance to the object centre and distance to the boundary
(``trainer.distance_maps``). A seeded watershed turns them into instances. SAM's own weights stay as they
were (the head, and an encoder tail's adapters where configured, are what train), so the exported SAM
still answers prompts as the starting model does; the head goes to the ``ais`` sidecar.

The targets are computed once per run from the cache's masks (``AisTargets``): each training image's objects
are painted into one label image, turned into the three maps and brought to the low-res grid (by default
averaged over each pixel's footprint in the original image, ``data.targets``); the step only stacks them.
The loss is micro-sam's (torch_em's ``DiceBasedDistanceLoss``): dice on the foreground plus dice on each
distance map, the distances masked to the target foreground.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from embedcache.masks import input_mean
from embedcache.presets import LOWRES_SIZE
from trainer.config import Config, ModelConfig
from trainer.data import Batch, ImageStore
from trainer.decoder import PromptedDecoder
from trainer.distance_maps import distance_targets, seeded_watershed
from trainer.evaluate import Contender, postprocess
from trainer.instance_metrics import image_scores, labels_from_masks, mean_scores
from trainer.variant import Variant

if TYPE_CHECKING:
    from embedcache.cache import Cache


class AisHead(nn.Module):
    """``(B, 256, 64, 64)`` embeddings -> ``(B, 3, 256, 256)`` logits of foreground, centre distance and
    boundary distance (the maps are their sigmoids).

    A UNETR-style decoder without skip connections, kept small: a 3x3 conv block at 64x64 (256 -> 128
    channels), then two blocks of (2x2 transposed conv, x2 upsampling; 3x3 conv) to 128x128 (64 channels) and
    256x256 (32 channels), and a 1x1 conv to the 3 maps. Each 3x3 conv is followed by GroupNorm and ReLU.
    About 0.38 M parameters and 2.7 GMAC per image forward (docs/training.md).
    """

    def __init__(self, in_channels: int = 256, widths: tuple[int, int, int] = (128, 64, 32)):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU())

        a, b, c = widths
        self.body = nn.Sequential(
            block(in_channels, a),
            nn.ConvTranspose2d(a, b, 2, stride=2),
            block(b, b),
            nn.ConvTranspose2d(b, c, 2, stride=2),
            block(c, c),
            nn.Conv2d(c, 3, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.body(embeddings.float())


class AisHeadVariant(Variant):
    """The AIS task's head as a variant: it fills ``PromptedDecoder.ais_head``, freezes SAM's prompt encoder
    and mask decoder (the AIS loss never reads them) and exports to the ``ais`` sidecar
    (``{"state_dict"}``)."""

    sidecar = "ais"

    def __init__(self, m: ModelConfig):
        self.m = m

    def apply(self, sam: nn.Module, model: PromptedDecoder) -> None:
        sam.prompt_encoder.requires_grad_(False)
        sam.mask_decoder.requires_grad_(False)
        model.ais_head = AisHead()

    def export(self, sam: nn.Module, model: PromptedDecoder) -> dict:
        return {"state_dict": model.ais_head.state_dict()}

    @classmethod
    def load(cls, sam: nn.Module, model: PromptedDecoder, content: dict, where: Path) -> None:
        head = AisHead()
        try:
            head.load_state_dict(content["state_dict"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{where}: not a samtune AIS head file ({e})") from e
        model.ais_head = head.to(sam.mask_decoder.iou_token.weight.device)


def image_targets(cache: Cache, image: int, rule: str = "coverage") -> torch.Tensor:
    """``(4, 256, 256)`` float16 targets of one cache image at the low-res grid: foreground, centre
    distance, boundary distance (``distance_targets``) and the weight of each pixel (1 inside the image's
    input region and outside the cache's ignore region, else 0).

    Objects are painted largest first (a small object on a large one stays visible). ``rule`` is
    ``data.targets``: ``coverage`` paints them at the original size, makes the maps there and averages each
    over every low-res pixel's footprint in the original image (``embedcache.masks.input_mean``; soft at
    the edges, and centred as the image resize centres it); ``nearest`` paints the cache's low-res masks
    (``Cache.masks(..., "lowres")``), up to half an input pixel off when the image is downsized."""
    lo, hi = cache.object_range(image)
    objs = np.arange(lo, hi)
    objs = objs[cache.objects.input_area[objs] > 0]
    block = cache.image_size // LOWRES_SIZE
    ih, iw = (int(np.ceil(int(v) / block)) for v in cache.input_size[image])
    if rule == "nearest":
        pieces = [(0, 0, m) for m in cache.masks(objs, "lowres")]
        maps = distance_targets(_labels((LOWRES_SIZE, LOWRES_SIZE), pieces))
    else:
        boxes = cache.objects.box
        pieces = [(int(boxes[j][1]), int(boxes[j][0]), cache.mask_crop(j)) for j in objs]
        labels = _labels(tuple(int(v) for v in cache.original_size[image]), pieces)
        maps = _lowres_mean(distance_targets(labels), tuple(cache.input_size[image]), block)
    weight = np.zeros((LOWRES_SIZE, LOWRES_SIZE), np.float32)
    weight[:ih, :iw] = 1
    ignore = cache.ignore_mask(image, "input")
    ignore = ignore.reshape(LOWRES_SIZE, block, LOWRES_SIZE, block).any(axis=(1, 3))
    weight[ignore] = 0
    return torch.from_numpy(np.concatenate([maps, weight[None]])).half()


def _labels(shape: tuple[int, int], pieces: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """``shape`` int32 labels of ``pieces`` (``(row, column, bool mask)``: a mask and its top-left corner),
    painted largest first; piece ``k`` gets id ``k + 1``."""
    labels = np.zeros(shape, np.int32)
    for k in np.argsort([-int(m.sum()) for _, _, m in pieces], kind="stable"):
        y0, x0, m = pieces[k]
        labels[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]][m] = k + 1
    return labels


def _lowres_mean(maps: np.ndarray, in_hw: tuple[int, int], block: int) -> np.ndarray:
    """``(3, H, W)`` maps in [0, 1] at the original size -> ``(3, 256, 256)`` float32, each low-res pixel the
    mean over its footprint in the original image (its input pixels' footprints, ``block x block`` of them;
    the part of a block in the padding does not count). Outside the input region: foreground 0, distances 1,
    as ``distance_targets`` has them outside objects (the weight is 0 there)."""
    h, w = (int(v) for v in in_hw)
    ih, iw = -(-h // block), -(-w // block)
    out = np.ones((3, LOWRES_SIZE, LOWRES_SIZE), np.float32)
    out[0] = 0
    valid = np.zeros((ih * block, iw * block))
    valid[:h, :w] = 1
    count = valid.reshape(ih, block, iw, block).sum(axis=(1, 3))
    for c, m in enumerate(maps):
        full = np.zeros_like(valid)
        # integer sums: the maps in units of 1 / 65535
        full[:h, :w] = input_mean(np.rint(m * 65535).astype(np.int64), (h, w)) / 65535
        out[c, :ih, :iw] = full.reshape(ih, block, iw, block).sum(axis=(1, 3)) / count
    return out


class AisTargets:
    """Each training image's ``image_targets``, computed once per run and kept on the step's device.

    A cache with views (``embedcache build --views``) trains each image in a view per epoch
    (``Batch.views``): its targets are keyed by view and image, the identity's computed up front and the
    others the first time a step reads them (from that view's masks). ``rule``: ``data.targets``."""

    def __init__(self, cache: Cache, images: np.ndarray, rule: str = "coverage"):
        self.cache, self.rule = cache, rule
        identity = cache.views[0]
        self.per_image = {(identity, int(i)): image_targets(cache, int(i), rule) for i in images}

    def __call__(
        self, images: torch.Tensor, views: tuple[str, ...] | None, device: torch.device
    ) -> torch.Tensor:
        """``(B, 4, 256, 256)`` float32 targets of the ``(B,)`` cache images ``images`` in ``views`` (None:
        the identity)."""
        out = []
        for b, i in enumerate(images.tolist()):
            key = (views[b] if views else self.cache.views[0], i)
            t = self.per_image.get(key)
            if t is None:  # another view of the image, first read now
                t = image_targets(self.cache.view(key[0]), i, self.rule)
            if t.device != device or key not in self.per_image:
                t = self.per_image[key] = t.to(device)
            out.append(t)
        return torch.stack(out).float()


def ais_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """micro-sam's AIS loss: ``(B, 3, 256, 256)`` logits against ``AisTargets``' ``(B, 4, 256, 256)``.

    Dice (``1 - 2 sum(p t) / (sum(p^2) + sum(t^2))``, over the batch's weighted pixels) on the foreground,
    plus the same dice on the centre and on the boundary distance, both multiplied by the target foreground
    (the distances are only learned inside objects). Returns the sum and its three terms."""
    p = torch.sigmoid(logits.float())
    t, w = targets[:, :3], targets[:, 3:]
    fg = t[:, :1]
    p = torch.cat([p[:, :1], p[:, 1:] * fg], 1) * w
    t = torch.cat([fg, t[:, 1:] * fg], 1) * w
    dims = (0, 2, 3)
    dice = 1 - 2 * (p * t).sum(dims) / ((p * p).sum(dims) + (t * t).sum(dims)).clamp_min(1e-6)
    terms = {"dice_foreground": dice[0], "dice_centre": dice[1], "dice_boundary": dice[2]}
    return dice.sum(), {k: v.detach() for k, v in terms.items()}


def ais_maps(
    model: PromptedDecoder,
    inputs: torch.Tensor,
    input_hw: tuple[int, int],
    original_hw: tuple[int, int],
    side: int,
) -> torch.Tensor:
    """``(3, H, W)`` float32 foreground, centre and boundary distance maps of one image at its original size.

    Args:
        model: a ``PromptedDecoder`` with an AIS head.
        inputs: ``(1, 256, 64, 64)`` embedding, or the tap tokens of a model with an encoder tail.
        input_hw, original_hw: the image's size in the input frame and originally.
        side: the preset's input frame side.
    """
    logits = model(inputs.float(), torch.zeros(1, dtype=torch.long, device=inputs.device), None).logits
    return torch.sigmoid(postprocess(logits.float(), input_hw, original_hw, side))[0]


def ais_labels(
    model: PromptedDecoder,
    inputs: torch.Tensor,
    input_hw: tuple[int, int],
    original_hw: tuple[int, int],
    side: int,
) -> np.ndarray:
    """``(H, W)`` int32 instance labels of one image: ``ais_maps`` through ``seeded_watershed`` (its default
    thresholds, 0.5)."""
    fg, centre, boundary = ais_maps(model, inputs, input_hw, original_hw, side).cpu().numpy()
    return seeded_watershed(fg, centre, boundary)


@torch.no_grad()
def evaluate_ais(
    model: PromptedDecoder, store: ImageStore, images: np.ndarray, accelerator, *, keep: int = 0
) -> tuple[dict, dict[int, np.ndarray]]:
    """AIS of ``model`` on the cache images ``images`` (those with objects), scored per instance as
    ``trainer.auto_eval.evaluate_amg`` scores AMG.

    Returns ``{"method": "ais", "msa", "sa50", "sa75", "n_pred", "n_true", "n_images"}`` (equal on every
    process) and the labels of the first ``keep`` scored images this process made."""
    if getattr(model, "ais_head", None) is None:
        raise ValueError("--auto ais needs a model with an AIS head (a model.task=ais run or its export)")
    was_training = model.training
    model.eval()
    cache = store.cache
    scored = np.intersect1d(images, cache.images_with_objects("all"))
    shown = set(scored[:keep].tolist())
    records, kept = [], {}
    for image in scored[accelerator.process_index :: accelerator.num_processes].tolist():
        hw = tuple(int(v) for v in cache.original_size[image])
        input_hw = tuple(int(v) for v in cache.input_size[image])
        inputs = store.embeddings(np.array([image])).to(accelerator.device)
        labels = ais_labels(model, inputs, input_hw, hw, cache.image_size)
        lo, hi = cache.object_range(image)
        truth = labels_from_masks(cache.masks(np.arange(lo, hi), "original"), hw)
        records.append((image, image_scores(labels, truth)))
        if image in shown:
            kept[image] = labels
    model.train(was_training)
    gathered = accelerator.gather_for_metrics(records, use_gather_object=True)
    rows = [r for _, r in sorted(dict(gathered).items())]
    return {"method": "ais", **mean_scores(rows), "n_images": len(rows)}, kept


class AisTask:
    """A prompt-free head trained on the cached embeddings to predict the three AIS maps."""

    reads_labels = False
    head = AisHeadVariant
    scores_plain_sam = False
    scored_by_auto = "ais"
    sweep_metrics = ()
    score_name = "AIS mSA"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.targets: AisTargets | None = None

    @staticmethod
    def check(cfg: Config) -> None:
        if cfg.loss.ce > 0:
            raise ValueError("loss.ce is the semantic task's loss; model.task=ais trains with its own dice")

    @staticmethod
    def resolve(cfg: Config, cache) -> Config:
        return cfg

    def train_images(self, cache) -> np.ndarray:
        """Every training image (one without objects is all background, still a target); their targets are
        computed here, once per run."""
        images = cache.image_indices("train")
        self.targets = AisTargets(cache, images, self.cfg.data.targets)
        return images

    def loss(
        self, model: nn.Module, batch: Batch, g: torch.Generator, accelerator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The head on every image of the micro-batch in one forward, against the cached targets."""
        if self.targets is None:
            raise ValueError("model.task=ais builds its targets in train_images(cache); call it first")
        index = torch.arange(batch.embeddings.shape[0], device=batch.embeddings.device)
        logits = model(batch.embeddings, index, None).logits
        return ais_loss(logits, self.targets(batch.image_ids, batch.views, logits.device))

    def prompts_in(self, batch: Batch) -> int:
        return batch.embeddings.shape[0]

    def validate(self, model: nn.Module, store: ImageStore, images: np.ndarray, accelerator) -> dict:
        return {"auto": evaluate_ais(model, store, images, accelerator)[0]}

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
        if clicks:
            raise ValueError("--clicks scores prompted instance masks; an AIS run's head takes no prompts")
        return self.validate(model, store, images, accelerator)

    def score(self, metrics: dict) -> float:
        return metrics["auto"]["msa"]

    def overlays(
        self, folder: Path, images: np.ndarray, first: Contender, second: Contender, n: int
    ) -> list[Path]:
        return []  # trainer eval --auto ais draws the instances (overlays_auto)
