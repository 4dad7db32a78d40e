"""``trainer run``: the training loop, one readable function on HF accelerate.

Every step reads B cached embeddings and up to K objects per image, draws fresh prompts, runs optional
corrective-click rounds without gradients, runs ONE prompt-encoder + mask-decoder call with gradients, and
updates the decoder. The image encoder never runs. The state needed to resume is a handful of integers
(``step``, ``epoch``, ``batch_in_epoch``) plus what ``accelerator.save_state`` writes (weights, optimiser).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from embedcache import open_cache
from embedcache.signature import check_compatible
from trainer import checkpoint as ckpt
from trainer.config import Config, OptimConfig, load_config, save_config, to_dict
from trainer.data import Batch, ImageStore, Prefetcher, image_file, pick_residency
from trainer.evaluate import evaluate, evaluate_semantic, predict_objects
from trainer.losses import instance_loss, semantic_loss
from trainer.model import build_start_sam, build_trainable, start_checkpoint, trainable_parameters
from trainer.order import batches
from trainer.plots import loss_curve, overlay
from trainer.prompts import corrective_click, initial_prompts, step_generator


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss: the run stops before the update, and the last checkpoint stays as it was."""


@dataclass(kw_only=True)
class TrainState:
    """What ``--resume`` restores besides accelerate's state: a handful of integers and the eval history."""

    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    """Epoch of the next micro-batch."""
    batch_in_epoch: int = 0
    """Index of the next micro-batch inside its epoch (on every rank)."""
    best_step: int = -1
    """Step of the best validation score so far (-1: none yet)."""
    best_score: float = -1.0
    """Best validation score (box mIoU; semantic mIoU in semantic mode)."""
    start_metrics: dict = field(default_factory=dict)
    """Validation metrics of the starting model (step 0)."""
    evals: dict = field(default_factory=dict)
    """Validation metrics per evaluated step, keyed by the step as a string."""


def lr_factor(step: int, cfg: OptimConfig, total: int) -> float:
    """Learning-rate multiplier of optimiser step ``step`` (0-based): linear warm-up, then cosine or constant.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_loss(model, batch: Batch, cfg: Config, g: torch.Generator, accelerator) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch, with fresh prompts; the only decoder call with gradients is the last one.

    Corrective rounds run the unwrapped model under ``no_grad`` (its prediction only chooses the next
    click and
    mask prompt), then the final prompts go through the (DDP-wrapped) model once, with gradients.
    """
    if cfg.model.task == "semantic":
        boxes = torch.cat([torch.zeros_like(batch.image_valid_hw), batch.image_valid_hw.flip(1)], 1).float()
        logits = model(batch.embeddings, semantic_boxes=boxes)
        return semantic_loss(logits, batch.labels, batch.image_valid_hw, cfg.loss)
    p = cfg.prompts
    prompts = initial_prompts(batch.masks, batch.boxes, batch.valid_hw, p, g)
    plain = accelerator.unwrap_model(model)
    for _ in range(p.corrective_rounds):
        with torch.no_grad():
            logits, iou = plain(batch.embeddings, batch.image_index, prompts)
        # the mask the user would see: SAM's single output, or the multimask output it rates best
        pick = iou[:, 1:].argmax(1) + 1 if p.multimask else torch.zeros_like(iou[:, 0], dtype=torch.long)
        last = logits[torch.arange(logits.shape[0], device=logits.device), pick]
        prompts = corrective_click(prompts, last, batch.masks, batch.valid_hw, g, mask_prompt=p.mask_prompt)
    logits, iou = model(batch.embeddings, batch.image_index, prompts)
    sel = slice(1, 4) if p.multimask else slice(0, 1)
    loss, logged, _ = instance_loss(logits[:, sel], iou[:, sel], batch.masks, batch.valid_hw, cfg.loss)
    return loss, logged


def _score(metrics: dict) -> float:
    return metrics["semantic"]["miou"] if "semantic" in metrics else metrics["box"]["miou"]


