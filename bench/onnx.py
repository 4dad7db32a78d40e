"""``bench onnx``: the exported ONNX prompt encoder + mask decoder on onnxruntime against the same model in
torch, on the CPU, one prompt per call, the two providers' calls alternating.

Both providers run ``segment_anything.utils.onnx.SamOnnxModel`` (``trainer.export_onnx``) on the same inputs:
one image embedding, a box (two corner points) and, as SAM's ONNX demos call it, every mask upsampled to
the original image size. torch runs the module itself under ``no_grad``; onnxruntime runs the file
``trainer export --format onnx`` writes, on its CPU execution provider. The model is LiteMedSAM (random init:
timing does not depend on the weights; its 256 input side is the preset the ONNX export was checked on).
The export itself is timed once. Needs the ``onnx`` extra; not part of ``bench all``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bench.context import Context
from bench.report import Ratio, Row, Section
from bench.timing import Stat, time_call


@dataclass(frozen=True, kw_only=True)
class OnnxSize:
    image_hw: tuple[int, int]
    """Original image size the masks are upsampled to."""
    warmup: int
    repeats: int


SIZES = {
    "tiny": OnnxSize(image_hw=(256, 256), warmup=2, repeats=10),
    "small": OnnxSize(image_hw=(512, 512), warmup=5, repeats=50),
    "full": OnnxSize(image_hw=(1024, 1024), warmup=10, repeats=200),
}
MODEL = "lite_medsam"


def run(ctx: Context) -> Section:
    import onnxruntime

    from embedcache.models import build_sam
    from trainer.export_onnx import INPUTS, onnx_model, save_onnx

    if ctx.device.type != "cpu":
        raise RuntimeError("bench onnx compares CPU runtimes; run it with --device cpu")
    size = SIZES[ctx.size]
    t_start = time.perf_counter()
    sam = build_sam(MODEL, seed=0)
    path = ctx.work / f"{MODEL}_decoder.onnx"
    t0 = time.perf_counter()
    save_onnx(sam, path)
    export_s = time.perf_counter() - t0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    side = sam.image_encoder.img_size
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 256, 64, 64, generator=g),
        torch.tensor([[[0.2 * side, 0.3 * side], [0.7 * side, 0.8 * side]]]),
        torch.tensor([[2.0, 3.0]]),
        torch.zeros(1, 1, 256, 256),
        torch.zeros(1),
        torch.tensor(size.image_hw, dtype=torch.float32),
    )
    feed = {k: v.numpy() for k, v in zip(INPUTS, inputs)}
    model = onnx_model(sam)

    @torch.no_grad()
    def torch_call():
        return model(*inputs)

    config = {
        "model": MODEL,
        "image_hw": list(size.image_hw),
        "prompt": "box",
        "threads": torch.get_num_threads(),
    }
    sec = Section(bench="onnx", size=ctx.size, config={**asdict(size), "model": MODEL})
    providers = {"torch": torch_call, "onnxruntime": lambda: session.run(None, feed)}
    samples = {name: [] for name in providers}
    for fn in providers.values():
        time_call(fn, device=ctx.device, warmup=size.warmup, repeats=0)
    # alternating calls, so that a change in the host's load between two blocks of calls cannot bias the ratio
    for _ in range(size.repeats):
        for name, fn in providers.items():
            samples[name] += time_call(fn, device=ctx.device, warmup=0, repeats=1)
    stats = {}
    for name in providers:
        stats[name] = Stat.of([s * 1e3 for s in samples[name]], "ms")
        sec.rows.append(
            Row(case="prompt -> masks", provider=name, config=config, metrics={"latency": stats[name]})
        )
    sec.rows.append(
        Row(
            case="export",
            provider="torch.onnx (torch.export)",
            config={"model": MODEL},
            metrics={"time": Stat.single(export_s, "s")},
        )
    )
    sec.ratios.append(
        Ratio(
            name="onnxruntime / torch latency",
            value=stats["onnxruntime"].median / stats["torch"].median,
            config=config,
        )
    )
    got, want = session.run(["masks"], feed)[0], torch_call()[0].numpy()
    sec.notes.append(
        f"Same run, same inputs: the largest difference between the two providers' mask logits was "
        f"{float(np.abs(got - want).max()):.2e}. torch used {torch.get_num_threads()} threads, onnxruntime "
        "its default (one per core)."
    )
    sec.seconds = time.perf_counter() - t_start
    return sec
