"""The ``trainer`` command: ``run``, ``sweep``, ``eval``, ``export``, ``demo``.

::

    trainer run --cache train.zarr [--config configs/default.yaml] --out runs/NAME [--resume] [optim.lr=3e-4]
    trainer sweep --cache train.zarr [--config A.yaml ...] --out sweeps/NAME [--lr 1e-4,3e-4,1e-3] [overrides]
    accelerate launch -m trainer run ...     (the same command, many processes/GPUs)
    trainer eval --cache train.zarr --run runs/NAME [--which best] [--out runs/NAME/eval]
    trainer eval --cache test.zarr --checkpoint lite_medsam --checkpoint tuned.pth [--split all] --out DIR
    trainer eval ... --clicks 5 [--no-mask-prompt]     (multi-click evaluation: mIoU per click, NoC85/90)
    trainer eval ... --auto amg|ais [--amg-sweep]      (prompt-free instances: mSA, SA50, SA75)
    trainer export runs/NAME --out sam_tuned.pth [--which best] [--format sam|hf|onnx]
    trainer demo --out demo
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import sys
from pathlib import Path

OVERRIDE = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*=.*", re.S)  # section.field=value
DESCRIPTION = "Fine-tune SAM's prompt encoder and mask decoder on cached image embeddings."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train on a cache")
    r.add_argument("--cache", required=True, help="the embedcache .zarr to train on")
    r.add_argument(
        "--config", default=None, help="YAML config (configs/*.yaml); configs/default.yaml when omitted"
    )
    r.add_argument("--out", required=True, help="run folder: checkpoints, metrics, figures, logs")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    r.add_argument("overrides", nargs="*", help="section.field=value, e.g. optim.lr=3e-4 run.steps=500")

    w = sub.add_parser("sweep", help="learning-rate (and recipe) search by successive halving (Optuna)")
    w.add_argument("--cache", required=True, help="the embedcache .zarr; trials train on its train split")
    w.add_argument(
        "--config",
        action="append",
        default=[],
        help="a recipe to try, repeatable (default: configs/default.yaml)",
    )
    w.add_argument("--out", required=True, help="sweep folder: trials/, table.md, sweep.json, best.yaml")
    w.add_argument(
        "--lr",
        type=_lrs,
        default=[1e-4, 3e-4, 1e-3],
        help="learning rates to try, comma-separated (1e-4,3e-4,1e-3)",
    )
    w.add_argument(
        "--holdout", type=float, default=0.25, help="share of the train images scored, not trained on"
    )
    w.add_argument(
        "--metric",
        default=None,
        choices=("mean", "box", "point"),
        help="box, point or mean mIoU (default mean); semantic and AIS trials are scored by their own number",
    )
    w.add_argument("--min-steps", type=int, default=25, help="the first rung, in optimiser steps")
    w.add_argument("--reduction", type=int, default=3, help="keep the best 1/reduction at each rung")
    w.add_argument("overrides", nargs="*", help="section.field=value for every trial, e.g. run.steps=100")

    e = sub.add_parser("eval", help="score a run's start and tuned models and/or any checkpoints on a cache")
    e.add_argument("--cache", required=True)
    e.add_argument("--run", default=None, help="a trainer run folder: its starting model and its tuned model")
    e.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="another model, repeatable: an official name (lite_medsam, vit_b, ...), a SAM state dict "
        "such as `trainer export` writes, or a run folder",
    )
    e.add_argument("--split", default="val", choices=("val", "train", "all"), help="cache images to score")
    e.add_argument(
        "--which", default="best", help="best (default), last, a step number or a checkpoint folder"
    )
    e.add_argument("--out", default=None, help="for metrics.json, table.md and figures (default RUN/eval)")
    e.add_argument("--overlays", type=int, default=None, help="overlay figures to draw (default: the run's)")
    e.add_argument(
        "--clicks",
        type=_clicks,
        default=0,
        help="also N corrective clicks from each box and point start: mIoU per click, NoC85/90, clicks.png",
    )
    e.add_argument(
        "--no-mask-prompt",
        dest="mask_prompt",
        action="store_false",
        help="corrective rounds without the previous logits as the mask prompt",
    )
    e.add_argument(
        "--auto",
        choices=("amg", "ais"),
        default=None,
        help="also segment every image without prompts (amg: SAM's automatic mask generator on the cached "
        "embedding; ais: a model.task=ais run's head and a seeded watershed) and score the instances: mSA, "
        "SA50, SA75",
    )
    e.add_argument(
        "--amg-sweep", action="store_true", help="with --auto amg, also re-score a grid of AMG thresholds"
    )
    e.add_argument(
        "--amg-points-per-side", type=int, default=32, help="AMG's point grid (default 32: 1024 points)"
    )

    x = sub.add_parser("export", help="write the tuned model: a SAM state dict, an HF folder, or ONNX")
    x.add_argument("run", help="a trainer run folder")
    x.add_argument("--out", required=True, help="the .pth (sam), new folder (hf) or .onnx (onnx) to write")
    x.add_argument(
        "--which", default="best", help="best (default), last, a step number or a checkpoint folder"
    )
    x.add_argument(
        "--format",
        default="sam",
        choices=("sam", "hf", "onnx"),
        help="sam: segment_anything state dict (+ sidecars); hf: transformers SamModel folder; onnx: the "
        "prompt encoder and mask decoder as SAM's ONNX model",
    )

    d = sub.add_parser("demo", help="LiteMedSAM tuned on synthetic cells on CPU, packaged vs tuned")
    d.add_argument("--out", default="demo", help="folder for everything the demo writes")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow the options: `--out runs/a optim.lr=3e-4`
    if args.command in ("run", "sweep"):
        args.overrides += [x for x in extra if OVERRIDE.fullmatch(x)]
        extra = [x for x in extra if not OVERRIDE.fullmatch(x)]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from embedcache.cache import CacheError
    from embedcache.signature import SignatureMismatch
    from trainer.checkpoint import CheckpointReadError, CheckpointWriteError
    from trainer.export import ExportError
    from trainer.session import NonFiniteLoss, RunLockedError

    try:
        if args.command == "run":
            from trainer.train import run_from_args

            summary = run_from_args(
                args.cache, args.config, args.overrides, args.out, args.resume, "trainer " + shlex.join(argv)
            )
            if "metrics" in summary:
                _print_metrics(summary["metrics"])
        elif args.command == "sweep":
            from trainer.sweep import sweep_from_args

            print(sweep_from_args(args, args.overrides, "trainer " + shlex.join(argv))["table"], end="")
        elif args.command == "eval":
            from trainer.amg import AmgConfig
            from trainer.eval_run import eval_run

            result = eval_run(
                args.cache,
                args.run,
                checkpoints=tuple(args.checkpoint),
                which=args.which,
                split=args.split,
                out=args.out,
                overlays=args.overlays,
                clicks=args.clicks,
                mask_prompt=args.mask_prompt,
                auto=args.auto,
                amg=AmgConfig(points_per_side=args.amg_points_per_side),
                amg_sweep=args.amg_sweep,
            )
            if result:
                print(result["table"], end="")
                print("\n".join(result["files"]))
        elif args.command == "export":
            if args.format == "hf":
                from trainer.export_hf import export_hf as export
            elif args.format == "onnx":
                from trainer.export_onnx import export_onnx as export
            else:
                from trainer.export import export

            for path in export(args.run, args.out, which=args.which):
                print(path)
        elif args.command == "demo":
            from trainer.demo import demo

            demo(args.out, steps=args.steps)
    except (
        SignatureMismatch,
        CacheError,
        NonFiniteLoss,
        CheckpointWriteError,
        CheckpointReadError,
        ExportError,
        RunLockedError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
    ) as e:
        print(f"trainer {args.command}: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, NonFiniteLoss) else 3
    except OSError as e:
        if e.errno not in WRITE_REFUSED:
            raise
        print(f"trainer {args.command}: error: {_refused(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trainer {args.command}: interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130
    return 0


WRITE_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
"""errno of an OS refusal to write: permissions, a read-only file system."""


def _refused(e: OSError) -> str:
    """One line for an ``OSError`` in ``WRITE_REFUSED``: the folder that refused the write and the fix."""
    path = Path(e.filename or ".")
    folder = path.parent
    if os.access(folder, os.W_OK):  # not a refused write: the file itself (e.g. a cache file) is unreadable
        return f"{path}: {e.strerror}"
    return (
        f"{folder} is not writable ({e.strerror} writing {path.name}); pick an --out in a writable folder, "
        "or make it writable"
    )


def _after_interrupt(args: argparse.Namespace) -> str:
    """What Ctrl-C left safe, and how to go on."""
    if args.command == "run":
        from trainer.checkpoint import latest_checkpoint

        last = latest_checkpoint(Path(args.out))
        return (
            f"complete checkpoints are safe (last: {last or 'none yet'}); continue with the same command "
            "plus --resume"
        )
    if args.command == "sweep":
        return (
            "each trial's complete checkpoints and scored rungs are safe; rerun the same command to continue"
        )
    return "rerun the same command to start it again"


def _lrs(text: str) -> list[float]:
    """``--lr``: comma-separated learning rates."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr takes comma-separated numbers, got {text!r}") from None


