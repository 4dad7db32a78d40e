"""Building what trains from a SAM: freeze, add LoRA, add the semantic head, load and merge weights."""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import Sam

from embedcache.models import build_sam
from trainer.config import Config
from trainer.decoder import PromptedDecoder
from trainer.encoder_tail import EncoderTail, add_encoder_adapters
from trainer.lora import add_lora, merge_lora
from trainer.task import make_task


def start_checkpoint(cfg: Config) -> Path | None:
    """The local file of ``model.checkpoint`` (an official name is fetched by embedcache), or ``None``."""
    from embedcache.weights import resolve_checkpoint

    return resolve_checkpoint(cfg.model.checkpoint)


def build_start_sam(cfg: Config) -> Sam:
    """The SAM the run starts from: the config's checkpoint (a path, or an official name such as ``vit_b``,
    which embedcache fetches), or the seeded random init."""
    return build_sam(cfg.model.model_type, start_checkpoint(cfg), seed=cfg.model.init_seed)


def build_trainable(sam: Sam, cfg: Config) -> PromptedDecoder:
    """Wrap ``sam``'s prompt encoder and mask decoder (shared, not copied), ``requires_grad`` set per config.

    The image encoder stays frozen and out of the returned module, except its tail with
    ``model.encoder_tail_blocks``: those blocks (with ``model.encoder_adapter`` on their ``qkv``) and the
    neck. LoRA adapters (``model.lora_rank``) go on every attention projection of the decoder's two-way
    transformer; the task adds its head, if it has one. Loading trained weights into the result updates
    ``sam`` itself.
    """
    m = cfg.model
    sam.requires_grad_(False)
    sam.mask_decoder.requires_grad_(m.train_mask_decoder)
    sam.prompt_encoder.requires_grad_(m.train_prompt_encoder)
    tail = None
    # adapters start from a seeded draw: the same config builds the same starting model in any process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.init_seed)
        if m.lora_rank:
            add_lora(sam.mask_decoder.transformer, m.lora_rank, m.lora_alpha)  # trainable by default
        if m.encoder_tail_blocks:
            tail = EncoderTail(
                sam.image_encoder, m.encoder_tail_blocks, checkpoint_blocks=m.encoder_checkpoint
            )
            tail.neck.requires_grad_(True)
            add_encoder_adapters(
                list(tail.blocks),
                m.encoder_adapter,
                rank=m.encoder_rank,
                alpha=m.encoder_alpha,
                scales=m.conv_lora_scales,
                balance_coef=m.conv_lora_balance,
            )
    head = make_task(cfg).head(sam.mask_decoder)
    return PromptedDecoder(sam.prompt_encoder, sam.mask_decoder, head, tail)


def load_weights(model: PromptedDecoder, weights: str | Path) -> None:
    """Load a checkpoint's ``model.safetensors`` (the ``PromptedDecoder`` state dict) strictly."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(weights)), strict=True)


def tuned_sam(cfg: Config, weights: str | Path) -> tuple[Sam, PromptedDecoder]:
    """The starting SAM with a checkpoint's tuned parts loaded and LoRA (decoder and encoder) merged: ready to
    export or predict. Conv-LoRA adapters stay in place (they cannot be merged; ``trainer.adapted``)."""
    sam = build_start_sam(cfg)
    model = build_trainable(sam, cfg)
    load_weights(model, weights)
    merge_lora(sam)
    return sam.eval(), model.eval()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimiser updates."""
    return [p for p in model.parameters() if p.requires_grad]
