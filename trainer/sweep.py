"""``trainer sweep``: a short learning-rate (and optionally recipe) search by successive halving.

A step on a cache is cheap, so a recipe's learning rate can be measured instead of guessed. Every trial is a
normal training run of the full ``run.steps`` (its schedule spans them), on the cache's training images less
a held-out share of them; at each rung (``min_steps``, ``min_steps * reduction``, ... and the last step) it is
scored on those held-out images, and Optuna's ``SuccessiveHalvingPruner`` stops the trials outside the best
``1 / reduction`` of those that reached the rung. Optuna runs it asynchronously, as it is meant to: trials run
one after another, the first is never stopped, and each later one continues past a rung only while it is
among the best there. The cache's own validation split is never read, so it can stay a test set.

Resuming is exact without any search state on disk: each trial's run folder holds its checkpoints and its
rung scores (``trainer_state.json``), and rerunning the same command replays the recorded scores into a
fresh study in the same order, which makes the same decisions, and trains only what is missing.

Outputs in ``OUT``: ``trials/<name>/`` (each a run folder), ``sweep.json``, ``table.md`` and ``best.yaml``,
the winning resolved config, ready for ``trainer run --config OUT/best.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embedcache import open_cache
from trainer import checkpoint as ckpt
from trainer.config import DEFAULT_CONFIG, Config, load_config, model_from_cache, save_config
from trainer.session import setup, train_step
from trainer.train import save, validate


def holdout_split(cache, train: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held out)`` cache indices: the ``fraction`` of ``train`` (at least one image) whose image ids
    rank first by sha256, a split that depends on the names alone, as ``embedcache build``'s does."""
    if not 0 < fraction < 1 or len(train) < 2:
        raise ValueError(f"--holdout must be in (0, 1) and leave images on both sides; got {fraction}")
    rank = sorted(train.tolist(), key=lambda i: hashlib.sha256(str(cache.image_id[i]).encode()).hexdigest())
    n = min(len(train) - 1, max(1, round(fraction * len(train))))
    held = np.array(sorted(rank[:n]), np.int64)
    return np.setdiff1d(train, held), held


def rungs(steps: int, min_steps: int, reduction: int) -> list[int]:
    """The steps a trial is scored at: ``min_steps * reduction ** k`` below ``steps``, then ``steps``."""
    if min_steps < 1 or reduction < 2:
        raise ValueError("--min-steps must be >= 1 and --reduction >= 2")
    out = []
    while min_steps * reduction ** len(out) < steps:
        out.append(min_steps * reduction ** len(out))
    return [*out, steps]


def score(metrics: dict, metric: str | None, task) -> float:
    """A trial's number from validation metrics: box or point mIoU or their mean (``metric``, one of the
    instance task's ``sweep_metrics``), or ``task``'s own score (``metric`` None: a task without them)."""
    if metric is None:
        return task.score(metrics)
    if metric == "mean":
        return (metrics["box"]["miou"] + metrics["point"]["miou"]) / 2
    return metrics[metric]["miou"]


def trial_name(config: Path, lr: float) -> str:
    """The run folder of a trial: ``<recipe>_lr<lr>``."""
    return f"{config.stem}_lr{lr:g}"


def sweep(
    cache_path: str | Path,
    configs: list[Path],
    overrides: list[str],
    out: str | Path,
    *,
    lrs: list[float],
    holdout: float = 0.25,
    metric: str | None = None,
    min_steps: int = 25,
    reduction: int = 3,
    command: str = "",
) -> dict:
    """Search ``configs`` x ``lrs`` (each with ``overrides``) on ``cache_path`` into ``out``; see the module
    docstring. ``metric``: one of the task's ``sweep_metrics`` (None: the first), or None for a task without
    them, which is scored by its own number. Returns ``{"trials", "best", "table"}``."""
    import optuna

    from trainer.task import TASKS, make_task

    if not lrs or min(lrs) <= 0 or not all(math.isfinite(v) for v in lrs):
        raise ValueError(f"--lr needs finite learning rates > 0, got {lrs}")
    out = Path(out)
    cache = open_cache(cache_path)
    bases = {trial_name(c, lr): (c, lr) for c in configs for lr in lrs}
    under = model_from_cache(cache)
    cfgs = {
        name: load_config(c, [*overrides, f"optim.lr={lr!r}"], under=under) for name, (c, lr) in bases.items()
    }
    tasks = {cfg.model.task for cfg in cfgs.values()}
    if len(tasks) != 1:
        raise ValueError(f"the recipes must share model.task to be compared; got {sorted(tasks)}")
    first = next(iter(cfgs.values()))
    task = make_task(TASKS[first.model.task].resolve(first, cache))  # every trial shares its training images
    metric, label = _metric(task, metric, first.model.task)
    steps = {cfg.run.steps for cfg in cfgs.values()}
    if len(steps) != 1:
        raise ValueError(f"the recipes must share run.steps to compete at equal steps; got {sorted(steps)}")
    at = rungs(steps.pop(), min_steps, reduction)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=min_steps, reduction_factor=reduction),
    )
    split = holdout_split(cache, task.train_images(cache), holdout)
    rows = []
    for name, cfg in cfgs.items():
        trial = study.ask()
        row = {"trial": name, "lr": cfg.optim.lr, "scores": {}, "state": "complete"}
        for step, metrics in _train_trial(cache, cfg, out / "trials" / name, at, split, command):
            row["scores"][str(step)] = value = score(metrics, metric, task)
            if metric is not None:  # the instance task: its box and point beside the mean they make
                row["box_point"] = [metrics["box"]["miou"], metrics["point"]["miou"]]
            trial.report(value, step)
            if step != at[-1] and trial.should_prune():
                row["state"] = f"stopped at {step}"
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, value)
        rows.append(row)
        print(f"trainer sweep: {name}: {row['state']}, scores {row['scores']}", flush=True)
    best = max((r for r in rows if r["state"] == "complete"), key=lambda r: r["scores"][str(at[-1])])
    winner = cfgs[best["trial"]]
    header = f"trainer sweep winner {best['trial']} ({label} {best['scores'][str(at[-1])]:.4f}); {command}"
    save_config(winner, out / "best.yaml", header=header)
    table = sweep_table(rows, at, label, holdout)
    (out / "table.md").write_text(table)
    summary = {"trials": rows, "best": best["trial"], "rungs": at, "metric": label, "holdout": holdout}
    summary["held_out_images"] = [str(cache.image_id[i]) for i in split[1]]
    ckpt.write_json(out / "sweep.json", summary)
    return {"trials": rows, "best": best["trial"], "table": table}


