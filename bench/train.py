"""``bench train``: prompts/s of the trainer's step per residency mode, against two baselines.

Providers, on one synthetic cache (:mod:`bench.data`), decoder-only box prompts (no corrective rounds, single
mask output), trainer's default loss weights:

- ``trainer <mode>`` for ``stream``, ``host`` and ``device`` residency: the trainer's own step,
  ``trainer.session.train_step`` on a session from ``trainer.session.setup``, exactly as ``trainer run``
  calls it: ``Prefetcher`` over ``ImageStore`` (background readers, pinned copies), ``Batch.to``, the
  instance task's loss (prompts + one decoder call + ``trainer.losses.instance_loss`` through ``kernels``),
  ``accelerator.accumulate``/``backward``, gradient clipping, the optimiser step, and the host read of the
  loss (the finite check);
- ``trainer device, reference loss``: the same with the trainer's ``loss.backend=torch``, i.e.
  ``kernels.mask_losses(backend="torch")`` (GPU only; on CPU the trainer already runs the reference);
- ``naive loop`` (:mod:`bench.naive`): the tutorial's loop, re-encoding each image and stepping once per
  object;
- ``trainer host, model.task=ais``: the AIS task's step (its head on the step's images, no prompts), and its
  step time over the decoder-only host step's.

A step is timed by wall clock from asking the loader for a batch to the host read of the loss (which waits for
the GPU), so it includes any wait for data; "data wait" is the part spent blocked on the loader. One extra
step runs under op and FLOP counters, to say what bounds a step: FLOPs at the measured matmul rate, launches
at the measured per-op latency, or data.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.context import Context
from bench.data import synthetic_cache
from bench.report import Ratio, Row, Section
from bench.timing import Stat, peak_memory, sync, time_call

MODES = ("stream", "host", "device")


@dataclass(frozen=True, kw_only=True)
class TrainSize:
    images_per_batch: int
    """B: images per step."""
    max_objects: int
    """K: objects per image per step (at most)."""
    warmup_steps: int
    """Untimed steps first; at full size at least one epoch, so host/device residency is filled."""
    steps: int
    """Timed steps per provider."""
    naive_model: str
    """Encoder the naive loop re-encodes with (the tutorial fine-tunes vit_b)."""
    naive_images: int
    """Images per timed pass of the naive loop."""
    naive_repeats: int
    naive_warmup: int
    """Untimed naive passes (0 at tiny size: a smoke run, not a measurement)."""


SIZES = {
    # On 2 CPU cores one decoder prompt costs ~10 GFLOP fwd+bwd with the loss at 1024x1024: ~0.5-1 s.
    "tiny": TrainSize(
        images_per_batch=1, max_objects=1, warmup_steps=1, steps=1, naive_model="vit_tiny", naive_images=1,
        naive_repeats=1, naive_warmup=0,
    ),
    "small": TrainSize(
        images_per_batch=2, max_objects=2, warmup_steps=2, steps=5, naive_model="vit_tiny", naive_images=2,
        naive_repeats=2, naive_warmup=1,
    ),
    "full": TrainSize(
        images_per_batch=16, max_objects=16, warmup_steps=40, steps=100, naive_model="vit_b", naive_images=8,
        naive_repeats=2, naive_warmup=1,
    ),
}  # fmt: skip


def bench_config(size: TrainSize, mode: str, *, backend: str = "auto"):
    """The trainer config every trainer provider runs: vit_tiny cache, decoder-only box prompts.

    ``backend`` is the trainer's ``loss.backend``: ``auto`` (fused Triton on CUDA) or ``torch`` (reference).
    """
    from trainer.config import Config, DataConfig, LossConfig, PromptConfig

    return Config(
        data=DataConfig(images_per_batch=size.images_per_batch, max_objects=size.max_objects, residency=mode),
        prompts=PromptConfig(box_fraction=1.0, corrective_rounds=0, multimask=False),
        loss=LossConfig(backend=backend),
    )


@dataclass(kw_only=True)
class StepTimes:
    step_s: list[float]
    wait_s: list[float]
    prompts: list[int]
    steps_per_epoch: int
    peak: Stat
    residency: str
    ops: int
    flops: int


def time_trainer(ctx: Context, cache_path, cfg, *, warmup: int, steps: int, out: Path) -> StepTimes:
    """Run the trainer's ``train_step`` ``warmup + steps`` times on a fresh session; time the last ``steps``.

    ``out`` is the session's run folder (it gets the resolved ``config.yaml``; nothing else is written).
    """
    from trainer import session as trainer_session

    s = trainer_session.setup(cache_path, cfg, out, cpu=not ctx.cuda)
    s.model.train()

    def one_step():
        return trainer_session.train_step(s)

    try:
        for _ in range(warmup):
            one_step()
        sync(s.device)
        step_s, wait_s, prompts = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            stats = one_step()
            step_s.append(time.perf_counter() - t0)
            wait_s.append(stats.data_wait_s)
            prompts.append(stats.prompts)
        peak, ops, flops = profile_step(one_step, s.device)
    finally:
        s.loader.close()
        s.accelerator.free_memory()  # drop the accelerator's references to this provider's model
    return StepTimes(
        step_s=step_s,
        wait_s=wait_s,
        prompts=prompts,
        steps_per_epoch=s.per_epoch,
        peak=peak,
        residency=s.store.residency,
        ops=ops,
        flops=flops,
    )


def profile_step(fn, device: torch.device) -> tuple[Stat, int, int]:
    """``(peak memory, aten ops, FLOPs)`` of one call of ``fn``, all from the same call.

    Triton launches are not aten ops, so they are not counted. On CUDA the peak comes from the allocator,
    which the counting modes do not change.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def counted():
        with FlopCounterMode(display=False) as flops, Count():
            fn()
        counted.flops = int(flops.get_total_flops())

    peak = peak_memory(counted, device=device)
    return peak, Count.n, counted.flops


