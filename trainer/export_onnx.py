"""``trainer export RUN --format onnx``: the tuned prompt encoder and mask decoder as one ONNX graph.

It is ``segment_anything.utils.onnx.SamOnnxModel``, the model SAM's own ``scripts/export_onnx_model.py``
exports, so it takes and gives what SAM's ONNX demos and their ports expect:

==================  ==========================  =============================================================
input               shape, dtype                meaning
==================  ==========================  =============================================================
image_embeddings    (1, 256, 64, 64) float32    the image encoder's output (a cache embedding, upcast)
point_coords        (1, N, 2) float32           x, y in the model's input frame (long side = the preset's
                                                input side: 1024, or 256 for LiteMedSAM); a box is two
                                                points labelled 2 and 3; N is dynamic
point_labels        (1, N) float32              1 positive, 0 negative, 2/3 box corners, -1 padding (add one
                                                padding point (0, 0) when there is no box, as SAM does)
mask_input          (1, 1, 256, 256) float32    previous low-res logits, or zeros
has_mask_input      (1,) float32                1 to use ``mask_input``, else 0
orig_im_size        (2,) float32                (H, W) of the original image
==================  ==========================  =============================================================

Outputs: ``masks`` ``(1, 4, H, W)`` float32 logits at original size (threshold at 0), ``iou_predictions``
``(1, 4)``, ``low_res_masks`` ``(1, 4, 256, 256)``. Mask 0 is SAM's single-mask output, 1-3 its multimask
outputs (``return_single_mask=False``, the export script's default).

The input side is ``sam.image_encoder.img_size``, which ``SamOnnxModel`` reads itself: 256 for LiteMedSAM,
whose TinyViT records it, so prompt coordinates and the mask crop follow the preset (no 1024 is assumed).
Needs the ``onnx`` extra (``pip install samtune[onnx]``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam

from embedcache.models import build_sam
from trainer.evaluate import postprocess
from trainer.export import ExportError
from trainer.export_hf import require_extra, sam_export_state

OPSET = 18  # the lowest opset torch.onnx's exporter writes
INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def export_onnx(run: str | Path, out: str | Path, *, which: str = "best") -> list[Path]:
    """Write the tuned prompt encoder and mask decoder of run folder ``run`` to the ``.onnx`` file ``out``."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(
            f"--out {out} is a folder; name the .onnx file to write, e.g. {out / 'decoder.onnx'}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=out.parent) as tmp:
        state = sam_export_state(run, Path(tmp), which=which, fmt="onnx")
        sam = build_sam(_model_type(run, which), seed=0)
        sam.load_state_dict(state, strict=True)
        staged = Path(tmp) / out.name
        save_onnx(sam, staged)
        staged.replace(out)
    return [out]


def onnx_model(sam: Sam) -> torch.nn.Module:
    """SAM's own ``SamOnnxModel`` around ``sam`` (every mask returned)."""
    from segment_anything.utils.onnx import SamOnnxModel

    return SamOnnxModel(sam.eval(), return_single_mask=False)


