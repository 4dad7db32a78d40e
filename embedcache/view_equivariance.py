"""Is transforming a cached embedding the same as encoding the transformed image? Measured on a cache built
with ``--views``, whose views hold the encoder's answer for the transformed images.

For each image and view the identity's embedding is transformed in token space (its valid ``(th, tw)``
token region, ``th = ceil(h * 64 / S)`` for input size ``h`` and side ``S``; the padding tokens are left where
they are, as a free embedding-space flip would leave them) and compared with the view's own embedding over
the valid region: relative error ``|T(e) - e_v| / |e_v|`` and cosine per token. Then every object's box (the
view's own, in its input frame) prompts the decoder on both embeddings; the two thresholded masks are
compared by IoU, and each against the view's ground truth. A view that transposes is measured only on
images whose token region is square (elsewhere it does not fit the grid).

    python -m embedcache.view_equivariance CACHE.zarr --checkpoint lite_medsam
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from embedcache.cache import Cache, open_cache
from embedcache.models import build_sam
from embedcache.views import VIEWS
from embedcache.weights import resolve_checkpoint

GRID = 64  # embedding tokens per side


def token_region(c: Cache, i: int) -> tuple[int, int]:
    """``(th, tw)``: the tokens of image ``i`` that see any image pixel (the rest see only padding)."""
    h, w = (int(v) for v in c.input_size[i])
    return math.ceil(h * GRID / c.image_size), math.ceil(w * GRID / c.image_size)


def transform_embedding(emb: np.ndarray, view: str, region: tuple[int, int]) -> np.ndarray | None:
    """``(256, 64, 64)`` embedding with its valid ``region`` transformed by ``view`` in token space (padding
    tokens left as they are); None when the view transposes a non-square region."""
    th, tw = region
    v = VIEWS[view]
    if v.transpose and th != tw:
        return None
    out = emb.copy()
    out[:, :th, :tw] = np.moveaxis(v.apply(np.moveaxis(emb[:, :th, :tw], 0, -1)), -1, 0)
    return out


@torch.no_grad()
def box_masks(sam, emb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``(n, 256, 256)`` bool: the decoder's single mask for each ``(n, 4)`` input-frame box, logits > 0."""
    pe = sam.prompt_encoder
    sparse, dense = pe(points=None, boxes=torch.from_numpy(boxes).float(), masks=None)
    logits, _ = sam.mask_decoder(
        image_embeddings=torch.from_numpy(emb).float()[None],
        image_pe=pe.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return (logits[:, 0] > 0).numpy()


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n,)`` IoU of two ``(n, H, W)`` bool stacks (1 where both are empty)."""
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def measure(c: Cache, sam, max_images: int) -> dict:
    """Per view: relative error, mean token cosine, mIoU between the two box masks, and each one's mIoU
    against the view's ground truth (low-res frame)."""
    rows = {}
    images = c.images_with_objects("all")[:max_images]
    for view in c.views[1:]:
        cv = c.view(view)
        rel, cos, agree, enc_gt, flip_gt, skipped = [], [], [], [], [], 0
        for i in images:
            region = token_region(c, int(i))
            got = transform_embedding(c.read_embeddings([i])[0].astype(np.float32), view, region)
            if got is None:
                skipped += 1
                continue
            want = cv.read_embeddings([i])[0].astype(np.float32)
            vr = token_region(cv, int(i))
            a, b = got[:, : vr[0], : vr[1]], want[:, : vr[0], : vr[1]]
            rel.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
            cos.append(float(F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=0).mean()))
            start, stop = cv.object_range(int(i))
            objs = np.arange(start, stop)
            objs = objs[cv.objects.input_area[objs] > 0]
            # the prompt encoder's frame is the input frame (1024 for SAM, 256 for LiteMedSAM)
            boxes = np.stack([cv.input_mask_crop(int(j))[0] for j in objs]).astype(np.float32)
            m_enc, m_flip = box_masks(sam, want, boxes), box_masks(sam, got, boxes)
            gt = cv.masks(objs, "lowres")
            agree += iou(m_enc, m_flip).tolist()
            enc_gt += iou(m_enc, gt).tolist()
            flip_gt += iou(m_flip, gt).tolist()
        rows[view] = {
            "images": len(rel),
            "skipped_non_square": skipped,
            "objects": len(agree),
            "rel_error_mean": float(np.mean(rel)) if rel else None,
            "rel_error_max": float(np.max(rel)) if rel else None,
            "token_cosine_mean": float(np.mean(cos)) if cos else None,
            "miou_flip_vs_encoded": float(np.mean(agree)) if agree else None,
            "miou_encoded_vs_gt": float(np.mean(enc_gt)) if enc_gt else None,
            "miou_flip_vs_gt": float(np.mean(flip_gt)) if flip_gt else None,
        }
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", help="a cache built with --views")
    p.add_argument("--checkpoint", help="the weights the cache was built with (name or path)")
    p.add_argument("--max-images", type=int, default=8)
    args = p.parse_args(argv)
    c = open_cache(args.cache)
    if len(c.views) < 2:
        raise SystemExit(f"{args.cache}: built without --views; nothing to compare")
    sam = build_sam(c.signature["model_type"], resolve_checkpoint(args.checkpoint)).eval()
    print(
        json.dumps(
            {"cache": str(c.path), "model": c.signature["model_type"], **measure(c, sam, args.max_images)}
        )
    )


if __name__ == "__main__":
    main()
