"""One training session: ``setup`` builds it, ``train_step`` advances it by one optimiser step.

``trainer.train.run`` is the loop around these two, and ``bench train`` times ``train_step`` itself. The
state needed to resume is a handful of integers (``TrainState``) plus what ``accelerator.save_state``
writes (weights, optimiser moments, RNG states).
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration
from torch import nn

from embedcache import open_cache
from embedcache.cache import Cache
from embedcache.lock import CacheLockedError, build_lock, lock_path
from embedcache.signature import check_compatible
from trainer import checkpoint as ckpt
from trainer.config import Config, OptimConfig, save_config, to_dict
from trainer.data import ImageStore, Prefetcher, pick_residency
from trainer.model import (
    build_start_sam,
    build_trainable,
    param_groups,
    start_checkpoint,
    trainable_parameters,
)
from trainer.order import batches, micro_batches
from trainer.prompts import step_generator
from trainer.task import TASKS, Task, make_task
from trainer.variant import Variant
from trainer.variants import variants_for


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss: the run stops before the update, and the last checkpoint stays as it was."""


class RunLockedError(RuntimeError):
    """Another process is writing this run folder; the message names it (pid, host, start time)."""


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
    """Best validation score (the task's ``score``: box mIoU, or semantic mIoU)."""
    start_metrics: dict = field(default_factory=dict)
    """Validation metrics of the starting model (step 0)."""
    evals: dict = field(default_factory=dict)
    """Validation metrics per evaluated step, keyed by the step as a string."""


@dataclass(kw_only=True)
class Session:
    """Everything one training run holds; built by ``setup``."""

    cfg: Config
    """The resolved config (cache-derived fields filled in); what every checkpoint records."""
    out: Path
    """The run folder."""
    cache: Cache
    task: Task
    variants: list[Variant]
    """The model's variants (``trainer.variants.variants_for``): ``train_step`` calls their per micro-step
    hooks and adds their loss terms."""
    accelerator: Accelerator
    model: nn.Module
    """The ``PromptedDecoder``, prepared: on the device, DDP-wrapped with several processes."""
    start_model: nn.Module
    """A frozen copy of the starting model, for the end-of-run overlays."""
    params: list[nn.Parameter]
    """What the optimiser updates."""
    optimizer: torch.optim.Optimizer
    store: ImageStore
    loader: Prefetcher
    """This process's micro-batches, from the state's position on, forever."""
    state: TrainState
    train_images: np.ndarray
    """``(n,)`` int64 cache indices of the training images."""
    val_images: np.ndarray
    """``(m,)`` int64 cache indices of the validation images (at most ``run.val_max_images``)."""
    per_epoch: int
    """Micro-batches per epoch on each process."""
    lock: ExitStack
    """Holds the run folder's lock (main process); closing it releases the lock, as the process's end does."""

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass(frozen=True, kw_only=True)
class StepStats:
    """What one ``train_step`` did."""

    loss: float
    """Mean loss over the step's micro-batches and every process."""
    lr: float
    """The learning rate the step used."""
    prompts: int
    """Prompted predictions this process trained on (``Task.prompts_in``, summed over micro-batches)."""
    logged: dict[str, float]
    """The task's named loss terms of the last micro-batch."""
    data_wait_s: float
    """Seconds this process was blocked on the loader."""


def warmup_steps(cfg: OptimConfig, total: int) -> int:
    """The warm-up's length in optimiser steps: ``cfg.warmup`` of ``total``, rounded, at least 1 when > 0."""
    return max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0