def run(ctx: Context) -> Section:
    size = SIZES[ctx.size]
    t_start = time.perf_counter()
    cache_path, data = synthetic_cache(ctx)
    matmul, latency = ctx.limit("matmul"), ctx.limit("op_latency")
    sec = Section(bench="train", size=ctx.size, config={**asdict(size), "cache": cache_path.name})
    sec.limits[ctx.limit_name("matmul")] = matmul
    sec.limits[ctx.limit_name("op_latency")] = latency
    rates: dict[str, Stat] = {}
    results: dict[str, StepTimes] = {}
    plan = [(f"trainer {m}", m, False) for m in MODES] + [("trainer device, reference loss", "device", True)]
    for name, mode, reference in plan:
        cfg_row = {"residency": mode, "B": size.images_per_batch, "K": size.max_objects}
        why = None
        if mode == "device" and not ctx.cuda:
            why = "needs CUDA (on CPU the trainer turns device residency into host)"
        elif reference and not ctx.cuda:
            why = "on CPU the trainer already runs the torch reference loss, so this equals 'trainer host'"
        if why:
            sec.rows.append(
                Row(case="train step", provider=name, config=cfg_row, status="unavailable", note=why)
            )
            continue
        cfg = bench_config(size, mode, backend="torch" if reference else "auto")
        out = ctx.work / "train_runs" / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)  # a fresh run folder: setup refuses one holding checkpoints
        st = time_trainer(ctx, cache_path, cfg, warmup=size.warmup_steps, steps=size.steps, out=out)
        results[name] = st
        step = Stat.of(st.step_s, "s")
        rate = Stat.of([p / s for p, s in zip(st.prompts, st.step_s)], "prompts/s")
        rates[name] = rate
        sec.rows.append(
            Row(
                case="train step",
                provider=name,
                config={**cfg_row, "loss": "torch reference" if reference or not ctx.cuda else "fused"},
                metrics={
                    "throughput": rate,
                    "step": step.map(lambda s: s * 1e3, "ms"),
                    "epoch": step.map(lambda s, k=st.steps_per_epoch: s * k, "s/epoch"),
                    "data wait": Stat.of([100 * w / s for w, s in zip(st.wait_s, st.step_s)], "% of step"),
                    "prompts per step": Stat.of(st.prompts, "prompts"),
                    "peak memory": st.peak,
                },
            )
        )
    _ais_row(ctx, size, cache_path, sec, results)
    from bench.adapt import add_rows

    add_rows(ctx, sec)  # encoder adaptation: partial-cache tails against decoder-only and full-encoder LoRA
    naive = _naive(ctx, size, cache_path, data, sec)
    if naive is not None:
        rates["naive loop"] = naive
    _ratios(ctx, sec, rates)
    sec.notes += _notes(ctx, size, results, matmul, latency)
    if rates:
        from bench.plots import bar_plot

        sec.plots.append(
            bar_plot(
                ctx,
                "train_prompts_per_s",
                rates,
                ylabel="prompts/s (median, min-max)",
                title=f"training, {ctx.env.device}, B={size.images_per_batch} K={size.max_objects}",
            )
        )
    sec.seconds = time.perf_counter() - t_start
    return sec


