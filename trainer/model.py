"""Building what trains from a SAM: freeze, apply the config's variants, load weights and merge them."""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import Sam

from embedcache.models import build_sam
from trainer.config import Config
from trainer.decoder import PromptedDecoder
from trainer.variants import variants_for


def start_checkpoint(cfg: Config) -> Path | None:
    """The local file of ``model.checkpoint`` (an official name is fetched by embedcache), or ``None``."""
    from embedcache.weights import resolve_checkpoint

    return resolve_checkpoint(cfg.model.checkpoint)


def build_start_sam(cfg: Config) -> Sam:
    """The SAM the run starts from: the config's checkpoint (a path, or an official name such as ``vit_b``,
    which embedcache fetches), or the seeded random init."""
    return build_sam(cfg.model.model_type, start_checkpoint(cfg), seed=cfg.model.init_seed)


def build_trainable(sam: Sam, cfg: Config) -> PromptedDecoder:
    """Wrap ``sam``'s prompt encoder and mask decoder (shared, not copied), ``requires_grad`` set per config,
    and apply the config's variants (``trainer.variants.variants_for``: decoder LoRA, the encoder tail and
    its adapter, the task's head). Loading trained weights into the result updates ``sam`` itself.

    The image encoder stays frozen and out of the returned module, except the tail a variant puts in.
    """
    m = cfg.model
    sam.requires_grad_(False)
    sam.mask_decoder.requires_grad_(m.train_mask_decoder)
    sam.prompt_encoder.requires_grad_(m.train_prompt_encoder)
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder)
    # adapters start from a seeded draw: the same config builds the same starting model in any process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.init_seed)
        for variant in variants_for(m):
            variant.apply(sam, model)
    return model


def load_weights(model: PromptedDecoder, weights: str | Path) -> None:
    """Load a checkpoint's ``model.safetensors`` (the ``PromptedDecoder`` state dict) strictly."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(weights)), strict=True)


def tuned_sam(cfg: Config, weights: str | Path) -> tuple[Sam, PromptedDecoder]:
    """The starting SAM with a checkpoint's tuned parts loaded and each variant's ``merge`` done (LoRA,
    decoder and encoder, folded into the weights): ready to export or predict. What cannot merge stays in
    place (Conv-LoRA, the task's head)."""
    sam = build_start_sam(cfg)
    model = build_trainable(sam, cfg)
    load_weights(model, weights)
    for variant in variants_for(cfg.model):
        variant.merge(sam)
    return sam.eval(), model.eval()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimiser updates."""
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: torch.nn.Module, lr_scale: dict[str, float]) -> list[dict]:
    """The optimiser's parameter groups: the trained parameters grouped by their ``optim.lr_scale`` factor.

    A parameter takes the factor of the longest key that is a dotted prefix of its name (``"a.b"`` matches
    ``a.b.weight`` and ``a.b.c.bias``, not ``a.bc.weight``), else 1. Each group carries ``lr_scale``, which
    ``train_step`` multiplies into the scheduled rate. Raises ``ValueError`` for a key matching no trained
    parameter (a misspelt path would otherwise be a silent no-op).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    keys = sorted(lr_scale, key=len, reverse=True)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    used = set()
    for name, p in named:
        key = next((k for k in keys if name == k or name.startswith(k + ".")), None)
        used.add(key)
        groups.setdefault(1.0 if key is None else float(lr_scale[key]), []).append(p)
    unused = sorted(set(keys) - used)
    if unused:
        tops = sorted({".".join(n.split(".")[:2]) for n, _ in named})
        raise ValueError(f"optim.lr_scale: {unused} name no trained parameter; the trained modules: {tops}")
    return [{"params": ps, "lr_scale": f} for f, ps in sorted(groups.items())]
