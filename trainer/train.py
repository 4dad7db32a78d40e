"""``trainer run``: the training loop, flat, on HF accelerate.

``trainer.session`` builds the session and takes one optimiser step; this file is the loop around it and
what happens between steps: logging, validation with the best-checkpoint pick, checkpoints, and the
end-of-run files (metrics.json, the loss curve, overlays).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from trainer import checkpoint as ckpt
from trainer.config import DEFAULT_CONFIG, Config, load_config, model_from_cache, save_config, to_dict
from trainer.evaluate import Contender
from trainer.plots import loss_curve
from trainer.session import Session, StepStats, setup, train_step


def run(
    cache_path: str | Path,
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    command: str = "",
    progress: bool = True,
) -> dict:
    """Train on a cache into the run folder ``out``; returns a summary (final metrics and files written)."""
    s = setup(cache_path, cfg, out, resume=resume, command=command)
    with s.lock:  # the run folder's lock, released however the run ends
        return train(s, command=command, progress=progress)


def train(s: Session, *, command: str, progress: bool) -> dict:
    """``run``'s loop on a set-up session: steps, validation, checkpoints, then the end-of-run files."""
    cfg, state, accelerator = s.cfg, s.state, s.accelerator
    start_logs(s)
    if state.step == 0 and not state.start_metrics:
        state.start_metrics = validate(s)
        if s.main and state.start_metrics:
            print(f"starting model: {json.dumps(state.start_metrics)}", flush=True)
    stop = min(cfg.run.stop_at or cfg.run.steps, cfg.run.steps)
    # the bar closes however the loop ends, so that an error or Ctrl-C message starts on a line of its own
    with tqdm(
        total=stop, initial=state.step, disable=not (s.main and progress), unit="step", dynamic_ncols=True
    ) as bar:
        s.model.train()
        while True:
            # termination: run.steps done, or run.stop_at reached (a planned interruption; --resume continues)
            if state.step >= stop:
                break

            # learning rate; forward, backward and update: train_step sets lr = optim.lr * lr_factor(step)
            # (a pure function of the step: no scheduler state to resume), runs grad_accum micro-batches, one
            # update
            t0 = time.perf_counter()
            stats = train_step(s)

            # timing and logging: prompts/s of all processes, losses.jsonl each step, tensorboard every
            # log_every steps
            rate = stats.prompts * accelerator.num_processes / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", prompts_per_s=f"{rate:.1f}", epoch=state.epoch)
            log_step(s, stats, rate)

            # eval and checkpoint: validate every eval_every steps and at the last step, keeping the best;
            # save every save_every steps and where the run stops
            if (cfg.run.eval_every and state.step % cfg.run.eval_every == 0) or state.step == cfg.run.steps:
                metrics = validate_and_keep_best(s)
                if metrics and s.main and progress:
                    bar.write(f"step {state.step}: val {json.dumps(metrics)}")
            if (cfg.run.save_every and state.step % cfg.run.save_every == 0) or state.step == stop:
                save(s, command)
    s.loader.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary = {"out": str(s.out), "step": state.step, "finished": state.step == cfg.run.steps}
    if s.main:
        summary.update(finish(s))
    return summary


def start_logs(s: Session) -> None:
    """Trackers (tensorboard, with the flattened config) and ``losses.jsonl`` cut back to the resumed step."""
    flat = {
        f"{sec}.{k}": (v if isinstance(v, int | float | str | bool) else str(v))
        for sec, d in to_dict(s.cfg).items()
        for k, v in d.items()
    }
    s.accelerator.init_trackers("trainer", config=flat if s.main else None)
    path = s.out / "losses.jsonl"
    if s.main:
        kept = []
        if path.exists():  # drop steps after the checkpoint we resume from
            lines = path.read_text().splitlines()
            if lines and not lines[-1].endswith("}"):  # a kill mid-append leaves a cut last line
                lines.pop()
            kept = [ln for ln in lines if json.loads(ln)["step"] <= s.state.step]
        path.write_text("".join(ln + "\n" for ln in kept))


def log_step(s: Session, stats: StepStats, rate: float) -> None:
    """One row of ``losses.jsonl`` (main process), and tensorboard scalars every ``run.log_every`` steps."""
    step = s.state.step
    if s.main:
        row = {"step": step, "loss": stats.loss, "lr": stats.lr, **stats.logged}
        with (s.out / "losses.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    if s.cfg.run.log_every and step % s.cfg.run.log_every == 0:
        scalars = {"loss": stats.loss, "lr": stats.lr, "prompts_per_s": rate, **stats.logged}
        s.accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=step)


