"""``trainer eval``: any models scored on any split of a cache, side by side in one table.

The models come from a run folder (``--run``: its starting model ``start`` and its tuned model ``tuned``) and
from ``--checkpoint`` specs, each one of:

- an official name (``lite_medsam``, ``vit_b``, ...), fetched and checked as ``embedcache build`` does;
- a file ``trainer export`` wrote, loaded with ``trainer.load_tuned`` (its sidecars, and its run's config
  from the manifest), or any SAM state dict of the cache's preset;
- another run folder: its tuned model, labelled with the folder's name.

Every model sees the same objects with the same prompts (``trainer.evaluate``), and one task scores them all:
the run's, or that of the exports' runs (a plain SAM is the default task's model); models of two tasks are
refused. A cache holds the features of one image encoder, so a checkpoint file is scored only if its image
encoder is the cache's, tensor for tensor, or, on a partial cache (``--tail-blocks k``), differs only in the
last k blocks and the neck: an encoder-adapted export then runs its own tail on the cached tap tokens, as its
run folder does, and scores exactly as the run folder.

Outputs in ``OUT``: ``metrics.json`` (per model and prompt type: mIoU, dice, IoU quantiles and every object's
IoU; with ``--clicks N`` also ``box_clicks`` and ``point_clicks``), ``table.md``, ``iou_distributions.png``,
``clicks.png`` (with ``--clicks``) and, for the first two models, ``overlays/<image>.png`` (image, ground
truth, first model, second model). With ``--auto amg`` every model also segments each image without prompts
(``trainer.auto_eval``; ``--auto ais``: a ``model.task=ais`` run by its AIS head, ``trainer.ais``): its
``auto`` scores in ``metrics.json`` and ``table.md``, and ``overlays_auto/<image>.png`` with every model's
instances.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from embedcache import open_cache
from embedcache.models import build_sam
from embedcache.signature import check_compatible
from embedcache.tap import split_tail
from trainer import checkpoint as ckpt
from trainer.ais import evaluate_ais
from trainer.amg import AmgConfig
from trainer.auto_eval import auto_overlays, auto_table, evaluate_amg
from trainer.config import Config
from trainer.data import ImageStore
from trainer.evaluate import IOU_QUANTILES, PROMPT_TYPES, Contender, clicks_key
from trainer.model import build_start_sam, build_trainable, start_checkpoint, tuned_sam
from trainer.plots import click_curves, iou_distributions
from trainer.task import Task, make_task
from trainer.tuned import TunedSam, load_tuned

AUTO_METHODS = ("amg", "ais")
"""``trainer eval --auto``'s choices: SAM's automatic mask generator, or the AIS head (``trainer.ais``)."""


def _run_models(
    cache, run: Path, which: str, device: torch.device, *, with_start: bool = True
) -> tuple[list[Contender], object]:
    """A run's ``start`` (unless not ``with_start``) and ``tuned`` models on ``cache`` (signature checked),
    and the run's config."""
    weights, cfg = ckpt.weights_and_config(run, which)
    check_compatible(cache, cfg.model.model_type, start_checkpoint(cfg), init_seed=cfg.model.init_seed)
    store = ImageStore(cache, "host", device, tail_blocks=cfg.model.encoder_tail_blocks)
    _, tuned = tuned_sam(cfg, weights)
    contenders = [Contender("tuned", tuned.to(device), store)]
    if with_start:
        start = build_trainable(build_start_sam(cfg), cfg).eval()
        contenders.insert(0, Contender("start", start.to(device), store))
    return contenders, cfg


def _cache_encoder(cache) -> dict[str, torch.Tensor]:
    """The image encoder weights ``cache`` was built with, from its signature's checkpoint id."""
    from embedcache.weights import OFFICIAL, fetch

    model_type, ck = cache.signature["model_type"], cache.signature["checkpoint"]
    if ck.startswith("random-init:"):
        return build_sam(model_type, None, seed=int(ck.split(":")[1])).image_encoder.state_dict()
    for name, official in OFFICIAL.items():
        if official.sha256 == ck and official.model_type == model_type:
            return build_sam(model_type, fetch(name)).image_encoder.state_dict()
    raise ValueError(
        f"{cache.path}: built from a checkpoint that is not an official one (sha256 {ck[:16]}...), so a "
        "checkpoint file cannot be checked against its encoder here; score runs with --run instead"
    )


def _checkpoint_model(
    cache, spec: str, which: str, device: torch.device, encoder: dict | None
) -> tuple[Contender, Config | None]:
    """One ``--checkpoint`` spec as a model on ``cache`` and the config it was trained with (``None``: a
    plain SAM); see the module docstring."""
    from embedcache.weights import resolve_checkpoint

    path = Path(spec)
    if path.is_dir():
        (tuned,), cfg = _run_models(cache, path, which, device, with_start=False)
        return tuned._replace(label=path.name), cfg
    loaded = load_tuned(resolve_checkpoint(spec), model_type=cache.signature["model_type"])
    if loaded.config is None and loaded.sidecars:
        raise ValueError(
            f"{spec}: an export with sidecars {loaded.sidecars} from before exports recorded the run's "
            "config, so its task is unknown; export the run again (trainer export) or score its run folder"
        )
    k = _tail_to_run(cache, loaded, encoder, spec)
    model = loaded.on_tap_tokens(k) if k else loaded.model
    label = spec if not path.is_file() else path.name
    return Contender(label, model.to(device), ImageStore(cache, "host", device, tail_blocks=k)), loaded.config


