"""The run configuration: small keyword-only dataclasses, loaded from YAML with ``key=value`` overrides.

A YAML file holds up to one mapping per section (``model``, ``data``, ``prompts``, ``loss``, ``optim``,
``run``). Overrides on the command line name a section and a field: ``optim.lr=3e-4 run.steps=200``. The
resolved config (defaults filled in, overrides applied) is written as ``config.yaml`` into the run folder and
into every checkpoint, and it is what ``trainer export`` and ``trainer eval`` rebuild the model from.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from embedcache.models import MODEL_TYPES

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
"""The recipe ``trainer run`` and ``trainer sweep`` use without ``--config``."""


def check_choices(section: Any) -> None:
    """Every ``Literal[...]`` field of a config section holds one of its choices, read from the annotation.

    Raises ``ValueError`` naming ``section.field``, the bad value and the choices.
    """
    name = _SECTION_NAMES[type(section)]
    for f, hint in get_type_hints(type(section)).items():
        value = getattr(section, f)
        if get_origin(hint) is Literal and value not in get_args(hint):
            raise ValueError(f"{name}.{f} must be one of {'|'.join(get_args(hint))}, got {value!r}")


def check_at_least(section: Any, low: float, *fields: str) -> None:
    """Each of ``fields`` of a config section is ``>= low``; ``ValueError`` naming ``section.field`` and the
    value of the first that is not."""
    name = _SECTION_NAMES[type(section)]
    for f in fields:
        if getattr(section, f) < low:
            raise ValueError(f"{name}.{f} must be >= {low}, got {getattr(section, f)!r}")


def check_finite(section: Any) -> None:
    """Every ``float`` field (and every number of a ``tuple[float, ...]`` or ``dict[str, float]`` one) of a
    config section is finite.

    Raises ``ValueError`` naming ``section.field`` and the value (``.inf`` and ``.nan`` are valid YAML).
    """
    name = _SECTION_NAMES[type(section)]
    for f, hint in get_type_hints(type(section)).items():
        if hint is float or (get_origin(hint) in (tuple, dict) and float in get_args(hint)):
            value = getattr(section, f)
            if isinstance(value, dict):
                numbers = list(value.values())
            else:
                numbers = list(value) if isinstance(value, tuple) else [value]
            if not all(math.isfinite(v) for v in numbers):
                raise ValueError(f"{name}.{f} must be finite, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which SAM to start from, and which of its parts train."""

    model_type: str = "vit_tiny"
    """One of embedcache's ``MODEL_TYPES``; must match the cache's signature."""
    checkpoint: str | None = None
    """SAM state dict to start from; ``None`` means random init from ``init_seed`` (``vit_tiny`` demos)."""
    init_seed: int = 0
    """Seed of the random initialisation when ``checkpoint`` is ``None``; part of the cache signature."""
    train_mask_decoder: bool = True
    """Train every mask-decoder weight. Turn off to train only LoRA adapters (and/or the prompt encoder)."""
    train_prompt_encoder: bool = False
    """Also train the prompt encoder (point/box embeddings and the mask-prompt convs)."""
    lora_rank: int = 0
    """Rank of LoRA adapters on the decoder's attention projections; 0 means no LoRA."""
    lora_alpha: float = 8.0
    """LoRA scale numerator: the update is ``(alpha / rank) * B @ A``."""
    task: Literal["instance", "semantic", "ais"] = "instance"
    """The task (``trainer.task.TASKS``). ``instance``: one prompted mask per object. ``semantic``: one output
    token per class, trained with ``loss.ce``. ``ais``: a prompt-free head predicting foreground, centre and
    boundary distance for automatic instance segmentation (``trainer.ais``)."""
    num_classes: int = 0
    """Semantic task only: classes including background 0. 0 means the cache's largest class id + 1, which
    the run resolves and records in its config."""
    semantic_prompt: Literal["none", "box"] = "none"
    """Semantic task only: ``none`` (prompt-free) or ``box`` (the whole image's input box as the prompt)."""
    encoder_tail_blocks: int = 0
    """Train the image encoder's last k blocks (their adapters) and its neck, run on a partial cache's tap
    tokens (``embedcache build --tail-blocks k``, the same k). 0: the encoder is frozen (decoder-only)."""
    encoder_adapter: Literal["none", "lora", "conv_lora"] = "none"
    """Adapter on the tail blocks' attention ``qkv``: ``lora`` (merged into SAM's weights on export) or
    ``conv_lora`` (exported beside them); ``none`` trains the neck only."""
    encoder_rank: int = 4
    """Rank of the encoder adapters."""
    encoder_alpha: float = 4.0
    """Encoder adapter scale numerator: the update is ``(alpha / rank) * B (...)``."""
    conv_lora_scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    """Conv-LoRA: one convolution expert per scale (its upsampling factor); the expert count is their
    number. The default is the public implementation's 8 experts at scales 1..8."""
    conv_lora_balance: float = 0.01
    """Conv-LoRA: weight of the router's load-balancing loss, added to the task's loss."""
    encoder_checkpoint: bool = True
    """Recompute each tail block in backward instead of keeping its activations (bounded memory)."""

    def __post_init__(self):
        # YAML gives a list; a frozen section stores the tuple it means (part of validation, not a change)
        object.__setattr__(self, "conv_lora_scales", tuple(int(s) for s in self.conv_lora_scales))
        check_choices(self)
        check_finite(self)
        if self.init_seed < 0:
            raise ValueError(f"model.init_seed must be >= 0, got {self.init_seed}")
        if self.encoder_tail_blocks < 0 or self.encoder_rank < 1:
            raise ValueError("model.encoder_tail_blocks must be >= 0 and model.encoder_rank >= 1")
        if self.encoder_adapter != "none" and self.encoder_tail_blocks == 0:
            raise ValueError(
                f"model.encoder_adapter={self.encoder_adapter} needs model.encoder_tail_blocks >= 1 "
                "(and a cache built with the same --tail-blocks)"
            )
        if not self.conv_lora_scales or min(self.conv_lora_scales) < 1:
            raise ValueError(
                f"model.conv_lora_scales must be integers >= 1, got {list(self.conv_lora_scales)}"
            )
        check_at_least(self, 0, "conv_lora_balance")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model.model_type={self.model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        if self.lora_rank < 0:
            raise ValueError(f"model.lora_rank must be >= 0, got {self.lora_rank}")
        if not (
            self.train_mask_decoder or self.train_prompt_encoder or self.lora_rank or self.encoder_tail_blocks
        ):
            raise ValueError(
                "nothing trains: set model.train_mask_decoder, train_prompt_encoder, lora_rank or "
                "encoder_tail_blocks"
            )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How images and objects are read from the cache and grouped into steps."""

    images_per_batch: int = 2
    """B: images per micro-batch on each process."""
    max_objects: int = 8
    """K: at most this many objects per image per step, a fresh random subset each epoch."""
    hardest_of: int = 0
    """0: the ``max_objects`` are drawn at random. N > ``max_objects`` (instance task only): N are drawn at
    random, each is predicted from its box by the model as it is at that step (no gradient), and the
    ``max_objects`` of each image with the lowest IoU train (``trainer.instance.hardest_objects``); this
    costs one more decoder pass over the N objects a micro-batch."""
    hardest_starts: Literal["all", "box"] = "all"
    """With ``hardest_of``, which starts the hardest objects fill: ``all``, every kept object, box or click
    start as ``prompts.box_fraction`` draws it; ``box``, each of an image's ``max_objects`` slots is a box
    start with probability ``prompts.box_fraction`` and takes the hardest candidate left, a click slot a
    random one of the others (``trainer.instance.hardest_box_starts``), so the clicks train on ordinary
    objects. Ignored when ``hardest_of`` is 0."""
    residency: Literal["stream", "host", "device", "auto"] = "auto"
    """Where embeddings live: ``stream`` (read from Zarr every epoch), ``host`` (RAM after the first read),
    ``device`` (the GPU, read once), or ``auto`` (the first of device, host that fits; else stream)."""
    readers: int = 2
    """Background reader threads."""
    prefetch: int = 4
    """Micro-batches read ahead of the training loop."""
    targets: Literal["coverage", "nearest"] = "coverage"
    """What the instance loss compares the logits with in the input frame: ``coverage``, the share of each
    input pixel the object covers in the original image (soft near the edges when the image is downsized,
    and centred on the image as the resize centres it), or ``nearest``, the cache's bool input masks (the
    nearest rule, up to half an input pixel off when downsizing; the only target before 2026-12-05).
    Clicks come from the same frame (``Batch.prompt_masks``); docs/training.md has the measurements. The AIS
    task's maps follow the same choice (``trainer.ais.image_targets``); the semantic task's class maps are
    the nearest rule's either way."""
    views: Literal["all", "identity"] = "all"
    """Which of the cache's views (``embedcache build --views``) training reads: ``all``, one per image per
    epoch, or ``identity`` only: the same run without augmentation on the same cache (a cache without views
    has only the identity either way; validation always reads the identity)."""

    def __post_init__(self):
        check_choices(self)
        if self.images_per_batch < 1 or self.max_objects < 1:
            raise ValueError("data.images_per_batch and data.max_objects must be >= 1")
        if self.hardest_of and self.hardest_of <= self.max_objects:
            raise ValueError(
                f"data.hardest_of must be 0 (off) or more than data.max_objects ({self.max_objects}), "
                f"got {self.hardest_of}"
            )
        if self.readers < 1 or self.prefetch < 1:
            raise ValueError("data.readers and data.prefetch must be >= 1")


@dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """The prompt mix, drawn fresh every step from a generator seeded by (seed, step, process)."""

    box_fraction: float = 1.0
    """Fraction of objects whose first prompt is a (jittered) box; the rest get points."""
    box_jitter: float = 0.1
    """Box corner noise, as a fraction of the box side (standard deviation)."""
    box_jitter_max_px: float = 20.0
    """Cap on the box corner noise, in input-frame pixels."""
    pos_points: int = 1
    """Positive points sampled inside the mask, for point-prompted objects."""
    neg_points: int = 0
    """Negative points for point-prompted objects: outside the mask, inside its box grown by 10%."""
    box_points: int = 0
    """Extra positive points added to box-prompted objects."""
    corrective_rounds: int = 0
    """SAM's iterative training: rounds after the first, each adding one click from the error region of the
    previous round's prediction. Every round's loss is summed (``trainer.instance``)."""
    mask_prompt_prob: float = 0.0
    """Probability, per object and corrective round, that the previous round's low-res logits (detached) are
    also given as the mask prompt. The first round never has one."""
    click_restart: float = 0.0
    """Probability, per box-started object, that its first corrective round is a fresh start instead: one
    click drawn uniformly inside the object, on its own (no box, no mask prompt), trained on the multimask
    outputs as a click start is but weighted as the box start it is (``loss.point_start`` does not apply).
    The object keeps its box round and is decoded as often as with a correction, so a recipe can learn
    single clicks without giving up box starts (``box_fraction``). Needs ``corrective_rounds >= 1``."""
    multimask: bool = True
    """A single-point prompt (no box, one click) trains SAM's 3 multimask outputs, back-propagating the one
    with the least loss, as SAM does for ambiguous prompts. Boxes and multi-click prompts always train the
    single-mask output 0, the one they use at inference. ``false``: output 0 for every prompt."""

    def __post_init__(self):
        check_finite(self)
        if not 0.0 <= self.box_fraction <= 1.0:
            raise ValueError(f"prompts.box_fraction must be in [0, 1], got {self.box_fraction}")
        if self.box_fraction < 1.0 and self.pos_points < 1:
            raise ValueError("point-prompted objects need prompts.pos_points >= 1")
        check_at_least(self, 0, "box_jitter", "box_jitter_max_px", "neg_points", "box_points")
        if self.corrective_rounds < 0:
            raise ValueError("prompts.corrective_rounds must be >= 0")
        if not 0.0 <= self.mask_prompt_prob <= 1.0:
            raise ValueError(f"prompts.mask_prompt_prob must be in [0, 1], got {self.mask_prompt_prob}")
        if not 0.0 <= self.click_restart <= 1.0:
            raise ValueError(f"prompts.click_restart must be in [0, 1], got {self.click_restart}")
        if self.click_restart > 0 and self.corrective_rounds == 0:
            raise ValueError(
                "prompts.click_restart > 0 needs prompts.corrective_rounds >= 1 (it replaces one)"
            )
        if self.mask_prompt_prob > 0 and self.corrective_rounds == 0:
            raise ValueError(
                "prompts.mask_prompt_prob > 0 needs prompts.corrective_rounds >= 1 (it feeds back a "
                "prediction)"
            )


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Weights of the named loss terms; the loss of an object is the weighted sum, averaged over objects."""

    focal: float = 20.0
    """Sigmoid focal loss (SAM: focal and dice at 20:1)."""
    dice: float = 1.0
    """Soft dice loss."""
    iou_head: float = 1.0
    """MSE between the IoU head's prediction and the mask's real IoU with the target."""
    bce: float = 0.0
    """Binary cross-entropy with logits."""
    mse: float = 0.0
    """MSE between sigmoid probabilities and the target: differentiable, unlike the tutorial's thresholded
    form (see ``trainer.losses``)."""
    ce: float = 0.0
    """Multi-class cross-entropy (semantic task)."""
    point_start: float = 1.0
    """Factor on the whole loss (every round) of an object whose first prompt is clicks rather than a box;
    below 1 the click starts weigh less in the step's mean than the box starts (instance task)."""
    point_refine: float = 1.0
    """A further factor on the corrective rounds' loss (every round after the first) of an object whose first
    prompt is clicks. Those rounds prompt with clicks only, on SAM's single-mask output 0, the output a box
    uses; 0 leaves output 0 to prompts with a box (instance task)."""
    focal_alpha: float = 0.25
    """Focal loss alpha."""
    focal_gamma: float = 2.0
    """Focal loss gamma."""
    backend: Literal["auto", "torch", "triton"] = "auto"
    """``kernels`` backend: ``auto`` (Triton on CUDA, torch reference elsewhere), ``torch``, ``triton``."""

    def __post_init__(self):
        check_choices(self)
        check_finite(self)
        weights = ("focal", "dice", "iou_head", "bce", "mse", "ce")
        check_at_least(self, 0, *weights, "point_start", "point_refine")
        if not any(getattr(self, w) for w in weights):
            raise ValueError(f"every loss weight is 0 (loss.{', loss.'.join(weights)}); set at least one > 0")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser, schedule, accumulation, clipping and precision."""

    optimizer: Literal["adamw", "adam"] = "adamw"
    """``adamw`` or ``adam`` (the classic tutorial's)."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW); L2 for Adam."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup: float = 0.05
    """Linear warm-up from 0 to ``lr`` over this fraction of ``run.steps`` (rounded, at least one step when
    > 0), so a short run leaves it as a long one does."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """``cosine`` decay to ``min_lr_ratio * lr`` over the steps after warm-up, or ``constant``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine)."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Per-module factors on the learning rate: a trained parameter whose dotted name starts with a key (a
    whole module path, e.g. ``mask_decoder.transformer``) learns at ``lr x factor``; the longest matching key
    wins, any other parameter takes 1. A key that names no trained parameter is an error."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    clip_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    """``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16`` or ``no``."""

    def __post_init__(self):
        # YAML gives a list; a frozen section stores the tuple it means (part of validation, not a change)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        check_choices(self)
        check_finite(self)
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"optim.lr must be finite and > 0, got {self.lr}")
        check_at_least(self, 1, "grad_accum")
        check_at_least(self, 0, "clip_norm")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"optim.warmup is a fraction of run.steps in [0, 1), got {self.warmup}")
        negative = {k: v for k, v in self.lr_scale.items() if v < 0}
        if negative:
            raise ValueError(f"optim.lr_scale factors must be >= 0, got {negative}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Length of the run, evaluation and checkpoint cadence."""

    seed: int = 0
    """Seeds the sample order and every prompt draw."""
    steps: int = 200
    """Optimiser steps in the whole run (the schedule spans these)."""
    stop_at: int = 0
    """Stop after this step as if interrupted (0: run to ``steps``); resume with ``--resume``."""
    eval_every: int = 100
    """Validate every this many steps (and at the end); 0 only at the end."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Step checkpoints kept besides ``best``."""
    log_every: int = 10
    """Tensorboard scalars every this many steps."""
    val_max_images: int = 0
    """Validate on at most this many validation images (0: all)."""
    overlays: int = 4
    """Validation images drawn to ``overlays/`` at the end."""

    def __post_init__(self):
        if self.seed < 0:  # numpy's generators take no negative seed
            raise ValueError(f"run.seed must be >= 0, got {self.seed}")
        if self.steps < 1 or self.stop_at < 0:
            raise ValueError("run.steps must be >= 1 and run.stop_at >= 0")
        check_at_least(self, 0, "eval_every", "save_every", "log_every", "keep_checkpoints")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything one training run needs besides the cache and the output folder.

    Every section is frozen: a validated config never changes. Where the cache fills a field in (the
    semantic task's ``num_classes``), the run makes a new config with ``dataclasses.replace``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model and what trains."""
    data: DataConfig = field(default_factory=DataConfig)
    """Reading and batching."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """The prompt mix."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation."""
    run: RunConfig = field(default_factory=RunConfig)
    """Length and cadence."""

    def __post_init__(self):
        from trainer.task import TASKS  # the tasks import this module, so their registry is read here

        TASKS[self.model.task].check(self)
        if self.data.hardest_of and self.model.task != "instance":
            raise ValueError(
                f"data.hardest_of picks prompted objects, the instance task's; model.task={self.model.task} "
                "trains on whole images: set data.hardest_of=0 (configs/default.yaml sets it; "
                "configs/ais.yaml and configs/semantic.yaml are recipes for those tasks)"
            )


_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "prompts": PromptConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
_SECTION_NAMES = {cls: name for name, cls in _SECTION_TYPES.items()}


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples become lists), as written to ``config.yaml``."""

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
        for name in _SECTION_TYPES
    }


def from_dict(d: dict[str, Any] | None) -> Config:
    """Build a validated ``Config`` from a nested dict; unknown sections or fields are errors."""
    d = d or {}
    unknown = set(d) - set(_SECTION_TYPES)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(_SECTION_TYPES)}")
    parts = {}
    for name, cls in _SECTION_TYPES.items():
        values = d.get(name) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - known
        if bad:
            raise ValueError(f"unknown field(s) {sorted(bad)} in section {name!r}; known: {sorted(known)}")
        hints = get_type_hints(cls)
        # YAML reads 1e-4 (no dot) as a string; a float field takes it as the number it means
        values = {k: _as_floats(v, hints[k]) for k, v in values.items()}
        for k, v in values.items():  # a wrong type is named here, not met later as a TypeError
            if not _matches(v, hints[k]):
                raise ValueError(f"{name}.{k}={v!r}: expected {_describe(hints[k])}")
        parts[name] = cls(**values)
    return Config(**parts)


def _matches(v, t) -> bool:
    """Whether a YAML value ``v`` is of the field type ``t`` (no coercion: ``run.steps=2.5`` is no int)."""
    origin = get_origin(t)
    if origin in (Union, types.UnionType):
        return any(_matches(v, a) for a in get_args(t))
    if origin is dict:
        key, value = get_args(t)
        return isinstance(v, dict) and all(_matches(k, key) and _matches(x, value) for k, x in v.items())
    if origin is tuple:
        args = get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
            return isinstance(v, list | tuple) and all(_matches(x, args[0]) for x in v)
        return isinstance(v, list | tuple) and len(v) == len(args) and all(map(_matches, v, args))
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, int | float) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str)
    # any other type is left to the section's __post_init__ (a Literal's choices: check_choices)
    return True


def _describe(t) -> str:
    origin = get_origin(t)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(t))
    if origin is dict:
        return f"a mapping from {_describe(get_args(t)[0])} to {_describe(get_args(t)[1])}"
    if origin is tuple and get_args(t)[-1] is Ellipsis:
        return f"a list of {_describe(get_args(t)[0])} values"
    if origin is tuple:
        return f"a list of {len(get_args(t))} values ({', '.join(_describe(a) for a in get_args(t))})"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(t, str(t))


def _as_floats(v, t):
    """``v`` with YAML's number strings taken as the floats they mean where the field type ``t`` wants a
    float: the value of a ``float`` field, the values of a ``dict[str, float]`` one."""
    if t is float:
        return _as_float(v)
    if get_origin(t) is dict and get_args(t)[1] is float and isinstance(v, dict):
        return {k: _as_float(x) for k, x in v.items()}
    return v


def _as_float(v):
    try:
        return float(v) if isinstance(v, str | int) and not isinstance(v, bool) else v
    except ValueError:
        return v


def _one_line(e: Exception) -> str:
    """A PyYAML error's message on one line (it spreads the problem and its position over several)."""
    return " ".join(str(e).split())


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings to a nested dict; values are parsed as YAML scalars."""
    d = {k: dict(v or {}) for k, v in d.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.field=value, e.g. optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_one_line(e)})") from None
        d.setdefault(section, {})[name] = value
    return d


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    under: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is ``None``) and apply overrides.

    ``under`` gives values for fields the file leaves out (``model_from_cache``: the cache's model), beneath
    the file's own values and the overrides.

    Raises ``ValueError`` naming the file for a folder, a file that is not UTF-8, bad YAML, a key written
    twice, or a section that is not a mapping.
    """
    d = {} if path is None else _read_yaml(Path(path))
    for section, values in (under or {}).items():
        d[section] = {**values, **(d.get(section) or {})}
    return from_dict(apply_overrides(d, list(overrides)))