def validate(s: Session) -> dict:
    """The task's validation metrics of the current model on the validation images ({} if there are none)."""
    if len(s.val_images) == 0:
        return {}
    return s.task.validate(s.accelerator.unwrap_model(s.model), s.store, s.val_images, s.accelerator)


def validate_and_keep_best(s: Session) -> dict:
    """Validate, record the metrics in the state, and write ``best/`` when the task's score improves."""
    state = s.state
    metrics = validate(s)
    if metrics:
        state.evals[str(state.step)] = metrics
        # mIoU of the prompted and semantic tasks, mSA of the automatic ones (model.task=ais)
        logged = {f"val/{t}_{k}": v[k] for t, v in metrics.items() for k in ("miou", "msa") if k in v}
        s.accelerator.log(logged, step=state.step)
        score = s.task.score(metrics)
        if score > state.best_score:
            state.best_score, state.best_step = score, state.step
            if s.main:
                save_best(s, metrics)
    return metrics


def save(s: Session, command: str) -> None:
    """A step checkpoint (weights, optimiser, every rank's RNG state, trainer state), written atomically."""
    final = ckpt.step_dir(s.out, s.state.step)
    tmp = ckpt.temp_dir_for(final) if s.main else final.with_name(f".tmp-{final.name}")
    s.accelerator.wait_for_everyone()
    try:
        # save_state: weights, optimiser and every rank's RNG state, into a temp folder first
        s.accelerator.save_state(str(tmp))
        s.accelerator.wait_for_everyone()
        if s.main:
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(s.state), indent=2))
            (tmp / "config.json").write_text(json.dumps(to_dict(s.cfg)))
            save_config(s.cfg, tmp / "config.yaml", header=command or "resolved config")
    except Exception as e:  # a full disk surfaces as OSError, torch RuntimeError or SafetensorError
        raise ckpt.write_failed(tmp, s.out, e) from e
    if s.main:
        ckpt.commit(tmp, final)  # atomic: the step folder appears complete or not at all
        ckpt.prune(s.out, s.cfg.run.keep_checkpoints)
    s.accelerator.wait_for_everyone()


def save_best(s: Session, metrics: dict) -> None:
    """``best/``: the weights (safetensors), the config and the metrics of the best validation so far."""
    from safetensors.torch import save_file

    final = s.out / "best"
    tmp = ckpt.temp_dir_for(final)
    state_dict = s.accelerator.unwrap_model(s.model).state_dict()
    try:
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors")
        )
        save_config(s.cfg, tmp / "config.yaml", header=f"best at step {s.state.step}")
        (tmp / "metrics.json").write_text(json.dumps({"step": s.state.step, **metrics}, indent=2))
    except Exception as e:  # a full disk surfaces as OSError, torch RuntimeError or SafetensorError
        raise ckpt.write_failed(tmp, s.out, e) from e
    ckpt.commit(tmp, final)


def finish(s: Session) -> dict:
    """Main process, end of run: metrics.json, the loss curve and (when the run finished) overlays."""
    state, out = s.state, s.out
    metrics = {
        "step": state.step,
        "tuned": state.evals.get(str(state.step), {}),
        "start": state.start_metrics,
        "best": {"step": state.best_step, "score": state.best_score},
        "history": state.evals,
    }
    ckpt.write_json(out / "metrics.json", metrics)
    files = [out / "metrics.json"]
    rows = [json.loads(ln) for ln in (out / "losses.jsonl").read_text().splitlines()]
    if rows:
        evals = {int(step): s.task.score(m) for step, m in state.evals.items()}
        if state.start_metrics:
            evals[0] = s.task.score(state.start_metrics)
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        files.append(loss_curve(steps, losses, out / "loss_curve.png", evals=evals))
    if s.cfg.run.overlays and state.step == s.cfg.run.steps:
        tuned = s.accelerator.unwrap_model(s.model)
        val = s.cache.image_indices("val")
        files += s.task.overlays(
            out / "overlays",
            val,
            Contender("starting model", s.start_model, s.store),
            Contender("tuned", tuned, s.store),
            s.cfg.run.overlays,
        )
    return {"metrics": metrics, "files": [str(f) for f in files]}


def run_from_args(
    cache: str, config: str | None, overrides: list[str], out: str, resume: bool, command: str
) -> dict:
    """The CLI's ``run``: load the config (the default recipe without one) with overrides and train. Model
    fields the config leaves out are the cache's (``model_from_cache``)."""
    from embedcache import open_cache

    under = model_from_cache(open_cache(cache))
    cfg = load_config(config or DEFAULT_CONFIG, overrides, under=under)
    return run(cache, cfg, out, resume=resume, command=command)