def _tail_to_run(cache, tuned: TunedSam, encoder: dict, spec: str) -> int:
    """How many of ``tuned``'s last encoder blocks run on ``cache``'s tap tokens: 0 when its image encoder
    is the one the cache was built with (``encoder``), tensor for tensor; the partial cache's
    ``tail_blocks`` when only those blocks and the neck differ (an encoder-adapted run's export, scored
    as its run folder is); ``ValueError`` naming the first differing tensor otherwise."""
    k = cache.tail_blocks
    parts = [*(tail := split_tail(tuned.sam.image_encoder, k)).blocks, tail.neck] if k else []
    in_tail = {id(t) for m in parts for t in (*m.parameters(), *m.buffers())}
    tail_differs = False
    for key, value in tuned.sam.image_encoder.state_dict(keep_vars=True).items():
        same = key in encoder and torch.equal(value.detach(), encoder[key])
        if id(value) in in_tail:
            tail_differs |= not same
        elif not same:
            where = f"outside its last {k} blocks and neck, " if k else ""
            raise ValueError(
                f"{spec}: its image encoder differs from the one {cache.path} was built with ({where}first "
                f"at image_encoder.{key}), so the cached embeddings do not describe this model"
                + ("" if k else "; an encoder-adapted export is scored on a partial cache (--tail-blocks)")
            )
    return k if tail_differs else 0


def _one_task(models: list[tuple[Config | None, str]]) -> Task:
    """The task that scores every model of ``(config, label)`` pairs: that of the first config (the run's,
    else the first checkpoint's that has one), the default task when all are plain SAMs (``None``). A model
    of another task, or a plain SAM beside a task that does not score plain SAMs, is refused naming both."""
    known = [(c, label) for c, label in models if c is not None]
    task = make_task(known[0][0] if known else Config())
    for c, label in models:
        if c is None and not task.scores_plain_sam:
            raise ValueError(
                f"{label} is a plain SAM, which {known[0][1]}'s task ({known[0][0].model.task}) does not "
                "score; score it in a trainer eval of its own"
            )
        if c is not None and type(make_task(c)) is not type(task):
            raise ValueError(
                f"{label} is a model.task={c.model.task} model and {known[0][1]} a "
                f"model.task={known[0][0].model.task} one; score them in trainer evals of their own"
            )
    return task