def _metric(task, metric: str | None, name: str) -> tuple[str | None, str]:
    """``(metric, its name in tables)`` of a sweep of ``task`` (``model.task`` ``name``) asked for ``metric``
    (None: the task's default)."""
    if task.sweep_metrics:
        metric = metric or task.sweep_metrics[0]
        if metric not in task.sweep_metrics:
            raise ValueError(f"--metric must be one of {'|'.join(task.sweep_metrics)}, got {metric!r}")
        return metric, f"{metric} mIoU"
    if metric is not None:
        raise ValueError(
            f"--metric picks among the instance task's scores; model.task={name} is scored by its "
            f"{task.score_name} and takes no --metric"
        )
    return None, task.score_name


def _train_trial(cache, cfg: Config, folder: Path, at: list[int], split, command: str):
    """Train one trial to each rung in turn, yielding ``(step, validation metrics)``; a rung already scored
    in ``folder`` (an earlier, interrupted sweep) is read back, not trained again."""
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, eval_every=0, overlays=0))
    resume = ckpt.latest_checkpoint(folder) is not None
    s = setup(cache, cfg, folder, resume=resume, command=command, split=split)
    bar = tqdm(total=at[-1], initial=s.state.step, desc=folder.name, unit="step", disable=not s.main)
    try:
        for step in at:
            if str(step) not in s.state.evals:
                s.model.train()
                while s.state.step < step:
                    stats = train_step(s)
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats.loss:.4f}")
                    if cfg.run.save_every and s.state.step % cfg.run.save_every == 0 and s.state.step < step:
                        save(s, command)  # a rung's own checkpoint is written once it is scored, below
                s.state.evals[str(step)] = validate(s)
                save(s, command)  # the rung's score is on disk with the weights it was measured on
            yield step, s.state.evals[str(step)]
    finally:
        bar.close()
        s.loader.close()
        s.lock.close()
        s.accelerator.free_memory()


def sweep_table(rows: list[dict], at: list[int], label: str, holdout: float) -> str:
    """Markdown: one row per trial with its score (``label``, e.g. ``box mIoU``) at every rung it reached, how
    it ended, and for the instance task its box and point mIoU at its last rung (``row["box_point"]``)."""
    parts = all("box_point" in r for r in rows)
    head = ["trial", "lr", *(f"step {s}" for s in at), "state", *(["box / point at its last rung"] * parts)]
    lines = [
        f"Validation {label} on {holdout:.0%} of the training images, held out of every trial:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        scores = [f"{r['scores'][str(s)]:.4f}" if str(s) in r["scores"] else "-" for s in at]
        cells = [r["trial"], f"{r['lr']:g}", *scores, r["state"]]
        if parts:
            cells.append("{:.4f} / {:.4f}".format(*r["box_point"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_from_args(args, overrides: list[str], command: str) -> dict:
    """The CLI's ``sweep`` (no ``--config``: the default recipe)."""
    configs = [Path(c) for c in args.config] or [DEFAULT_CONFIG]
    return sweep(
        args.cache,
        configs,
        overrides,
        args.out,
        lrs=args.lr,
        holdout=args.holdout,
        metric=args.metric,
        min_steps=args.min_steps,
        reduction=args.reduction,
        command=command,
    )
