"""The ``embedcache`` command: ``build``, ``info`` and ``verify``.

Run ``embedcache build --data DIR --model vit_b --out X.zarr`` (or ``python -m embedcache ...``, or
``accelerate launch -m embedcache build ...`` for several processes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from embedcache.build import (
    BadDataError,
    BuildConfig,
    CacheExistsError,
    build_cache,
    default_workers,
    report_warnings,
)
from embedcache.cache import CacheError
from embedcache.images import DEFAULT_MAX_PIXELS, BadInput
from embedcache.models import MODEL_TYPES
from embedcache.prepare import DEFAULT_MIN_OBJECT_AREA
from embedcache.readers import MASK_KINDS


def _channels(text: str) -> tuple[int, int, int]:
    """``--channels 0,1,1`` -> ``(0, 1, 1)``."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected three channel numbers R,G,B such as 0,1,1, got {text!r}")
    return tuple(int(p) for p in parts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedcache", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="encode a dataset into a cache (resumes an unfinished one)")
    b.add_argument("--data", type=Path, required=True, help="dataset folder (images/ + masks/, or COCO root)")
    b.add_argument("--out", type=Path, required=True, help="cache to write, e.g. X.zarr")
    b.add_argument("--model", choices=MODEL_TYPES, required=True, help="SAM preset")
    b.add_argument("--checkpoint", help="state dict path or official name (vit_b, sam_vit_b_01ec64, ...)")
    b.add_argument("--init-seed", type=int, default=0, help="seed of the random init without --checkpoint")
    b.add_argument("--coco", type=Path, help="COCO JSON (polygons/RLE); file names relative to --data")
    b.add_argument("--mask-kind", choices=MASK_KINDS, default="instance", help="folder layout mask kind")
    b.add_argument("--ignore-index", type=int, help="semantic masks: label that belongs to no object")
    b.add_argument(
        "--allow-outside-symlinks",
        action="store_true",
        help="follow symlinks in --data that lead outside it (default: such files are bad items)",
    )
    b.add_argument("--val-fraction", type=float, default=0.2)
    b.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16")
    b.add_argument("--images-per-shard", type=int, default=8)
    b.add_argument("--workers", type=int, default=default_workers(), help="image decode threads")
    b.add_argument("--skip-bad", action="store_true", help="leave bad items out, listed in the build report")
    b.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="largest H*W of an image or mask; bigger ones are bad items (default %(default)s)",
    )
    b.add_argument(
        "--channels",
        type=_channels,
        help="R,G,B source channels for images that are neither grey, RGB nor RGB with a declared alpha "
        "(2-channel frames, page stacks), e.g. 0,1,1; without it such images are bad items",
    )
    b.add_argument(
        "--min-object-area",
        type=int,
        default=DEFAULT_MIN_OBJECT_AREA,
        help="smallest object kept, in original pixels; smaller ones are left out and counted in the build "
        "report (default %(default)s: drops JPEG specks, keeps a 20-pixel cell)",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--tail-blocks",
        type=int,
        default=0,
        help="partial cache: also store the tokens entering the encoder's last K blocks (encoder adapters)",
    )
    b.add_argument(
        "--views",
        default="none",
        help="augmentation views encoded per image: none, flips (identity, hflip, vflip), d4 (all 8 flips "
        "and 90-degree turns) or a comma list (hflip,vflip,rot90,rot180,rot270,transpose,antitranspose)",
    )
    i = sub.add_parser("info", help="print a cache's signature, counts and size")
    i.add_argument("cache", type=Path)
    i.add_argument("--json", action="store_true", help="print the signature and build report as JSON")
    v = sub.add_parser("verify", help="check a cache; exit status 1 on any problem")
    v.add_argument("cache", type=Path)
    v.add_argument("--no-embeddings", action="store_true", help="skip reading every embedding shard")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            report = build_cache(
                BuildConfig(
                    data=args.data,
                    out=args.out,
                    model_type=args.model,
                    checkpoint=args.checkpoint,
                    init_seed=args.init_seed,
                    coco=args.coco,
                    mask_kind=args.mask_kind,
                    ignore_index=args.ignore_index,
                    allow_outside_symlinks=args.allow_outside_symlinks,
                    val_fraction=args.val_fraction,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    device=args.device,
                    dtype=args.dtype,
                    images_per_shard=args.images_per_shard,
                    workers=args.workers,
                    skip_bad=args.skip_bad,
                    max_pixels=args.max_pixels,
                    min_object_area=args.min_object_area,
                    channels=args.channels,
                    overwrite=args.overwrite,
                    progress=not args.no_progress,
                    tail_blocks=args.tail_blocks,
                    views=args.views,
                )
            )
            if os.environ.get("RANK", "0") == "0":  # one summary per multi-process build, not one per rank
                for line in report_warnings(report):
                    print(f"embedcache build: warning: {line}", file=sys.stderr)
                print(
                    f"{args.out}: {report['num_images']} images, {report['num_objects']} objects, "
                    f"{report['num_skipped']} skipped; run {len(report['runs'])} encoded "
                    f"{report['runs'][-1].get('shards_encoded', 0)} shard(s)"
                )
        elif args.command == "info":
            if args.json:
                from embedcache.cache import open_cache

                c = open_cache(args.cache)
                print(json.dumps({"signature": c.signature, "build_report": c.build_report}, indent=2))
            else:
                from embedcache.info import info_text

                print(info_text(args.cache))
        else:
            from embedcache.verify import verify

            problems = verify(args.cache, embeddings=not args.no_embeddings)
            for line in problems:
                print(f"PROBLEM: {line}")
            if problems:
                print(f"{args.cache}: {len(problems)} problem(s)", file=sys.stderr)
                return 1
            print(f"{args.cache}: OK")
    except (
        BadDataError,
        BadInput,
        CacheExistsError,
        CacheError,
        FileNotFoundError,
        ValueError,
        RuntimeError,
    ) as e:
        print(f"embedcache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"embedcache {args.command}: interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130
    return 0


def _after_interrupt(args: argparse.Namespace) -> str:
    """What Ctrl-C left safe, and how to go on."""
    if args.command == "build":
        return (
            f"finished shards of {args.out} are kept (a shard is whole or absent); rerun the same command to "
            "resume"
        )
    return "it only reads; rerun the same command"