def lr_factor(step: int, cfg: OptimConfig, total: int) -> float:
    """Learning-rate multiplier of optimiser step ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup_steps``, then cosine or constant.

    A pure function of the step, so resuming needs no scheduler state.
    """
    warm = warmup_steps(cfg, total)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def setup(
    cache: str | Path | Cache,
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    command: str = "",
    cpu: bool | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> Session:
    """Build the session of a run on ``cache`` into the run folder ``out`` (resuming from its newest
    checkpoint when ``resume``). ``cpu`` forces the host; by default CUDA is used when there is one.
    ``split`` gives the ``(train, val)`` image indices instead of the task's training images and the cache's
    validation split (``trainer sweep`` validates on images held out of the training split).

    The main process holds the run folder's lock from here on (``Session.lock``: close it when the run ends);
    a second run on ``out`` is refused with ``RunLockedError``. A failed setup releases the lock.
    """
    lock = ExitStack()
    try:
        return _setup(cache, cfg, Path(out), lock, resume=resume, command=command, cpu=cpu, split=split)
    except BaseException:
        lock.close()
        raise


def _setup(cache, cfg: Config, out: Path, lock: ExitStack, *, resume, command, cpu, split) -> Session:
    """``setup``'s work; the run folder's lock goes into ``lock``."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    # refuse a cache made by another model before anything is built: its embeddings mean nothing here
    check_compatible(cache, cfg.model.model_type, start_checkpoint(cfg), init_seed=cfg.model.init_seed)
    # fields the cache decides (semantic: num_classes) make a new config; the validated one never changes
    cfg = TASKS[cfg.model.task].resolve(cfg, cache)
    task = make_task(cfg)
    cuda = torch.cuda.is_available() if cpu is None else not cpu
    accelerator = _accelerator(cfg, out, cuda)
    found = _open_run_folder(out, cfg, accelerator, lock, resume=resume, command=command)

    # the model: SAM's prompt encoder + mask decoder + the config's variants; the image encoder never runs
    model = build_trainable(build_start_sam(cfg), cfg)
    start_model = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    params = trainable_parameters(model)
    opt_cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    groups = param_groups(model, cfg.optim.lr_scale)
    optimizer = opt_cls(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    # prepare: move to the device, wrap in DDP when there are several processes, wrap the optimiser for
    # accumulation and mixed precision. The learning rate is set by hand from lr_factor(step) (train_step).
    model, optimizer = accelerator.prepare(model, optimizer)

    # the task's training images (AIS builds its targets here), or the given split's share of them
    task_images = task.train_images(cache)
    train_images, val_images = split or (task_images, cache.image_indices("val"))
    if cfg.run.val_max_images:
        val_images = val_images[: cfg.run.val_max_images]
    store, per_epoch = _store(cache, cfg, train_images, val_images, accelerator)
    state = TrainState()
    if resume and found is not None:
        found = good_checkpoint(out, say=accelerator.is_main_process)
        _check_resume_config(json.loads((found / "config.json").read_text()), to_dict(cfg), found)
        # save_state's counterpart: weights, optimiser moments, RNG states
        accelerator.load_state(str(found))
        state = read_train_state(found / "trainer_state.json")
        if accelerator.is_main_process:
            print(f"resuming from {found} (step {state.step}, epoch {state.epoch})", flush=True)
    # data: this rank's share of a pure, shard-aware order, from the state's position on
    order = micro_batches(
        train_images,
        seed=cfg.run.seed,
        world=accelerator.num_processes,
        rank=accelerator.process_index,
        batch=cfg.data.images_per_batch,
        shard_of=train_images // cache.images_per_shard,
        epoch=state.epoch,
        position=state.batch_in_epoch,
    )
    loader = Prefetcher(store, order, cfg.data, seed=cfg.run.seed, semantic=task.reads_labels, pin=cuda)
    return Session(
        cfg=cfg,
        out=out,
        cache=cache,
        task=task,
        variants=variants_for(cfg.model),
        accelerator=accelerator,
        model=model,
        start_model=start_model,
        params=params,
        optimizer=optimizer,
        store=store,
        loader=loader,
        state=state,
        train_images=train_images,
        val_images=val_images,
        per_epoch=per_epoch,
        lock=lock,
    )


def _accelerator(cfg: Config, out: Path, cuda: bool) -> Accelerator:
    """The run's accelerator: precision, accumulation, DDP and logging settings of ``cfg``."""
    precision = cfg.optim.mixed_precision
    return Accelerator(
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


def _open_run_folder(
    out: Path, cfg: Config, accelerator: Accelerator, lock: ExitStack, *, resume: bool, command: str
) -> Path | None:
    """Lock ``out`` (main process), refuse a start over checkpoints or a resume of a non-run folder, and
    write the resolved ``config.yaml``; returns the newest checkpoint (``None``: none yet)."""
    if accelerator.is_main_process:
        run_folder_lock(out, lock)
    found = ckpt.latest_checkpoint(out)
    if found is not None and not resume:
        raise FileExistsError(
            f"{out} already holds checkpoints ({found.name}); pass --resume or pick a new --out"
        )
    if resume and found is None:
        if not (out / "config.yaml").is_file():  # a typo'd or empty folder: resuming it would start afresh
            raise FileNotFoundError(
                f"--resume: {out} is not a run folder (no config.yaml, no checkpoints/step_*/); "
                "drop --resume to start a new run there"
            )
        if accelerator.is_main_process:  # a run stopped before its first save: nothing to resume but a start
            print(f"--resume: {out} has no checkpoint yet; starting from step 0", flush=True)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml", header=command or "resolved config of this run")
    accelerator.wait_for_everyone()
    return found


def _store(
    cache: Cache, cfg: Config, train_images: np.ndarray, val_images: np.ndarray, accelerator: Accelerator
) -> tuple[ImageStore, int]:
    """The image store (embeddings resident per ``data.residency``) and the micro-batches per epoch on each
    process (``ValueError`` when the training images cannot fill one)."""
    device, tail = accelerator.device, cfg.model.encoder_tail_blocks
    residency = pick_residency(cache, train_images, cfg.data, device, tail_blocks=tail)
    store = ImageStore(cache, residency, device, tail_blocks=tail)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = len(batches(cfg.run.seed, 0, len(train_images), world, rank, cfg.data.images_per_batch))
    if per_epoch == 0:
        raise ValueError(
            f"{len(train_images)} training images cannot fill one batch of {cfg.data.images_per_batch} on "
            f"{world} processes; lower data.images_per_batch"
        )
    if accelerator.is_main_process:
        print(
            f"trainer: {world} process(es) on {device}, residency {residency}, {len(train_images)} train / "
            f"{len(val_images)} val images, {per_epoch} micro-batches per epoch per process",
            flush=True,
        )
    return store, per_epoch


def run_folder_lock(out: Path, held: ExitStack) -> None:
    """Take the run folder's lock into ``held``: embedcache's build lock (an ``flock`` on ``.<name>.lock``
    beside ``out``, which the OS releases when its holder dies, however it dies). Raises ``RunLockedError``
    naming the holder."""
    try:
        held.enter_context(build_lock(out))
    except CacheLockedError:
        raise RunLockedError(
            f"{out}: another trainer run is writing this run folder ({_holder(lock_path(out))}); wait for it "
            "or stop it, then rerun (or pick another --out)"
        ) from None


def _holder(path: Path) -> str:
    """The pid, host and start time a lock file records."""
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown; lock {path}"


def read_train_state(path: Path) -> TrainState:
    """``trainer_state.json`` as a ``TrainState``; ``CheckpointReadError`` naming the file and the field when
    it does not parse, lacks a field or holds one of a wrong type or sign."""
    problem = _train_state_problem(path)
    if problem:
        raise ckpt.CheckpointReadError(problem)
    return TrainState(**json.loads(path.read_text()))


def _train_state_problem(path: Path) -> str | None:
    """Why ``trainer_state.json`` at ``path`` is not a ``TrainState`` (``"<path>: <why>"``), or ``None``."""
    problem = ckpt.damage(path)
    if problem:
        return problem
    d = json.loads(path.read_text())
    want = {f.name: f.type for f in fields(TrainState)}  # "int", "float" or "dict"
    if not isinstance(d, dict) or set(d) != set(want):
        return (
            f"{path}: damaged (fields {sorted(d) if isinstance(d, dict) else d!r}, expected {sorted(want)})"
        )
    for k, v in d.items():
        if not _is_state_value(v, want[k], least=-1 if k == "best_step" else 0):
            return f"{path}: damaged ({k}={v!r} is not {_STATE_KINDS[want[k]][1]})"
    return None


_STATE_KINDS = {
    "int": (int, "an integer >= 0"),
    "float": ((int, float), "a number"),
    "dict": (dict, "a mapping"),
}


def _is_state_value(v, kind: str, *, least: int) -> bool:
    """Whether a ``trainer_state.json`` value is of its field's kind (``int`` ones at least ``least``)."""
    return not isinstance(v, bool) and isinstance(v, _STATE_KINDS[kind][0]) and (kind != "int" or v >= least)


def good_checkpoint(out: Path, *, say: bool) -> Path:
    """The newest checkpoint of ``out`` whose files are whole (``ckpt.damage_in``, ``trainer_state.json``'s
    types), saying when ``say`` which damaged ones it passes over; ``CheckpointReadError`` when none is."""
    skipped = []
    for _, folder in reversed(ckpt.list_checkpoints(out)):
        problem = ckpt.damage_in(folder) or _train_state_problem(folder / "trainer_state.json")
        if problem is None:
            if say and skipped:
                print(
                    f"--resume: {skipped[0]}; resuming from the previous good checkpoint {folder}", flush=True
                )
            return folder
        skipped.append(problem)
    raise ckpt.CheckpointReadError(
        f"--resume: {skipped[0]}; no earlier good checkpoint in {out}: start afresh in a new --out"
    )


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


def train_step(s: Session) -> StepStats:
    """One optimiser step: ``optim.grad_accum`` micro-batches, each with fresh prompts, then one update.

    Raises ``NonFiniteLoss`` before the update when any process's loss is NaN or inf.
    """
    cfg, state, accelerator = s.cfg, s.state, s.accelerator
    lr = cfg.optim.lr * lr_factor(state.step, cfg.optim, cfg.run.steps)
    for group in s.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]  # optim.lr_scale's factor (trainer.model.param_groups)
    losses, prompts, logged, waited = [], 0, {}, 0.0
    for micro in range(cfg.optim.grad_accum):
        t0 = time.perf_counter()
        batch = next(s.loader)
        waited += time.perf_counter() - t0
        batch = batch.to(s.device)  # pinned host memory -> device, non-blocking
        # the prompts of a micro-batch are a pure function of (seed, micro-step, rank): resume draws the same
        g = step_generator(
            cfg.run.seed, state.step * cfg.optim.grad_accum + micro, accelerator.process_index, s.device
        )
        # accumulate: no gradient all-reduce until the last micro-batch of the step
        with accelerator.accumulate(s.model):
            unwrapped = accelerator.unwrap_model(s.model)
            for variant in s.variants:  # per micro-step state (Conv-LoRA's router noise seed)
                variant.before_micro_step(unwrapped, g)
            loss, logged = s.task.loss(s.model, batch, g, accelerator)
            for variant in s.variants:  # what the variants add to the loss (Conv-LoRA's balance loss)
                for name, term in variant.loss_terms(unwrapped).items():
                    loss, logged = loss + term, {**logged, name: term.detach()}
            every = accelerator.gather(loss.detach().float().reshape(1))
            if not bool(torch.isfinite(every).all()):  # the one host read of the loss per micro-batch
                latest = ckpt.latest_checkpoint(s.out)
                raise NonFiniteLoss(
                    f"non-finite loss {every.tolist()} at step {state.step + 1} (micro-batch {micro}, images "
                    f"{batch.image_ids.tolist()}); stopped before the update. Last good checkpoint: "
                    f"{latest if latest else 'none'}. Lower optim.lr or check the data, then --resume."
                )
            # backward: scales by 1/grad_accum and handles mixed precision
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.clip_norm > 0:
                accelerator.clip_grad_norm_(s.params, cfg.optim.clip_norm)
            # step: a no-op on all but the last micro-batch of the step (accelerate's accumulation)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        losses.append(float(every.mean()))
        prompts += s.task.prompts_in(batch)
        state.batch_in_epoch += 1
        if state.batch_in_epoch == s.per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    state.step += 1
    return StepStats(
        loss=float(np.mean(losses)),
        lr=lr,
        prompts=prompts,
        logged={k: float(v) for k, v in logged.items()},
        data_wait_s=waited,
    )
