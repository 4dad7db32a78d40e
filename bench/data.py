"""The synthetic datasets and caches the benches run on, built once per scratch folder and reused.

A cache is built by ``embedcache.build.build_cache`` (the product path) from ``embedcache.synthetic`` images
with the random-init ``vit_tiny`` encoder: the io and train benches time what happens after the encoder, which
does not depend on the encoder's size or weights. ``build_cache`` confirms an existing complete cache without
re-encoding, so several benches (and several ``bench`` runs given the same ``--work``) share one.
"""

from __future__ import annotations

from pathlib import Path

from bench.context import Context

CACHES = {"tiny": (4, 4), "small": (32, 8), "full": (512, 16)}
"""Per size: (images, most objects per image) of the cache that the io and train benches share."""


def synthetic_cache(ctx: Context) -> tuple[Path, Path]:
    """``(cache, data folder)``: a complete ``vit_tiny`` cache of synthetic images in ``ctx.work``.

    Images are 160-320 px a side; their masks are expanded to the 1024 input frame either way, so the size of
    the source images changes nothing downstream of the cache.
    """
    from embedcache import open_cache
    from embedcache.build import BuildConfig, build_cache
    from embedcache.synthetic import make_dataset

    n_images, max_objects = CACHES[ctx.size]
    name = f"synth_n{n_images}_o{max_objects}"
    data = ctx.work / name
    out = ctx.work / f"{name}.zarr"
    if not (data / "images").is_dir():
        make_dataset(data, n_images=n_images, seed=2, min_side=160, max_side=320, max_objects=max_objects)

    def build(overwrite: bool) -> None:
        build_cache(
            BuildConfig(
                data=data,
                out=out,
                model_type="vit_tiny",
                device=str(ctx.device),
                batch_size=8,
                val_fraction=0.0,
                progress=False,
                overwrite=overwrite,
            )
        )

    try:
        build(overwrite=False)  # reuses a complete cache left in --work by an earlier run
        open_cache(out)
    except Exception:  # a cache of an older format or a broken one: this is scratch, so rebuild it
        build(overwrite=True)
    return out, data
