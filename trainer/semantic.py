"""Semantic mode: a decoder variant with one output token per class, prompt-free or box-prompted.

It keeps SAM's two-way transformer and upscaling, and replaces SAM's IoU token and 4 mask tokens by ``C``
class tokens, each with its own hypernetwork MLP (initialised from SAM's single-mask token and MLP). One
decoder pass per image gives ``(C, 256, 256)`` class logits, trained with ``ce`` (+ ``dice``).

What the export loads into: ``trainer export`` writes (1) the full SAM state dict, in which the shared
transformer and upscaling are the semantic-tuned ones (it loads strictly into ``build_sam`` and
``sam_model_registry``, but SAM's own prompted masks are then not what was trained), and (2) beside it
``<out>.semantic.pth`` with the class tokens and MLPs (``SemanticHeadVariant``). ``trainer.load_tuned(out)``
puts them (and any other sidecar) together; ``SemanticSegmenter`` maps an image to a ``(H, W)`` class map.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from trainer.config import Config, ModelConfig
from trainer.data import Batch, ImageStore
from trainer.decoder import PromptedDecoder
from trainer.evaluate import Contender, postprocess
from trainer.losses import semantic_loss
from trainer.prompts import Prompts, box_prompts
from trainer.variant import Variant

if TYPE_CHECKING:
    from trainer.tuned import TunedSam


class SemanticHead(nn.Module):
    """``C`` class tokens ``(C, 256)`` and their hypernetwork MLPs; the rest is the mask decoder's.

    ``PromptedDecoder`` runs the decoder with ``class_tokens`` as its output tokens and hands the result here.
    ``prompt`` says what the decoder is prompted with: ``none``, or ``box`` (see ``image_prompts``).
    """

    def __init__(self, mask_decoder: nn.Module, num_classes: int, prompt: str = "none"):
        super().__init__()
        self.num_classes = num_classes
        self.prompt = prompt
        self.class_tokens = nn.Parameter(
            mask_decoder.mask_tokens.weight[0].detach().clone().repeat(num_classes, 1)
        )
        self.mlps = nn.ModuleList(
            copy.deepcopy(mask_decoder.output_hypernetworks_mlps[0]) for _ in range(num_classes)
        )

    def forward(self, hs: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """Decoder outputs -> ``(B, C, 256, 256)`` class logits.

        Args:
            hs: ``(B, C + T, 256)`` output tokens of ``decode`` (the class tokens first).
            upscaled: ``(B, 32, 256, 256)`` upscaled image features of ``decode``.
        """
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.mlps)], 1)  # (B, C, 32)
        n, c, h, w = upscaled.shape
        return (hyper @ upscaled.reshape(n, c, h * w)).reshape(n, self.num_classes, h, w)


def image_prompts(valid_hw: torch.Tensor, kind: str) -> Prompts | None:
    """The prompts of ``B`` images with ``(B, 2)`` input sizes: the whole image's input box for a ``box``
    head, ``None`` (no prompt) for a ``none`` head."""
    if kind != "box":
        return None
    return box_prompts(torch.cat([torch.zeros_like(valid_hw), valid_hw.flip(1)], 1).float())


def class_logits(
    model: nn.Module, embeddings: torch.Tensor, valid_hw: torch.Tensor, prompt: str
) -> torch.Tensor:
    """``(B, 256, 64, 64)`` embeddings of images with ``(B, 2)`` input sizes -> ``(B, C, 256, 256)`` class
    logits of a ``PromptedDecoder`` with a semantic head (DDP-wrapped or not), one decoder pass per image."""
    index = torch.arange(embeddings.shape[0], device=embeddings.device)
    return model(embeddings, index, image_prompts(valid_hw, prompt)).logits


@torch.no_grad()
def evaluate_semantic(
    model: PromptedDecoder, store: ImageStore, images: np.ndarray, accelerator, num_classes: int
) -> dict:
    """``{"semantic": {"miou", "dice", "n_images", "per_class_iou"}}`` from pixel counts summed over the
    images (classes 1..C-1; background is not averaged in), equal on every process.

    A class's IoU here is its intersection over its union summed over all images (a dataset-level count,
    not a mean of per-image scores); a class absent from every prediction and target is left out of the mean.
    The cache's ignore region and the objects that vanish in the input frame (training never sees them) are
    not scored.
    """
    was_training = model.training
    model.eval()
    cache = store.cache
    counts = np.zeros((num_classes, 3))  # intersection, union, pred + gt
    n = 0
    for image in images[accelerator.process_index :: accelerator.num_processes]:
        image = int(image)
        ih, iw = (int(v) for v in cache.input_size[image])
        oh, ow = (int(v) for v in cache.original_size[image])
        emb = store.embeddings(np.array([image])).to(accelerator.device).float()
        valid_hw = torch.tensor([[ih, iw]], device=accelerator.device)
        logits = class_logits(model, emb, valid_hw, model.semantic_head.prompt)
        pred = postprocess(logits.float(), (ih, iw), (oh, ow), cache.image_size).argmax(1)[0].cpu().numpy()
        gt = np.zeros((oh, ow), np.int64)
        scored = ~cache.ignore_mask(image, "original")
        start, stop = cache.object_range(image)
        for j, m in zip(range(start, stop), cache.masks(np.arange(start, stop), "original")):
            gt[m] = cache.objects.class_id[j]
            if cache.objects.input_area[j] == 0:  # no pixel in the input frame, so never trained: not scored
                scored &= ~m
        for c in range(num_classes):
            p, g = (pred == c) & scored, (gt == c) & scored
            counts[c] += [np.logical_and(p, g).sum(), np.logical_or(p, g).sum(), p.sum() + g.sum()]
        n += 1
    counts = accelerator.reduce(torch.tensor(counts, device=accelerator.device), "sum").cpu().numpy()
    n = int(accelerator.reduce(torch.tensor(n, device=accelerator.device), "sum"))
    iou = counts[:, 0] / np.maximum(counts[:, 1], 1)
    dice = 2 * counts[:, 0] / np.maximum(counts[:, 2], 1)
    present = counts[1:, 1] > 0
    model.train(was_training)
    return {
        "semantic": {
            "miou": float(iou[1:][present].mean()) if present.any() else float("nan"),
            "dice": float(dice[1:][present].mean()) if present.any() else float("nan"),
            "n_images": n,
            "per_class_iou": [float(v) for v in iou],
        }
    }


class SemanticHeadVariant(Variant):
    """The semantic task's head as a variant: it fills ``PromptedDecoder.semantic_head`` and exports to the
    ``semantic`` sidecar (``{"num_classes", "prompt", "state_dict"}``)."""

    sidecar = "semantic"

    def __init__(self, m: ModelConfig):
        self.num_classes, self.prompt = m.num_classes, m.semantic_prompt

    def apply(self, sam: nn.Module, model: PromptedDecoder) -> None:
        # the MLPs are copies of the decoder's, frozen with it when only adapters train; the head always
        # trains
        model.semantic_head = SemanticHead(sam.mask_decoder, self.num_classes, self.prompt).requires_grad_(
            True
        )

    def export(self, sam: nn.Module, model: PromptedDecoder) -> dict:
        head = model.semantic_head
        return {"num_classes": head.num_classes, "prompt": head.prompt, "state_dict": head.state_dict()}

    @classmethod
    def load(cls, sam: nn.Module, model: PromptedDecoder, content: dict, where: Path) -> None:
        try:
            head = SemanticHead(sam.mask_decoder, int(content["num_classes"]), content["prompt"])
            head.load_state_dict(content["state_dict"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{where}: not a samtune semantic head file ({e})") from e
        model.semantic_head = head.to(sam.mask_decoder.iou_token.weight.device)


class SemanticSegmenter(nn.Module):
    """A tuned model with a semantic head (``trainer.load_tuned``): image -> class map."""

    def __init__(self, tuned: TunedSam):
        super().__init__()
        self.tuned = tuned

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` int64 class map at the original resolution."""
        from trainer.predictor import Predictor

        predictor = Predictor(self.tuned)
        predictor.set_image(image)
        model = self.tuned.model
        valid_hw = torch.tensor([predictor.input_size], device=predictor.device)
        logits = class_logits(model, predictor.features, valid_hw, model.semantic_head.prompt)
        side = predictor.preset.image_size
        return (
            postprocess(logits, predictor.input_size, predictor.original_size, side)
            .argmax(1)[0]
            .cpu()
            .numpy()
        )


