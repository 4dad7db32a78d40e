"""``bench train``'s encoder-adaptation rows: the trainer's step on partial caches next to its baselines.

Providers, all ``trainer.session.train_step`` on one encoder preset (``vit_b`` at small and full size,
``vit_tiny`` at tiny), box prompts, the same images and objects per step:

- ``trainer decoder-only``: the decoder step on the cached embeddings (the encoder frozen);
- ``trainer tail k=K lora`` (and ``conv_lora`` at the smallest k): a partial cache built with
  ``--tail-blocks K``; each step runs the encoder's last K blocks with LoRA on ``qkv`` and the neck on the
  cached tap tokens, then the decoder, with gradients through all of it;
- ``trainer full-encoder lora``: the same step with every encoder block as the tail (a cache built with
  ``--tail-blocks depth``, whose tap is the patch embedding): the whole encoder with LoRA runs forward and
  backward every step, which is what re-encoding every step costs, less the patch embedding and the image
  decode and resize. The baseline is therefore a little faster than a real re-encoding loop, so the ratios
  against it understate the gain.

Every tail checkpoints its blocks (``model.encoder_checkpoint``), the baseline included.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.context import Context
from bench.report import Ratio, Row, Section
from bench.timing import Stat


@dataclass(frozen=True, kw_only=True)
class AdaptSize:
    model: str
    """Encoder preset of the caches and the model."""
    images: int
    """Images in the synthetic dataset (all of them train)."""
    images_per_batch: int
    """B: images per step, equal for every provider."""
    max_objects: int
    """K objects per image per step (at most)."""
    ks: tuple[int, ...]
    """Tail lengths timed with LoRA."""
    warmup_steps: int
    steps: int


SIZES = {
    # tiny: a smoke run (vit_tiny has 2 blocks, so k=1 and the full encoder); its step counts match
    # bench.train's tiny size, whose test counts every train_step call of the section
    "tiny": AdaptSize(model="vit_tiny", images=2, images_per_batch=1, max_objects=1, ks=(1,), warmup_steps=1,
                      steps=1),
    # small: vit_b on 2 CPU cores, one image per step (a vit_b block fwd+bwd is seconds per image there)
    "small": AdaptSize(model="vit_b", images=2, images_per_batch=1, max_objects=4, ks=(1, 2, 4),
                       warmup_steps=1, steps=2),
    "full": AdaptSize(model="vit_b", images=32, images_per_batch=4, max_objects=16, ks=(1, 2, 4),
                      warmup_steps=3, steps=10),
}  # fmt: skip


def _caches(ctx: Context, size: AdaptSize, ks: list[int]) -> dict[int, Path]:
    """A synthetic dataset and its ``size.model`` cache per tail length (``embedcache build`` each)."""
    from embedcache import open_cache
    from embedcache.build import BuildConfig, build_cache
    from embedcache.synthetic import make_dataset

    data = ctx.work / f"adapt_n{size.images}"
    if not (data / "images").is_dir():
        make_dataset(data, n_images=size.images, seed=3, min_side=160, max_side=320, max_objects=4)
    out = {}
    for k in ks:
        path = ctx.work / f"adapt_{size.model}_n{size.images}_k{k}.zarr"
        cfg = dict(data=data, out=path, model_type=size.model, device=str(ctx.device), batch_size=2)
        cfg.update(val_fraction=0.0, progress=False, tail_blocks=k, images_per_shard=2)
        try:
            build_cache(BuildConfig(**cfg))  # confirms a complete cache from an earlier run in --work
            open_cache(path)
        except Exception:  # an older format or a broken one: scratch, so rebuild it
            build_cache(BuildConfig(**cfg, overwrite=True))
        out[k] = path
    return out


def _config(size: AdaptSize, k: int, adapter: str):
    from trainer.config import Config, DataConfig, ModelConfig, PromptConfig

    return Config(
        model=ModelConfig(model_type=size.model, encoder_tail_blocks=k, encoder_adapter=adapter),
        data=DataConfig(
            images_per_batch=size.images_per_batch, max_objects=size.max_objects, residency="host"
        ),
        prompts=PromptConfig(box_fraction=1.0, corrective_rounds=0, multimask=False),
    )


def _bytes_per_image(path: Path, arrays: tuple[str, ...]) -> float:
    """Bytes on disk per image of some per-image arrays of the cache at ``path``."""
    from embedcache import open_cache
    from embedcache.info import disk_bytes

    return sum(disk_bytes(path, a) for a in arrays) / open_cache(path).num_images


def add_rows(ctx: Context, sec: Section) -> None:
    """Time the providers (module docstring) and append their rows, ratios and notes to ``sec``."""
    from bench.train import time_trainer
    from embedcache.models import build_sam
    from embedcache.tap import tail_candidates

    size = SIZES[ctx.size]
    depth = len(tail_candidates(build_sam(size.model).image_encoder))
    ks = [k for k in size.ks if k < depth]
    caches = _caches(ctx, size, sorted({*ks, depth}))
    plan = [("trainer decoder-only", ks[0], 0, "none")]
    plan += [(f"trainer tail k={k} lora", k, k, "lora") for k in ks]
    plan += [(f"trainer tail k={ks[0]} conv_lora", ks[0], ks[0], "conv_lora")]
    plan += [(f"trainer full-encoder lora (k={depth})", depth, depth, "lora")]
    images_per_s: dict[str, Stat] = {}
    for name, cache_k, k, adapter in plan:
        out = ctx.work / "train_runs" / "".join(c if c.isalnum() else "_" for c in name)
        shutil.rmtree(out, ignore_errors=True)
        st = time_trainer(
            ctx,
            caches[cache_k],
            _config(size, k, adapter),
            warmup=size.warmup_steps,
            steps=size.steps,
            out=out,
        )
        step = Stat.of(st.step_s, "s")
        images_per_s[name] = step.map(lambda s: size.images_per_batch / s, "images/s")
        # a tail reads the tap tokens; its cache also keeps the embeddings (decoder-only needs only those)
        read = ("tap_tokens",) if k else ("embeddings",)
        kept = ("embeddings", "tap_tokens") if k else ("embeddings",)
        sec.rows.append(
            Row(
                case="train step, encoder adaptation",
                provider=name,
                config={"encoder": size.model, "tail_blocks": k, "adapter": adapter,
                        "B": size.images_per_batch, "K": size.max_objects},
                metrics={
                    "throughput": Stat.of([p / s for p, s in zip(st.prompts, st.step_s)], "prompts/s"),
                    "images": images_per_s[name],
                    "step": step.map(lambda s: s * 1e3, "ms"),
                    "prompts per step": Stat.of(st.prompts, "prompts"),
                    "peak memory": st.peak,
                    "read per image": Stat.single(_bytes_per_image(caches[cache_k], read) / 2**20, "MiB"),
                    "cache per image": Stat.single(_bytes_per_image(caches[cache_k], kept) / 2**20, "MiB"),
                },
            )
        )  # fmt: skip
    full = images_per_s[f"trainer full-encoder lora (k={depth})"].median
    for name, rate in images_per_s.items():
        if "full-encoder" in name:
            continue
        sec.ratios.append(
            Ratio(
                name=f"{name} / full-encoder lora (images/s, same images per step)",
                value=rate.median / full,
                config={"encoder": size.model},
                goal=10.0 if name == f"trainer tail k={ks[0]} lora" and size.model == "vit_b" else None,
            )
        )
    sec.notes.append(
        f"Encoder adaptation ({size.model}, {depth} blocks): {size.warmup_steps} warm-up + {size.steps} "
        f"timed steps per provider, B={size.images_per_batch} images, K={size.max_objects} objects per "
        "image. "
        "'read per image': the array the step reads (embeddings, or tap tokens for a tail); 'cache per "
        "image': what the cache keeps on disk (a partial cache keeps the embeddings too, so decoder-only "
        "runs on the same cache). The "
        "full-encoder baseline runs every block with LoRA on a cache of the patch embedding: re-encoding "
        "minus the patch embedding and image decode, so it is slightly faster than a re-encoding loop."
    )
