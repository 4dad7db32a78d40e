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
from trainer.evaluate import postprocess


class Predictor:
    """``set_image(image)`` once, then ``predict(box=..., point_coords=..., ...)`` per prompt.

    Args:
        sam: a ``Sam`` built for ``model_type`` (``embedcache.models.build_sam``, or ``trainer export``'s
            file loaded by it).
        model_type: the preset name (``lite_medsam``, ``vit_b``, ...): its resize rule, normalisation and
            input side.
    """

    def __init__(self, sam: Sam, model_type: str):
        self.sam = sam.eval()
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

    def _to_input_frame(self, xy: np.ndarray) -> np.ndarray:
        """``(..., 2)`` x, y in original pixels -> the input frame, per axis (as
        ``ResizeLongestSide.apply_coords``; MedSAM's square stretch scales the two axes differently)."""
        (oh, ow), (ih, iw) = self.original_size, self.input_size
        return np.asarray(xy, np.float64) * np.array([iw / ow, ih / oh])

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
        points = None
        if point_coords is not None:
            coords = torch.as_tensor(self._to_input_frame(point_coords), dtype=torch.float32, device=dev)
            labels = torch.as_tensor(np.asarray(point_labels), dtype=torch.int64, device=dev)
            points = (coords[None], labels[None])
        boxes = None
        if box is not None:
            xyxy = self._to_input_frame(np.asarray(box, np.float64).reshape(2, 2)).reshape(1, 4)
            boxes = torch.as_tensor(xyxy, dtype=torch.float32, device=dev)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low, iou = self.sam.mask_decoder(
            image_embeddings=self.features,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        full = postprocess(low, self.input_size, self.original_size, self.preset.image_size) > 0
        return full[0].cpu().numpy(), iou[0].cpu().numpy(), low[0].cpu().numpy()
