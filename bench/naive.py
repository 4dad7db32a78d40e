"""The naive fine-tuning loop of the well-known tutorial: the baseline ``bench train`` compares against.

Not product code. Per image, every epoch: load the file, resize it and run the frozen image encoder (fp32,
batch 1, no grad); then per object, one at a time: its box through the frozen prompt encoder, the mask decoder
with gradients, ``Sam.postprocess_masks`` to the original resolution, a loss against the original-size mask,
backward, and an Adam step on the mask decoder. The tutorial's loss, ``MSE(normalize(threshold(x)), gt)``,
has zero gradient (see trainer/losses.py), so this baseline uses ``MSE(sigmoid(x), gt)``: the same per-pixel
work at the same resolution, and one that trains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


class NaiveLoop:
    """One tutorial-style pass over some images of a cache's source dataset."""

    def __init__(self, sam: Sam, cache, images: list[int], device: torch.device, *, data: Path):
        """``images``: cache images with objects (``Cache.images_with_objects``). ``data``: the folder the
        cache was built from (``cache.image_path`` is relative to it)."""
        from embedcache.images import load_image

        self.sam = sam.to(device)
        self.sam.image_encoder.requires_grad_(False)
        self.sam.prompt_encoder.requires_grad_(False)
        self.sam.mask_decoder.requires_grad_(True)
        self.opt = torch.optim.Adam(self.sam.mask_decoder.parameters(), lr=1e-5, weight_decay=0)
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.device = device
        self.load_image = load_image
        self.items = []
        for i in images:
            objs = np.arange(*cache.object_range(int(i)))
            path = Path(data) / str(cache.image_path[int(i)])
            masks = [torch.from_numpy(m).float() for m in cache.masks(objs, "original")]
            self.items.append((path, cache.objects.box[objs], masks))
        self.prompts = sum(len(m) for _, _, m in self.items)

    def epoch(self) -> None:
        """One pass: every image re-encoded, every object its own decoder step."""
        sam, dev = self.sam, self.device
        for path, boxes, masks in self.items:
            image = self.load_image(path)
            original = image.shape[:2]
            resized = self.transform.apply_image(image)
            x = torch.as_tensor(resized, device=dev).permute(2, 0, 1).contiguous()[None]
            x = sam.preprocess(x)
            input_size = tuple(resized.shape[:2])
            with torch.no_grad():
                embedding = sam.image_encoder(x)
            for box, gt in zip(boxes, masks):
                b = torch.as_tensor(self.transform.apply_boxes(box[None], original), device=dev)
                with torch.no_grad():
                    sparse, dense = sam.prompt_encoder(points=None, boxes=b, masks=None)
                low_res, _ = sam.mask_decoder(
                    image_embeddings=embedding,
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                up = sam.postprocess_masks(low_res, input_size, original)
                loss = F.mse_loss(torch.sigmoid(up[0, 0]), gt.to(dev))
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
