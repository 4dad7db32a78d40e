"""``AutoSegmenter``: every object of a new image file, without prompts, from any model samtune scores.

``AutoSegmenter(path).segment(image)`` encodes the image with the model's own image encoder and the preset's
preprocessing (``trainer.predictor.Predictor``, the code the cache was built with), then runs AMG
(``trainer.amg``) on the embedding, or, for a model with an AIS head (a ``model.task=ais`` run or its
export), the head and its seeded watershed (``trainer.ais``). The embedding is rounded to the cache's storage
dtype (float16) first, so the labels are the ones ``trainer eval --auto amg|ais`` scored for the same image
and settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from embedcache.images import load_image
from embedcache.models import build_sam
from embedcache.signature import STORAGE_DTYPE
from trainer.ais import ais_labels
from trainer.amg import AmgConfig, amg_labels
from trainer.decoder import PromptedDecoder
from trainer.predictor import Predictor


class AutoSegmenter:
    """Automatic instance segmentation of image files.

    Args:
        model: a ``trainer run`` folder (its tuned model), an official checkpoint name (``lite_medsam``,
            ``vit_b``, ...) or a file ``trainer export`` wrote (``trainer.load_tuned``: its sidecars too).
        model_type: the preset of a state dict file without an export manifest (the others know theirs).
        which: the run's checkpoint: ``best``, ``last`` or a step number.
        amg: AMG's settings (default SAM's); a model with an AIS head segments with it instead.
        channels: the ``embedcache build --channels`` the model's cache was built with, for image files of
            undeclared channels.
        device: where the model runs (default CUDA when there is one).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        model_type: str | None = None,
        which: str = "best",
        amg: AmgConfig | None = None,
        channels: tuple[int, int, int] | None = None,
        device: str | torch.device | None = None,
    ):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        sam, model_type, ais_head = _load(model, model_type, which)
        self.predictor = Predictor(sam.to(device), model_type)
        # the full encoder made the embedding (an encoder tail included), so only the decoder half runs here
        self.decoder = (
            PromptedDecoder(sam.prompt_encoder, sam.mask_decoder, ais_head=ais_head).to(device).eval()
        )
        self.amg = amg or AmgConfig()
        self.channels = channels

    @torch.no_grad()
    def segment(self, image: str | Path | np.ndarray) -> np.ndarray:
        """``(H, W)`` int32 instance labels (0 background) of an image file or an ``(H, W, 3)`` uint8 RGB
        array, at its original size."""
        if not isinstance(image, np.ndarray):
            image = load_image(Path(image), self.channels)
        self.predictor.set_image(image)
        p = self.predictor
        embedding = p.features.to(getattr(torch, STORAGE_DTYPE))  # what the cache stores, see the docstring
        if self.decoder.ais_head is not None:
            return ais_labels(self.decoder, embedding, p.input_size, p.original_size, p.preset.image_size)
        return amg_labels(
            self.decoder, embedding, p.input_size, p.original_size, p.preset.image_size, self.amg
        )


def _load(model: str | Path, model_type: str | None, which: str):
    """``(Sam, preset name, AIS head or None)`` for ``AutoSegmenter``'s ``model``."""
    from embedcache.weights import ALIASES, OFFICIAL, resolve_checkpoint
    from trainer.tuned import load_tuned

    if Path(model).is_dir():  # a run folder
        from trainer import checkpoint as ckpt
        from trainer.model import tuned_sam

        weights, cfg = ckpt.weights_and_config(Path(model), which)
        sam, tuned = tuned_sam(cfg, weights)
        if tuned.semantic_head is not None:
            raise ValueError(f"{model}: a semantic run has no IoU head for AMG; segment with its class head")
        return sam, cfg.model.model_type, tuned.ais_head
    name = ALIASES.get(str(model), str(model))
    if name in OFFICIAL and not Path(model).is_file():
        return build_sam(OFFICIAL[name].model_type, resolve_checkpoint(name)), OFFICIAL[name].model_type, None
    tuned = load_tuned(model, model_type=model_type)
    if tuned.model.semantic_head is not None:
        raise ValueError(f"{model}: a semantic export has no IoU head for AMG; segment with its class head")
    return tuned.sam, tuned.model_type, tuned.model.ais_head
