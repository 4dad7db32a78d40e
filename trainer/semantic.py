"""Semantic mode: a decoder variant with one output token per class, prompt-free or box-prompted.

It keeps SAM's two-way transformer and upscaling, and replaces SAM's IoU token and 4 mask tokens by ``C``
class tokens, each with its own hypernetwork MLP (initialised from SAM's single-mask token and MLP). One
decoder pass per image gives ``(C, 256, 256)`` class logits, trained with ``ce`` (+ ``dice``).

What the export loads into: ``trainer export`` writes (1) the full SAM state dict, in which the shared
transformer and upscaling are the semantic-tuned ones (it loads strictly into ``build_sam`` and
``sam_model_registry``, but SAM's own prompted masks are then not what was trained), and (2) beside it
``<out>.semantic.pth`` with the class tokens and MLPs. ``load_semantic_segmenter(model_type, out)`` puts the
two together into ``SemanticSegmenter``, which maps an image to a ``(H, W)`` class map.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.decoder import decode, embed_prompts
from trainer.prompts import Prompts


class SemanticHead(nn.Module):
    """``C`` class tokens ``(C, 256)`` and their hypernetwork MLPs; the rest is the mask decoder's."""

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

    def forward(self, pd: nn.Module, embeddings: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """``(B, 256, 64, 64)`` embeddings, optional ``(B, 4)`` input-frame boxes -> ``(B, C, 256, 256)``
        logits."""
        b = embeddings.shape[0]
        pe = pd.prompt_encoder
        if self.prompt == "box":
            prompts = Prompts(
                point_coords=embeddings.new_zeros((b, 0, 2)),
                point_labels=torch.zeros((b, 0), dtype=torch.long, device=embeddings.device),
                boxes=boxes.float(),
                has_box=torch.ones(b, dtype=torch.bool, device=embeddings.device),
            )
            sparse, dense = embed_prompts(pe, prompts)
        else:
            sparse = embeddings.new_zeros((b, 0, pe.embed_dim)).float()
            h, w = pe.image_embedding_size
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        index = torch.arange(b, device=embeddings.device)
        hs, up = decode(
            pd.mask_decoder, embeddings, index, pe.get_dense_pe(), sparse, dense, self.class_tokens
        )
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.mlps)], 1)  # (B, C, 32)
        n, c, h, w = up.shape
        return (hyper @ up.reshape(n, c, h * w)).reshape(n, self.num_classes, h, w)


def semantic_sidecar(path: str | Path) -> Path:
    """Where the class head goes beside an exported SAM state dict."""
    path = Path(path)
    return (
        path.with_name(path.name + ".semantic.pth")
        if path.suffix != ".pth"
        else path.with_suffix(".semantic.pth")
    )


class SemanticSegmenter(nn.Module):
    """A SAM (image encoder, prompt encoder, decoder) plus a ``SemanticHead``: image -> class map."""

    def __init__(self, sam: nn.Module, head: SemanticHead):
        super().__init__()
        self.sam = sam
        self.head = head

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` int64 class map at the original resolution."""
        from segment_anything import SamPredictor

        predictor = SamPredictor(self.sam)
        predictor.set_image(image)
        ih, iw = predictor.input_size
        box = torch.tensor([[0.0, 0.0, iw, ih]], device=predictor.device)
        logits = self.head(self.sam, predictor.features, box)
        logits = F.interpolate(logits, (1024, 1024), mode="bilinear", align_corners=False)[..., :ih, :iw]
        logits = F.interpolate(logits, predictor.original_size, mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].cpu().numpy()


def load_semantic_segmenter(model_type: str, exported: str | Path) -> SemanticSegmenter:
    """Load ``trainer export``'s SAM state dict and its ``.semantic.pth`` sidecar."""
    from embedcache.models import build_sam

    sam = build_sam(model_type, exported)
    side = torch.load(semantic_sidecar(exported), map_location="cpu", weights_only=True)
    head = SemanticHead(sam.mask_decoder, int(side["num_classes"]), side["prompt"])
    head.load_state_dict(side["state_dict"])
    return SemanticSegmenter(sam, head.eval()).eval()
