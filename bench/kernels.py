"""``bench kernels``: the fused upsample+loss op against its torch reference, forward plus backward.

Both providers are ``kernels.mask_losses`` with ``backend="triton"`` (fused) and ``backend="torch"`` (the
reference, which materialises the ``(P, 4h, 4w)`` upsampled logits and their gradient). One timed call runs
the forward and the backward of ``focal + bce + dice + mse`` summed over masks, with the same inputs for both.
Each size runs with ``(P, 4h, 4w)`` targets (SAM) and with ``(P, h, w)`` ones (upsample factor 1, LiteMedSAM).

Achieved bandwidth counts the bytes the fused op must move, as ``kernels.min_bytes_moved`` defines them:
the forward reads logits and uint8 targets, the backward reads both again (dice needs the forward's sums
first) and writes the logits' gradient: ``44 P h w`` bytes for float32 logits at factor 4, ``14 P h w`` at
factor 1. The same byte count is used for both providers, so the figure is a rate of useful work, and it is
compared with the device's copy bandwidth measured in the same run: the fraction says how far each provider
is from the byte limit of the fused design.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import kernels
from bench.context import Context
from bench.report import Ratio, Row, Section
from bench.timing import Stat, peak_memory, time_kernel


@dataclass(frozen=True, kw_only=True)
class KernelsSize:
    masks: tuple[int, ...]
    """Values of P, the number of masks in one call."""
    h: int
    """Low-resolution logit side (SAM: 256)."""
    factors: tuple[int, ...]
    """Upsample factors: targets are ``f h x f h`` (4: SAM's 1024 input; 1: LiteMedSAM's 256)."""
    warmup: int
    repeats: int


SIZES = {
    "tiny": KernelsSize(masks=(2, 8), h=32, factors=(4, 1), warmup=1, repeats=3),
    "small": KernelsSize(masks=(4, 16, 64), h=64, factors=(4, 1), warmup=2, repeats=7),
    "full": KernelsSize(masks=(16, 64, 256, 1024), h=256, factors=(4, 1), warmup=25, repeats=100),
}


def make_inputs(p: int, h: int, factor: int, device: torch.device, seed: int = 0):
    """``(P, h, h)`` fp32 logits (requiring grad), ``(P, f h, f h)`` uint8 blob targets, ``(P, 2)`` valid
    sizes.

    Targets are thresholded smooth noise, so they have SAM-like blobs rather than salt and pepper; valid sizes
    cover 60-100% of each side, like images resized to the input's long side and padded.
    """
    side = factor * h
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (3 * torch.randn(p, h, h, generator=g)).to(device).requires_grad_(True)
    coarse = torch.randn(p, 1, max(h // 8, 2), max(h // 8, 2), generator=g).to(device)
    targets = (F.interpolate(coarse, (side, side), mode="bilinear") > 0.3)[:, 0].to(torch.uint8)
    vh = torch.randint(int(0.6 * side), side + 1, (p,), generator=g)
    vw = torch.randint(int(0.6 * side), side + 1, (p,), generator=g)
    valid = torch.stack([vh, vw], 1).to(device)
    return logits, targets, valid


def run(ctx: Context) -> Section:
    size = SIZES[ctx.size]
    t_start = time.perf_counter()
    copy = ctx.limit("copy")
    sec = Section(bench="kernels", size=ctx.size, config=asdict(size))
    sec.limits[ctx.limit_name("copy")] = copy
    providers = [("reference", "torch"), ("fused", "triton")]
    times: dict[tuple[str, int, int], Stat] = {}  # (provider, factor, P)
    peaks: dict[tuple[str, int, int], Stat] = {}
    for factor, p in ((factor, p) for factor in size.factors for p in size.masks):
        logits, targets, valid = make_inputs(p, size.h, factor, ctx.device)
        cfg = {
            "P": p,
            "h": size.h,
            "w": size.h,
            "factor": factor,
            "targets": f"{factor * size.h}x{factor * size.h} uint8",
            "logits": "fp32",
        }
        compulsory = kernels.min_bytes_moved(p, size.h, size.h, torch.float32, factor=factor)
        for name, backend in providers:
            why = _unavailable(name, ctx)
            if why:
                sec.rows.append(
                    Row(case="mask_losses fwd+bwd", provider=name, config=cfg, status="unavailable", note=why)
                )
                continue

            def step(backend=backend, inputs=(logits, targets, valid)):
                out = kernels.mask_losses(*inputs, backend=backend)
                (out.focal + out.bce + out.dice + out.mse).sum().backward()

            try:
                ms = time_kernel(
                    step, device=ctx.device, warmup=size.warmup, repeats=size.repeats, grad_to_none=[logits]
                )
                logits.grad = None
                peak = peak_memory(step, device=ctx.device)
            except torch.OutOfMemoryError:
                logits.grad = None
                if ctx.cuda:
                    torch.cuda.empty_cache()
                sec.rows.append(
                    Row(
                        case="mask_losses fwd+bwd",
                        provider=name,
                        config=cfg,
                        status="unavailable",
                        note="out of memory",
                    )
                )
                continue
            logits.grad = None
            bw = ms.map(lambda t, b=compulsory: b / (t * 1e-3) / 1e9, "GB/s")
            times[name, factor, p], peaks[name, factor, p] = ms, peak
            sec.rows.append(
                Row(
                    case="mask_losses fwd+bwd",
                    provider=name,
                    config=cfg,
                    metrics={
                        "time": ms,
                        "peak memory": peak,
                        "achieved bandwidth": bw,
                        "of copy bandwidth": bw.map(lambda b: 100 * b / copy.median, "%"),
                    },
                )
            )
        step = None  # drop the last closure's hold on this P's inputs before the next, larger P
        del logits, targets, valid
        if ctx.cuda:
            torch.cuda.empty_cache()
    for key in times:
        name, factor, p = key
        if name == "fused" and ("reference", factor, p) in times:
            cfg = {"P": p, "h": size.h, "factor": factor}
            sec.ratios.append(
                Ratio(
                    name="fused speed-up (reference time / fused time)",
                    config=cfg,
                    value=times["reference", factor, p].median / times[key].median,
                )
            )
            sec.ratios.append(
                Ratio(
                    name="peak memory saved (reference / fused)",
                    config=cfg,
                    value=peaks["reference", factor, p].median / peaks[key].median,
                )
            )
    sec.notes += _notes(ctx, size, times, copy)
    if ctx.out is not None:
        sec.plots += _plot(ctx, size, times)
    sec.seconds = time.perf_counter() - t_start
    return sec


def _unavailable(provider: str, ctx: Context) -> str | None:
    if provider != "fused":
        return None
    if not ctx.cuda:
        # The Triton op runs on CPU only under TRITON_INTERPRET=1, a debugging interpreter: its times say
        # nothing about the kernel, so no CPU figure is reported for it.
        return "needs CUDA (on CPU only the Triton interpreter runs it, which is not a speed measure)"
    return None


def _notes(ctx: Context, size: KernelsSize, times: dict, copy: Stat) -> list[str]:
    notes = [
        "One call = forward and backward of focal+bce+dice+mse over all masks (fp32 logits, uint8 targets). "
        + (
            "Timed with triton.testing.do_bench (L2 flushed between calls); quantiles over its samples."
            if ctx.cuda
            else f"Timed by wall clock, {size.warmup} warm-up + {size.repeats} timed calls."
        ),
        "Achieved bandwidth = kernels.min_bytes_moved (fwd reads logits + uint8 targets, bwd reads both "
        "again and writes the logit gradient: 44 P h w bytes at factor 4, 14 P h w at factor 1) / time; the "
        "copy bandwidth (read + write, measured in the same run) is the ceiling for such an op.",
        "Peak memory = most bytes allocated during one call above those allocated before it "
        + ("(CUDA caching allocator counters)." if ctx.cuda else "(live tensor storage of op outputs; CPU)."),
    ]
    if not ctx.cuda:
        notes.append(
            "No GPU in this run: only the reference is timed. Its CPU time says how the materialised path "
            "scales with P, not how the fused op would compare."
        )
    for (name, factor, p), stat in times.items():
        if name == "fused":
            ms = stat.median
            # The byte bound: the time the compulsory bytes take at the measured copy bandwidth.
            floor = kernels.min_bytes_moved(p, size.h, size.h, torch.float32, factor=factor)
            floor_ms = floor / (copy.median * 1e9) * 1e3
            notes.append(
                f"P={p}, factor {factor}: fused {ms:.3g} ms vs byte floor {floor_ms:.3g} ms at copy "
                f"bandwidth ({floor_ms / ms:.0%} of the byte limit reached)."
            )
    return notes


def _plot(ctx: Context, size: KernelsSize, times: dict) -> list[str]:
    from bench.plots import line_plot

    series = {}
    for name in ("reference", "fused"):
        for factor in size.factors:
            pts = [(p, times[name, factor, p]) for p in size.masks if (name, factor, p) in times]
            if pts:
                series[f"{name}, targets {factor}x the logits"] = pts
    if not series:
        return []
    return [
        line_plot(
            ctx,
            "kernels_time_vs_masks",
            series,
            xlabel="masks per call (P)",
            ylabel="fwd+bwd time (ms)",
            title=f"mask_losses fwd+bwd, {size.h}x{size.h} logits, {ctx.env.device}",
        )
    ]