def _check_resume_config(saved: dict, now: dict, where: Path) -> None:
    diff = [
        f"{s}.{k}: {saved[s].get(k)!r} -> {v!r}"
        for s in now
        if s != "run"
        for k, v in now[s].items()
        if saved.get(s, {}).get(k) != v
    ]
    if diff:
        raise ValueError(
            f"--resume with a config that differs from {where} outside run.*: " + "; ".join(diff)
        )


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
    out = Path(out)
    cache = open_cache(cache_path)
    # refuse a cache made by another model before anything is built: its embeddings mean nothing here
    check_compatible(cache, cfg.model.model_type, start_checkpoint(cfg), init_seed=cfg.model.init_seed)
    if cfg.model.task == "semantic" and cfg.model.num_classes == 0:
        cfg.model.num_classes = int(cache.objects.class_id.max(initial=0)) + 1
    cuda = torch.cuda.is_available()
    precision = cfg.optim.mixed_precision
    accelerator = Accelerator(
        cpu=not cuda,
        # bf16 autocast on GPU (SAM's decoder is fine in bf16; the losses are computed in fp32 by kernels)
        mixed_precision=("bf16" if cuda else "no") if precision == "auto" else precision,
        # accumulate: gradients sync across processes only on the last micro-batch of an optimiser step
        gradient_accumulation_steps=cfg.optim.grad_accum,
        # corrective rounds and box-only steps leave some prompt-encoder weights unused in a step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    main = accelerator.is_main_process
    device = accelerator.device
    found = ckpt.latest_checkpoint(out)
    if found is not None and not resume:
        raise FileExistsError(
            f"{out} already holds checkpoints ({found.name}); pass --resume or pick a new --out"
        )
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml", header=command or "resolved config of this run")
    accelerator.wait_for_everyone()

    # the model: SAM's prompt encoder + mask decoder (+ LoRA, + semantic head); the image encoder never runs
    model = build_trainable(build_start_sam(cfg), cfg)
    start_model = copy.deepcopy(model).eval().requires_grad_(False).to(device)
    params = trainable_parameters(model)
    opt_cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    # prepare: move to the device, wrap in DDP when there are several processes, wrap the optimiser for
    # accumulation and mixed precision. The learning rate is set by hand from lr_factor(step) (see below).
    model, optimizer = accelerator.prepare(model, optimizer)

    # data: this rank's share of a pure, shard-aware order; embeddings resident per data.residency
    train_images = cache.image_indices("train")
    if cfg.model.task == "instance":
        counts = np.array([np.subtract(*cache.object_range(int(i))[::-1]) for i in train_images])
        train_images = train_images[counts > 0]
    val_images = cache.image_indices("val")
    if cfg.run.val_max_images:
        val_images = val_images[: cfg.run.val_max_images]
    residency = pick_residency(cache, train_images, cfg.data, device)
    store = ImageStore(cache, residency, device)
    world, rank = accelerator.num_processes, accelerator.process_index
    shard_of = train_images // cache.images_per_shard
    per_epoch = len(batches(cfg.run.seed, 0, len(train_images), world, rank, cfg.data.images_per_batch))
    if per_epoch == 0:
        raise ValueError(
            f"{len(train_images)} training images cannot fill one batch of {cfg.data.images_per_batch} on "
            f"{world} processes; lower data.images_per_batch"
        )

    if main:
        print(
            f"trainer: {world} process(es) on {device}, residency {residency}, {len(train_images)} train / "
            f"{len(val_images)} val images, {per_epoch} micro-batches per epoch per process",
            flush=True,
        )
    state = TrainState()
    if resume and found is not None:
        _check_resume_config(json.loads((found / "config.json").read_text()), to_dict(cfg), found)
        # save_state's counterpart: weights, optimiser moments, RNG states
        accelerator.load_state(str(found))
        state = TrainState(**json.loads((found / "trainer_state.json").read_text()))
        if main:
            print(f"resuming from {found} (step {state.step}, epoch {state.epoch})", flush=True)

    def jobs(epoch: int, position: int):
        """(epoch, images) of every micro-batch of this rank from a position on, forever."""
        while True:
            order = batches(
                cfg.run.seed,
                epoch,
                len(train_images),
                world,
                rank,
                cfg.data.images_per_batch,
                shard_of=shard_of,
            )
            for b in order[position:]:
                yield epoch, train_images[b]
            epoch, position = epoch + 1, 0

    loader = Prefetcher(
        store,
        jobs(state.epoch, state.batch_in_epoch),
        cfg.data,
        seed=cfg.run.seed,
        semantic=cfg.model.task == "semantic",
        pin=cuda,
    )

    def validate(m) -> dict:
        if len(val_images) == 0:
            return {}
        plain = accelerator.unwrap_model(m)
        if cfg.model.task == "semantic":
            return evaluate_semantic(plain, store, val_images, accelerator, cfg.model.num_classes)
        return evaluate(plain, store, val_images, accelerator)

    if main:
        flat = {
            f"{s}.{k}": (v if isinstance(v, int | float | str | bool) else str(v))
            for s, d in to_dict(cfg).items()
            for k, v in d.items()
        }
    accelerator.init_trackers("trainer", config=flat if main else None)
    losses_path = out / "losses.jsonl"
    if main:
        kept = []
        if losses_path.exists():  # drop steps after the checkpoint we resume from
            kept = [ln for ln in losses_path.read_text().splitlines() if json.loads(ln)["step"] <= state.step]
        losses_path.write_text("".join(ln + "\n" for ln in kept))
    if state.step == 0 and not state.start_metrics:
        state.start_metrics = validate(model)
        if main and state.start_metrics:
            print(f"starting model: {json.dumps(state.start_metrics)}", flush=True)

    def save(step: int) -> None:
        final = ckpt.step_dir(out, step)
        tmp = ckpt.temp_dir_for(final) if main else final.with_name(f".tmp-{final.name}")
        accelerator.wait_for_everyone()
        # save_state: weights, optimiser and every rank's RNG state, into a temp folder first
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
            (tmp / "config.json").write_text(json.dumps(to_dict(cfg)))
            save_config(cfg, tmp / "config.yaml", header=command or "resolved config")
            ckpt.commit(tmp, final)  # atomic: the step folder appears complete or not at all
            ckpt.prune(out, cfg.run.keep_checkpoints)
        accelerator.wait_for_everyone()

    def save_best(metrics: dict) -> None:
        from safetensors.torch import save_file

        final = out / "best"
        tmp = ckpt.temp_dir_for(final)
        tmp.mkdir(parents=True)
        weights = {
            k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()
        }
        save_file(weights, str(tmp / "model.safetensors"))
        save_config(cfg, tmp / "config.yaml", header=f"best at step {state.step}")
        (tmp / "metrics.json").write_text(json.dumps({"step": state.step, **metrics}, indent=2))
        ckpt.commit(tmp, final)

    stop = min(cfg.run.stop_at or cfg.run.steps, cfg.run.steps)
    bar = tqdm(
        total=stop, initial=state.step, disable=not (main and progress), unit="step", dynamic_ncols=True
    )
    model.train()
    while state.step < stop:
        t0 = time.perf_counter()
        factor = lr_factor(state.step, cfg.optim, cfg.run.steps)
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * factor
        step_losses, n_prompts, logged = [], 0, {}
        for micro in range(cfg.optim.grad_accum):
            batch = next(loader).to(device)  # pinned host memory -> device, non-blocking
            g = step_generator(cfg.run.seed, state.step * cfg.optim.grad_accum + micro, rank, device)
            # accumulate: no gradient all-reduce until the last micro-batch of the step
            with accelerator.accumulate(model):
                loss, logged = step_loss(model, batch, cfg, g, accelerator)
                every = accelerator.gather(loss.detach().float().reshape(1))
                if not bool(torch.isfinite(every).all()):
                    latest = ckpt.latest_checkpoint(out)
                    raise NonFiniteLoss(
                        f"non-finite loss {every.tolist()} at step {state.step + 1} (micro-batch {micro}, "
                        f"images "
                        f"{batch.image_ids.tolist()}); stopped before the update. Last good checkpoint: "
                        f"{latest if latest else 'none'}. Lower optim.lr or check the data, then --resume."
                    )
                # backward: scales by 1/grad_accum and handles mixed precision
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.clip_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.optim.clip_norm)
                # step: a no-op on all but the last micro-batch of the step (accelerate's accumulation)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(float(every.mean()))
            n_prompts += batch.num_objects if cfg.model.task == "instance" else batch.embeddings.shape[0]
            state.batch_in_epoch += 1
            if state.batch_in_epoch == per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        state.step += 1
        step_loss_value = float(np.mean(step_losses))
        rate = n_prompts * world / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss_value:.4f}", prompts_per_s=f"{rate:.1f}", epoch=state.epoch)
        if main:
            row = {"step": state.step, "loss": step_loss_value, "lr": cfg.optim.lr * factor}
            row.update({k: float(v) for k, v in logged.items()})
            with losses_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if cfg.run.log_every and state.step % cfg.run.log_every == 0:
            accelerator.log(
                {
                    "train/loss": step_loss_value,
                    "train/lr": cfg.optim.lr * factor,
                    "train/prompts_per_s": rate,
                    **{f"train/{k}": float(v) for k, v in logged.items()},
                },
                step=state.step,
            )
        last = state.step == stop
        if (cfg.run.eval_every and state.step % cfg.run.eval_every == 0) or state.step == cfg.run.steps:
            metrics = validate(model)
            if metrics:
                state.evals[str(state.step)] = metrics
                accelerator.log({f"val/{t}_miou": v["miou"] for t, v in metrics.items()}, step=state.step)
                if _score(metrics) > state.best_score:
                    state.best_score, state.best_step = _score(metrics), state.step
                    if main:
                        save_best(metrics)
                if main and progress:
                    bar.write(f"step {state.step}: val {json.dumps(metrics)}")
        if (cfg.run.save_every and state.step % cfg.run.save_every == 0) or last:
            save(state.step)
    bar.close()
    loader.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()

    summary = {"out": str(out), "step": state.step, "finished": state.step == cfg.run.steps}
    if main:
        summary.update(
            finish(out, cache, store, cfg, state, start_model, accelerator.unwrap_model(model), device)
        )
    return summary