def example_inputs(sam: Sam, num_points: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs of ``onnx_model(sam)`` in ``INPUTS`` order, for tracing and tests (random prompts)."""
    pe = sam.prompt_encoder
    side = sam.image_encoder.img_size
    return (
        torch.randn(1, pe.embed_dim, *pe.image_embedding_size),
        torch.randint(0, side, (1, num_points, 2), dtype=torch.float),
        torch.randint(-1, 4, (1, num_points), dtype=torch.float),
        torch.randn(1, 1, *pe.mask_input_size),
        torch.tensor([1.0]),
        torch.tensor([side * 3 / 4, side], dtype=torch.float),
    )


def save_onnx(sam: Sam, path: Path) -> None:
    """Export ``onnx_model(sam)`` to ``path`` with a dynamic point count, weights inside the file.

    Through ``torch.export`` (strict), not the TorchScript tracer: ``SamOnnxModel`` crops the upsampled
    logits with ``int(prepadded_size[0])``, which the tracer freezes to the example image's size (its masks
    were off by up to 0.45 in logits for other image sizes); ``torch.export`` keeps it a size computed from
    ``orig_im_size`` at run time.
    """
    for module in ("onnx", "onnxscript"):  # what torch.onnx.export needs
        require_extra(module, "onnx")
    num_points = torch.export.Dim("num_points")
    dynamic = dict.fromkeys(INPUTS) | {"point_coords": {1: num_points}, "point_labels": {1: num_points}}
    with warnings.catch_warnings():
        # torch.export's notes on the data-dependent crop size above, which it handles
        warnings.simplefilter("ignore")
        program = torch.export.export(
            onnx_model(sam), example_inputs(sam), dynamic_shapes=dynamic, strict=True
        )
        onnx_program = torch.onnx.export(
            program, input_names=list(INPUTS), output_names=list(OUTPUTS), opset_version=OPSET, verbose=False
        )
    onnx_program.save(str(path), external_data=False)


def _model_type(run: str | Path, which: str) -> str:
    from trainer.checkpoint import weights_and_config

    return weights_and_config(Path(run), which)[1].model.model_type


def object_prompts(cache, j: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Prompts for object ``j`` of a cache as ONNX ``(point_coords (N, 2), point_labels (N,))`` in the input
    frame: its box (corners labelled 2, 3), one click inside it, and two clicks in plus one out; the clicks
    end with SAM's padding point, as the ONNX model expects without a box."""
    i = int(cache.objects.image_index[j])
    (oh, ow), (ih, iw) = cache.original_size[i], cache.input_size[i]
    scale = np.array([iw / ow, ih / oh])
    x1, y1, x2, y2 = (float(v) for v in cache.objects.box[j])
    inside = np.argwhere(cache.mask_crop(j))[:, ::-1] + [x1, y1]  # (n, 2) x, y of mask pixels
    pos = inside[[len(inside) // 2, len(inside) // 5]] + 0.5
    neg = np.array([[x1, y1]]) if x1 > 0 or y1 > 0 else np.array([[x2 - 1, y2 - 1]])
    pad = (np.zeros((1, 2)), np.array([-1.0]))
    return [
        (np.array([[x1, y1], [x2, y2]]) * scale, np.array([2.0, 3.0])),
        (np.concatenate([pos[:1] * scale, pad[0]]), np.concatenate([[1.0], pad[1]])),
        (np.concatenate([pos * scale, neg * scale, pad[0]]), np.concatenate([[1.0, 1.0, 0.0], pad[1]])),
    ]


@torch.no_grad()
def torch_masks(sam: Sam, embedding: torch.Tensor, coords, labels, input_hw, original_hw) -> torch.Tensor:
    """samtune's own torch path for the ONNX model's prompts: ``(1, 4, H, W)`` logits at original size, the
    single-mask output then the three multimask outputs (the ONNX ``masks`` order)."""
    coords = torch.as_tensor(coords, dtype=torch.float32)[None]
    labels = torch.as_tensor(labels)[None].long()
    if (labels == 2).any():  # a box alone, as object_prompts gives it
        points, boxes = None, coords.reshape(1, 4)
    else:  # clicks ending with the padding point, which SAM's prompt encoder appends itself
        points, boxes = (coords[:, :-1], labels[:, :-1]), None
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    low = torch.cat(
        [sam.mask_decoder(embedding, pe, sparse, dense, multimask_output=m)[0] for m in (False, True)], 1
    )
    return postprocess(low, tuple(input_hw), tuple(original_hw), sam.image_encoder.img_size)


def onnx_parity(
    onnx_path: str | Path, sam: Sam, cache, images: np.ndarray, *, objects_per_image: int | None = None
) -> dict:
    """onnxruntime on ``onnx_path`` against ``torch_masks`` for the objects of ``images`` of ``cache`` (the
    first ``objects_per_image`` of each, or all) and each prompt of ``object_prompts``, on the cache's
    embeddings (float16, upcast).

    Returns ``max_logit_diff`` (largest absolute difference of the original-size logits), ``mask_pixels``
    (compared), ``mask_pixels_differing`` (thresholded at 0), ``differing_max_abs_logit`` (the largest
    ``|torch logit|`` at a differing pixel: how close to the threshold a flip was; 0 when none differ) and
    ``prompts`` (ONNX calls made).
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    no_mask = np.zeros((1, 1, *sam.prompt_encoder.mask_input_size), np.float32)
    worst, pixels, differing, flip_logit, prompts = 0.0, 0, 0, 0.0, 0
    for i in images:
        embedding = torch.from_numpy(cache.read_embeddings(np.array([i]))).float()
        original_hw, input_hw = cache.original_size[i], cache.input_size[i]
        start, stop = cache.object_range(int(i))
        for j in range(start, stop if objects_per_image is None else min(stop, start + objects_per_image)):
            for coords, labels in object_prompts(cache, j):
                feed = {
                    "image_embeddings": embedding.numpy(),
                    "point_coords": coords[None].astype(np.float32),
                    "point_labels": labels[None].astype(np.float32),
                    "mask_input": no_mask,
                    "has_mask_input": np.zeros(1, np.float32),
                    "orig_im_size": np.asarray(original_hw, np.float32),
                }
                got = torch.from_numpy(session.run(["masks"], feed)[0])
                ref = torch_masks(sam, embedding, coords, labels, input_hw, original_hw)
                worst = max(worst, float((got - ref).abs().max()))
                flips = (got > 0) != (ref > 0)
                differing += int(flips.sum())
                flip_logit = max(flip_logit, float(ref.abs()[flips].max())) if flips.any() else flip_logit
                pixels += ref.numel()
                prompts += 1
    return {
        "max_logit_diff": worst,
        "mask_pixels": pixels,
        "mask_pixels_differing": differing,
        "differing_max_abs_logit": flip_logit,
        "prompts": prompts,
    }