def _clicks(text: str) -> int:
    """``--clicks``: a count of corrective clicks, 0 or more."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"--clicks must be >= 0, got {n}")
    return n


def _print_metrics(metrics: dict) -> None:
    """A small table: prompt type x (starting, tuned) mIoU, and a warning naming the prompts whose mIoU
    tuning lowered."""
    start, tuned = metrics.get("start", {}), metrics.get("tuned", {})
    if not tuned:
        return
    print(
        f"{'prompt':<10}{'start mIoU':>12}{'tuned mIoU':>12}"
        f"{'start dice':>12}{'tuned dice':>12}{'objects':>9}"
    )
    for t, m in tuned.items():
        s = start.get(t, {})
        if "miou" not in m:  # automatic instance scores (model.task=ais): mSA, not mIoU
            print(
                f"{t:<10}mSA {s.get('msa', float('nan')):.4f} -> {m['msa']:.4f}, SA50 {m['sa50']:.4f}, "
                f"{m['n_pred']} predicted / {m['n_true']} true objects"
            )
            continue
        n = m.get("n_objects", m.get("n_images", ""))
        print(
            f"{t:<10}{s.get('miou', float('nan')):>12.4f}{m['miou']:>12.4f}"
            f"{s.get('dice', float('nan')):>12.4f}{m['dice']:>12.4f}{n:>9}"
        )
    worse = [t for t, m in tuned.items() if "miou" in m and m["miou"] < start.get(t, {}).get("miou", -1.0)]
    if worse:
        print(
            "warning: the tuned model is below the starting model on the validation images "
            f"({', '.join(worse)} mIoU); for those prompts the starting model is the better one to use "
            "(docs/training.md)"
        )