def finish(out: Path, cache, store, cfg: Config, state: TrainState, start_model, model, device) -> dict:
    """Main process, end of run: metrics.json, loss curve and overlays."""
    files = []
    tuned = state.evals.get(str(state.step), {})
    metrics = {
        "step": state.step,
        "tuned": tuned,
        "start": state.start_metrics,
        "best": {"step": state.best_step, "score": state.best_score},
        "history": state.evals,
    }
    ckpt.write_json(out / "metrics.json", metrics)
    files.append(out / "metrics.json")
    rows = [json.loads(ln) for ln in (out / "losses.jsonl").read_text().splitlines()]
    if rows:
        evals = {int(s): _score(m) for s, m in state.evals.items()}
        if state.start_metrics:
            evals[0] = _score(state.start_metrics)
        files.append(
            loss_curve(
                [r["step"] for r in rows], [r["loss"] for r in rows], out / "loss_curve.png", evals=evals
            )
        )
    if cfg.model.task == "instance" and cfg.run.overlays and state.step == cfg.run.steps:
        (out / "overlays").mkdir(exist_ok=True)
        val = cache.image_indices("val")
        val = [int(i) for i in val if cache.object_range(int(i))[1] > cache.object_range(int(i))[0]]
        for i in val[: cfg.run.overlays]:
            start, stop = cache.object_range(i)
            gt = cache.masks(np.arange(start, stop), "original")
            before = predict_objects(start_model, store, i, "box", device)
            after = predict_objects(model, store, i, "box", device)

            def miou(pred, gt=gt):
                return float(np.mean([(p & g).sum() / max((p | g).sum(), 1) for p, g in zip(pred, gt)]))

            path = out / "overlays" / f"{cache.image_id[i]}.png"
            overlay(
                gt,
                before,
                after,
                path,
                image_path=image_file(cache, i),
                title=str(cache.image_id[i]),
                scores=(miou(before), miou(after)),
            )
            files.append(path)
    return {"metrics": metrics, "files": [str(f) for f in files]}


def run_from_args(
    cache: str, config: str | None, overrides: list[str], out: str, resume: bool, command: str
) -> dict:
    """The CLI's ``run``: load the config with overrides and train."""
    return run(cache, load_config(config, overrides), out, resume=resume, command=command)
