"""The synthetic datasets and caches the benches run on, built once per scratch folder and reused.

A cache is built by ``embedcache.build.build_cache`` (the product path) from ``embedcache.synthetic`` images
with the random-init ``vit_tiny`` encoder: the io and train benches time what happens after the encoder, which
does not depend on the encoder's size or weights. ``build_cache`` confirms an existing complete cache without
re-encoding, so several benches (and several ``bench`` runs given the same ``--work``) share one.
"""

from __future__ import annotations

from pathlib import Path

from bench.context import Context


def synthetic_cache(
    ctx: Context, *, n_images: int, max_objects: int = 6, side: tuple[int, int] = (160, 320)
) -> Path:
    """A complete ``vit_tiny`` cache of ``n_images`` synthetic images in ``ctx.work``, built if absent."""
    from embedcache.build import BuildConfig, build_cache
    from embedcache.synthetic import make_dataset

    name = f"synth_n{n_images}_o{max_objects}_s{side[0]}-{side[1]}"
    data = ctx.work / name
    out = ctx.work / f"{name}.zarr"
    if not (data / "images").is_dir():
        make_dataset(
            data, n_images=n_images, seed=2, min_side=side[0], max_side=side[1], max_objects=max_objects
        )
    build_cache(
        BuildConfig(
            data=data,
            out=out,
            model_type="vit_tiny",
            device=str(ctx.device),
            batch_size=8,
            val_fraction=0.0,
            progress=False,
        )
    )
    return out
