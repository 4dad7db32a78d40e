"""``Predictor``: ``SamPredictor``'s interface for every preset, with the preset's own preprocessing.

``segment_anything.SamPredictor`` hard-codes SAM's recipe (longest side to ``image_encoder.img_size`` with
PIL, mean/std normalisation); LiteMedSAM resizes with OpenCV's area filter and min-max scales, MedSAM
stretches the image to the full square. ``Predictor`` runs ``embedcache.preprocess`` (the code the cache was
built with), so a model scored by ``trainer eval`` on a cache gives the same masks here from the image file.
For the SAM presets it is ``SamPredictor`` in effect (tests/test_predictor.py holds it to that).
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam

from embedcache.preprocess import resize, to_model_input
from embedcache.presets import get_preset
from trainer.decoder import PromptedDecoder
from trainer.evaluate import postprocess
from trainer.prompts import Prompts, to_input_frame
from trainer.tuned import TunedSam


class Predictor:
    """``set_image(image)`` once, then ``predict(box=..., point_coords=..., ...)`` per prompt.

    Args:
        model: a tuned model (``trainer.load_tuned``: its variants in place, predicting through its
            ``PromptedDecoder``), or a ``Sam`` (``embedcache.models.build_sam``, or ``trainer export``'s file
            loaded by it).
        model_type: the preset name (``lite_medsam``, ``vit_b``, ...): its resize rule, normalisation and
            input side; a tuned model knows its own.
    """

    def __init__(self, model: Sam | TunedSam, model_type: str | None = None):
        if isinstance(model, TunedSam):
            sam, decoder, model_type = model.sam, model.model, model_type or model.model_type
        else:
            sam, decoder = model, PromptedDecoder(model.prompt_encoder, model.mask_decoder)
        if model_type is None:
            raise ValueError("Predictor(sam, model_type): name the preset of a plain Sam")
        self.sam = sam.eval()
        self.decoder = decoder.eval()
        """The prompt encoder and decoder (and head): prompts go through the model's own forward."""
        self.preset = get_preset(model_type)
        self.features: torch.Tensor | None = None
        """``(1, 256, 64, 64)`` image embedding of the image set last."""
        self.original_size: tuple[int, int] = (0, 0)
        self.input_size: tuple[int, int] = (0, 0)

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """Encode one ``(H, W, 3)`` uint8 RGB image."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        resized = resize(image, self.preset)
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.input_size = (int(resized.shape[0]), int(resized.shape[1]))
        self.features = self.sam.image_encoder(to_model_input([resized], self.preset, self.device))

    @torch.no_grad()
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt, as ``SamPredictor.predict`` returns them.

        Args:
            point_coords: ``(N, 2)`` x, y in original pixels.
            point_labels: ``(N,)`` 1 positive, 0 negative.
            box: ``(4,)`` xyxy in original pixels.
        Returns:
            ``(C, H, W)`` bool masks, ``(C,)`` predicted IoUs, ``(C, 256, 256)`` low-res logits; C is 3 with
            ``multimask_output`` else 1.
        """
        if self.features is None:
            raise RuntimeError("call set_image before predict")
        dev = self.device
        frame = (self.original_size, self.input_size)
        n = 0 if point_coords is None else len(point_coords)
        prompts = None  # no prompt at all: no sparse tokens, as PromptEncoder gives
        if n or box is not None:
            coords = to_input_frame(np.zeros((0, 2)) if not n else point_coords, *frame)
            xyxy = None if box is None else to_input_frame(np.asarray(box).reshape(2, 2), *frame)
            prompts = Prompts(
                point_coords=torch.as_tensor(coords[None], dtype=torch.float32, device=dev),
                point_labels=torch.as_tensor(
                    np.asarray(point_labels if n else [], np.int64)[None], device=dev
                ),
                boxes=None
                if xyxy is None
                else torch.as_tensor(xyxy.reshape(1, 4), dtype=torch.float32, device=dev),
                has_box=None if xyxy is None else torch.ones(1, dtype=torch.bool, device=dev),
            )
        out = self.decoder.decode_prompts(
            self.features, torch.zeros(1, dtype=torch.long, device=dev), prompts
        )
        # SAM's MaskDecoder.forward: output 0 alone, or the three multimask outputs
        pick = slice(1, None) if multimask_output else slice(0, 1)
        low, iou = out.logits[:, pick], out.iou[:, pick]
        full = postprocess(low, self.input_size, self.original_size, self.preset.image_size) > 0
        return full[0].cpu().numpy(), iou[0].cpu().numpy(), low[0].cpu().numpy()