def _ais_row(ctx: Context, size: TrainSize, cache_path, sec: Section, results: dict) -> None:
    """The AIS task's step (``model.task=ais``: the head on every image of the step, no prompts) on the same
    cache and images per step as the decoder-only host provider, and its step time against that one's (the
    issue asks an AIS step to cost at most 2x a decoder-only step)."""
    import dataclasses

    base = bench_config(size, "host")
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, task="ais"))
    out = ctx.work / "train_runs" / "trainer_host_ais"
    shutil.rmtree(out, ignore_errors=True)
    st = time_trainer(ctx, cache_path, cfg, warmup=size.warmup_steps, steps=size.steps, out=out)
    step = Stat.of(st.step_s, "s")
    sec.rows.append(
        Row(
            case="train step, AIS head",
            provider="trainer host, model.task=ais",
            config={"residency": "host", "B": size.images_per_batch},
            metrics={
                "step": step.map(lambda s: s * 1e3, "ms"),
                "prompts per step": Stat.of(st.prompts, "prompts"),
                "peak memory": st.peak,
            },
        )
    )
    decoder = results.get("trainer host")
    if decoder is not None:
        sec.ratios.append(
            Ratio(
                name="AIS step / decoder-only step (step time, trainer host)",
                value=step.median / Stat.of(decoder.step_s, "s").median,
                config={"B": size.images_per_batch, "K": size.max_objects},
                goal=2.0,
            )
        )


def _naive(ctx: Context, size: TrainSize, cache_path, data, sec: Section) -> Stat | None:
    from bench.naive import NaiveLoop
    from embedcache import open_cache
    from embedcache.models import build_sam

    cache = open_cache(cache_path)
    images = cache.images_with_objects("train").tolist()
    sam = build_sam(size.naive_model)
    loop = NaiveLoop(sam, cache, images[: size.naive_images], ctx.device, data=data)
    t = Stat.of(
        time_call(loop.epoch, device=ctx.device, warmup=size.naive_warmup, repeats=size.naive_repeats), "s"
    )
    rate = t.map(lambda s: loop.prompts / s, "prompts/s")
    sec.rows.append(
        Row(
            case="train step",
            provider="naive loop",
            config={
                "encoder": size.naive_model,
                "dtype": "fp32",
                "images": len(loop.items),
                "objects": loop.prompts,
            },
            metrics={"throughput": rate, "pass": t},
        )
    )
    return rate


def _ratios(ctx: Context, sec: Section, rates: dict[str, Stat]) -> None:
    best = "trainer device" if "trainer device" in rates else "trainer host"
    if best not in rates:
        return
    top = rates[best].median
    if "naive loop" in rates:
        sec.ratios.append(
            Ratio(
                name=f"{best} / naive loop (prompts/s)",
                value=top / rates["naive loop"].median,
                config={"residency": best.split()[-1]},
                goal=100.0,
            )
        )
    if "trainer device, reference loss" in rates:
        sec.ratios.append(
            Ratio(
                name="trainer device / same trainer on the reference loss",
                value=top / rates["trainer device, reference loss"].median,
                config={"residency": "device"},
                goal=3.0,
            )
        )
    sec.ratios.append(
        Ratio(
            name=f"{best} prompts/s / 20,000 (the goal's absolute rate)",
            value=top / 20000.0,
            config={"residency": best.split()[-1]},
            goal=1.0 if ctx.cuda else None,
        )
    )
    for mode in ("stream", "host"):
        name = f"trainer {mode}"
        if name in rates and name != best:
            sec.ratios.append(
                Ratio(
                    name=f"{name} / {best} (prompts/s)",
                    value=rates[name].median / top,
                    config={"residency": mode},
                )
            )


def _notes(
    ctx: Context, size: TrainSize, results: dict[str, StepTimes], matmul: Stat, latency: Stat
) -> list[str]:
    notes = [
        f"{size.warmup_steps} warm-up steps, then {size.steps} timed steps per provider, then one step "
        "under op/FLOP/memory counters; "
        "wall clock per step, ending on the trainer's host read of the loss"
        + (" (which waits for the GPU)." if ctx.cuda else "."),
        "Cache: vit_tiny embeddings of synthetic images (the decoder and its step do not depend on the "
        f"encoder preset). The naive loop re-encodes with {size.naive_model}, as the tutorial does.",
        "Peak memory: most bytes allocated during one step above those allocated before it"
        + (" (CUDA allocator)." if ctx.cuda else " (live tensor storage of op outputs, CPU)."),
    ]
    for name, st in results.items():
        step = float(np.median(st.step_s))
        wait = float(np.median(st.wait_s))
        t_flops = st.flops / (matmul.median * 1e12)
        t_ops = st.ops * latency.median * 1e-6
        notes.append(
            f"{name} (residency resolved to {st.residency}): median step {step * 1e3:.3g} ms for "
            f"{np.median(st.prompts):.0f} prompts. Floors: FLOPs {st.flops / 1e9:.3g} GFLOP -> "
            f"{t_flops * 1e3:.3g} ms at the matmul rate; launches {st.ops} aten ops x {latency.median:.3g} "
            f"us -> {t_ops * 1e3:.3g} ms; "
            f"data wait {wait * 1e3:.3g} ms. The step is {step / max(t_flops, t_ops, 1e-9):.3g}x its larger "
            f"compute floor ({'launches' if t_ops > t_flops else 'FLOPs'})."
        )
    return notes