def metrics_table(metrics: dict[str, dict]) -> str:
    """Markdown: one row per model and prompt type with mIoU, dice, the IoU quantiles and the object count
    (empty when no model has such scores)."""
    qs = [str(q) for q in IOU_QUANTILES]
    head = ["model", "prompt", "mIoU", "dice", *(f"IoU p{round(float(q) * 100)}" for q in qs), "objects"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    curves = {clicks_key(p) for p in PROMPT_TYPES}
    for label, per_prompt in metrics.items():
        for prompt, m in per_prompt.items():
            if prompt in curves or prompt == "auto":  # auto scores have their own table (auto_table)
                continue
            quantiles = m.get("iou_quantiles", {})  # semantic metrics have none: no per-object IoU
            cells = [label, prompt, f"{m['miou']:.3f}", f"{m['dice']:.3f}"]
            cells += [f"{quantiles[q]:.3f}" if q in quantiles else "-" for q in qs]
            cells.append(str(m.get("n_objects", m.get("n_images", "-"))))
            lines.append("| " + " | ".join(cells) + " |")
    if len(lines) == 2:  # only automatic scores (an AIS run): no empty table
        return ""
    return "\n".join(lines) + "\n"


def clicks_table(metrics: dict[str, dict]) -> str:
    """Markdown: one row per model and start with its mIoU after each click and NoC85 / NoC90 (empty when
    no model has click curves)."""
    rows = [
        (label, prompt, per_prompt[clicks_key(prompt)])
        for label, per_prompt in metrics.items()
        for prompt in PROMPT_TYPES
        if clicks_key(prompt) in per_prompt
    ]
    if not rows:
        return ""
    n = len(rows[0][2]["miou"])
    head = ["model", "start", *(f"{k} clicks" for k in range(n)), "NoC85", "NoC90"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, prompt, c in rows:
        cells = [label, prompt, *(f"{v:.3f}" for v in c["miou"]), f"{c['noc85']:.2f}", f"{c['noc90']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def eval_run(
    cache_path: str | Path,
    run: str | Path | None = None,
    *,
    checkpoints: tuple[str, ...] = (),
    which: str = "best",
    split: str = "val",
    out: str | Path | None = None,
    overlays: int | None = None,
    clicks: int = 0,
    mask_prompt: bool = True,
    auto: str | None = None,
    amg: AmgConfig | None = None,
    amg_sweep: bool = False,
) -> dict:
    """Score a run's models and/or ``checkpoints`` on the ``split`` images of a cache and write ``out``.

    With ``clicks`` N > 0 each model also gets N corrective clicks from each start (``trainer.clicks``; the
    previous logits as the mask prompt unless not ``mask_prompt``): ``box_clicks`` and ``point_clicks`` in
    its metrics, a second table in ``table.md``, and ``clicks.png``. With ``auto="amg"`` each model also
    gets ``trainer.auto_eval.evaluate_amg``'s scores (``amg`` its settings, default SAM's; ``amg_sweep`` the
    threshold sweep) under ``"auto"`` (``auto="ais"``: ``trainer.ais.evaluate_ais``'s), a table section and
    instance overlays.

    Returns ``{"metrics", "table", "files"}`` on the main process, ``{}`` elsewhere. ``metrics`` maps each
    model label to its metrics (the task's ``evaluate``: per prompt type, with ``per_object``), plus
    ``split``, ``cache`` and, with a run, ``weights``.
    """
    if run is None and not checkpoints:
        raise ValueError("trainer eval needs --run RUN and/or at least one --checkpoint")
    if run is None and out is None:
        raise ValueError("trainer eval without --run needs --out (where metrics.json goes)")
    if auto not in (None, *AUTO_METHODS):
        raise ValueError(f"--auto {auto}: the automatic methods are amg and ais")
    out = Path(out) if out else Path(run) / "eval"
    cache = open_cache(cache_path)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    contenders, cfg = _run_models(cache, Path(run), which, device) if run else ([], None)
    encoder = None if all(Path(s).is_dir() for s in checkpoints) else _cache_encoder(cache)
    models = [_checkpoint_model(cache, s, which, device, encoder) for s in checkpoints]
    contenders += [c for c, _ in models]
    task = _one_task([*([(cfg, str(run))] if run else []), *((c, m.label) for m, c in models)])
    labels = [c.label for c in contenders]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two models would share a label in the table: {labels}")
    images = cache.image_indices(split)
    if cfg is not None and split == "val" and cfg.run.val_max_images:
        images = images[: cfg.run.val_max_images]
    # a task scored by an automatic method (an AIS run: evaluate_ais) is scored once, in that pass below,
    # with the overlays' labels (with --clicks its evaluate runs, to refuse them)
    once = auto is not None and auto == task.scored_by_auto and not clicks
    scores = {
        c.label: {}
        if once
        else task.evaluate(c.model, c.store, images, accelerator, clicks=clicks, mask_prompt=mask_prompt)
        for c in contenders
    }
    n = (cfg.run.overlays if cfg is not None else 4) if overlays is None else overlays
    auto_labels = {}
    if auto is not None:
        methods = {  # ais: models with an AIS head (trainer.ais); the others are refused
            "amg": partial(evaluate_amg, cfg=amg or AmgConfig(), sweep=amg_sweep),
            "ais": evaluate_ais,
        }
        for c in contenders:
            scores[c.label]["auto"], auto_labels[c.label] = methods[auto](
                c.model, c.store, images, accelerator, keep=n
            )
    if not accelerator.is_main_process:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    metrics = {**scores, "split": split, "cache": str(cache_path)}
    if run:
        metrics["weights"] = str(ckpt.resolve_weights(Path(run), which))
    ckpt.write_json(out / "metrics.json", metrics)
    table = metrics_table(scores)
    curves = clicks_table(scores)
    if curves:
        fed = "the previous logits as the mask prompt" if mask_prompt else "no mask prompt"
        table += f"\nmIoU after each corrective click ({fed}); NoC: interactions to reach 85 / 90 % IoU\n\n"
        table += curves
    if auto is not None:
        table += "\nautomatic instance segmentation: mSA over IoU 0.50-0.95, SA50, SA75, objects\n\n"
        table += auto_table(scores)
    (out / "table.md").write_text(table)
    files = [out / "metrics.json", out / "table.md"]
    per_object = {
        label: {p: m[p]["ious"] for p in PROMPT_TYPES if "ious" in m.get(p, {})}
        for label, m in scores.items()
    }
    if any(per_object.values()):
        files.append(iou_distributions(per_object, out / "iou_distributions.png"))
    if curves:
        per_start = {
            f"{label} from {p}": m[clicks_key(p)]["miou"]
            for label, m in scores.items()
            for p in PROMPT_TYPES
            if clicks_key(p) in m
        }
        files.append(click_curves(per_start, out / "clicks.png"))
    if len(contenders) >= 2:
        files += task.overlays(out / "overlays", images, contenders[0], contenders[1], n)
    files += auto_overlays(out / "overlays_auto", cache, auto_labels)
    return {"metrics": metrics, "table": table, "files": [str(f) for f in files]}