def load_semantic_segmenter(model_type: str, exported: str | Path) -> SemanticSegmenter:
    """``trainer.load_tuned(exported)`` (the SAM state dict and its sidecars) as a ``SemanticSegmenter``;
    ``model_type`` must be the export's preset."""
    from trainer.tuned import load_tuned

    return SemanticSegmenter(load_tuned(exported, model_type=model_type)).eval()


class SemanticTask:
    """One output token per class, trained with ``ce`` (+ ``dice``) against the cache's class maps."""

    reads_labels = True
    head = SemanticHeadVariant
    scores_plain_sam = False
    scored_by_auto = None
    sweep_metrics = ()
    score_name = "semantic mIoU"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @staticmethod
    def check(cfg: Config) -> None:
        if cfg.loss.ce == 0:
            raise ValueError("model.task=semantic trains with ce: set loss.ce > 0")

    @staticmethod
    def resolve(cfg: Config, cache) -> Config:
        """``model.num_classes = 0`` becomes the cache's largest class id + 1."""
        if cfg.model.num_classes:
            return cfg
        num_classes = int(cache.objects.class_id.max(initial=0)) + 1
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))

    def train_images(self, cache) -> np.ndarray:
        return cache.image_indices("train")  # an image without objects is all background: still a target

    def loss(
        self, model: nn.Module, batch: Batch, g: torch.Generator, accelerator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Class logits of every image of the micro-batch in one decoder call, against its class map."""
        logits = class_logits(model, batch.embeddings, batch.image_valid_hw, self.cfg.model.semantic_prompt)
        return semantic_loss(logits, batch.labels, batch.image_valid_hw, self.cfg.loss)

    def prompts_in(self, batch: Batch) -> int:
        return batch.embeddings.shape[0]

    def validate(self, model: nn.Module, store: ImageStore, images: np.ndarray, accelerator) -> dict:
        return evaluate_semantic(model, store, images, accelerator, self.cfg.model.num_classes)

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
            raise ValueError("--clicks scores prompted instance masks; a semantic head has no click rounds")
        return self.validate(model, store, images, accelerator)

    def score(self, metrics: dict) -> float:
        return metrics["semantic"]["miou"]

    def overlays(
        self, folder: Path, images: np.ndarray, first: Contender, second: Contender, n: int
    ) -> list[Path]:
        return []  # the instance overlays draw objects; a class-map figure is not written yet