def model_from_cache(cache) -> dict[str, dict[str, Any]]:
    """``{"model": {...}}``: the model a cache was built with, for a config that does not name one.

    ``model_type`` always; ``checkpoint`` and ``init_seed`` where the signature's checkpoint id says which
    weights they were (a random init's seed, or an official checkpoint's sha256); a checkpoint file of your
    own is not known by path, so it must be given (``model.checkpoint=PATH``).
    """
    from embedcache.weights import OFFICIAL

    model_type, ck = cache.signature["model_type"], cache.signature["checkpoint"]
    model: dict[str, Any] = {"model_type": model_type}
    if ck.startswith("random-init:"):
        model.update(checkpoint=None, init_seed=int(ck.split(":")[1]))
    official = [n for n, o in OFFICIAL.items() if o.sha256 == ck and o.model_type == model_type]
    if official:
        model["checkpoint"] = official[0]
    return {"model": model}


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key written twice (PyYAML keeps the last one silently)."""

    def construct_document(self, node):
        _refuse_duplicate_keys(node, ())
        return super().construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, where: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``section.key`` and both lines if a mapping in ``node`` repeats a key."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, where)
    if not isinstance(node, yaml.MappingNode):
        return
    seen = {}
    for key, value in node.value:
        name = str(key.value)
        if name in seen:
            what = f"section {name!r}" if not where else f"{'.'.join(where)}.{name}"
            raise ValueError(
                f"{what} is written twice (lines {seen[name] + 1} and {key.start_mark.line + 1}); keep one"
            )
        seen[name] = key.start_mark.line
        _refuse_duplicate_keys(value, (*where, name))


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file as a dict of sections (each a mapping or empty); ``ValueError`` naming the file."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; --config takes a YAML file such as {DEFAULT_CONFIG}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} on line {line}); save it as UTF-8"
        ) from None
    try:
        d = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.YAMLError as e:  # its message gives the line and column
        raise ValueError(f"{path}: not valid YAML ({_one_line(e)})") from None
    except ValueError as e:  # a key written twice
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a config is a mapping of sections, got {type(d).__name__}")
    for name, section in d.items():
        if section is not None and not isinstance(section, dict):
            raise ValueError(
                f"{path}: section {name!r} is {section!r}, not a mapping of fields "
                f"(write it as `{name}:` then indented `field: value` lines)"
            )
    return d


def save_config(cfg: Config, path: str | Path, *, header: str = "") -> None:
    """Write the resolved config as YAML, with an optional comment header."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    Path(path).write_text((f"# {header}\n" if header else "") + text, encoding="utf-8")
