"""The tap point of a partial cache: where the image encoder splits into a frozen prefix and a trainable tail.

A partial cache (``embedcache build --tail-blocks k``) stores, besides each image's embedding, the
``(64, 64, C)`` tokens that enter the encoder's last ``k`` blocks:

- ViT (SAM, MedSAM): the tokens entering ``blocks[depth - k]``; the tail is ``blocks[depth - k:]`` and the
  neck.
- TinyViT (LiteMedSAM, MobileSAM): the tokens entering block ``n - k`` of the last stage ``layers[-1]`` (of
  depth ``n``); ``k = n`` is the input of the last stage. The earlier stages run at other resolutions and end
  in patch merging, so ``k`` stops at ``n``.

Training then runs only the tail, once per image per step (``trainer.encoder_tail``). The split runs the very
modules and operations of the encoder's own ``forward``, in its order, so ``encode_with_tap`` returns the same
embeddings as ``encoder(x)`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

TAP_DTYPE = "float16"


def _is_tiny_vit(encoder: nn.Module) -> bool:
    return hasattr(encoder, "layers") and not hasattr(encoder, "blocks")


def tail_candidates(encoder: nn.Module) -> nn.ModuleList:
    """The blocks a tail of ``k`` takes its last ``k`` from: a ViT's ``blocks``, a TinyViT's last stage."""
    return encoder.layers[-1].blocks if _is_tiny_vit(encoder) else encoder.blocks


def tail_block_modules(encoder: nn.Module, k: int) -> list[nn.Module]:
    """The last ``k`` blocks, in order; ``ValueError`` when the encoder has fewer."""
    blocks = tail_candidates(encoder)
    if not 1 <= k <= len(blocks):
        where = "its last stage" if _is_tiny_vit(encoder) else "it"
        raise ValueError(f"tail_blocks={k}: {type(encoder).__name__} has {len(blocks)} blocks in {where}")
    return list(blocks[len(blocks) - k :])


def tap_description(encoder: nn.Module, k: int) -> dict:
    """What the cache signature records about the tap: the block count, the module the tokens enter, their
    shape and dtype."""
    blocks = tail_candidates(encoder)
    tail_block_modules(encoder, k)  # validates k
    first = len(blocks) - k
    if _is_tiny_vit(encoder):
        point = f"layers.{len(encoder.layers) - 1}.blocks.{first}"
        side_h, side_w = encoder.layers[-1].input_resolution
        channels = encoder.layers[-1].dim
    else:
        point = f"blocks.{first}"
        side_h, side_w = encoder.pos_embed.shape[1:3]
        channels = encoder.pos_embed.shape[3]
    shape = [int(side_h), int(side_w), int(channels)]
    return {"blocks": k, "enters": point, "shape": shape, "dtype": TAP_DTYPE}


def prefix_forward(encoder: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The frozen prefix: ``(B, 3, S, S)`` model input -> ``(B, 64, 64, C)`` tokens entering the tail."""
    first = len(tail_candidates(encoder)) - k
    if _is_tiny_vit(encoder):
        x = encoder.patch_embed(x)
        for layer in encoder.layers[:-1]:
            x = layer(x)
        for blk in encoder.layers[-1].blocks[:first]:
            x = blk(x)
        h, w = encoder.layers[-1].input_resolution
        return x.view(x.shape[0], h, w, x.shape[-1])
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for blk in encoder.blocks[:first]:
        x = blk(x)
    return x


@dataclass(frozen=True)
class Tail:
    """The modules a tail runs, shared with (not copied from) the encoder."""

    blocks: list[nn.Module]
    """The last ``k`` blocks, in order."""
    neck: nn.Module
    """The encoder's neck: ``(B, C, 64, 64)`` -> ``(B, 256, 64, 64)``."""
    sequence: bool
    """True when the blocks take ``(B, h * w, C)`` token sequences (TinyViT), False for ``(B, h, w, C)``."""


def split_tail(encoder: nn.Module, k: int) -> Tail:
    """The tail of ``k`` blocks of ``encoder`` (``ValueError`` when it has fewer)."""
    return Tail(blocks=tail_block_modules(encoder, k), neck=encoder.neck, sequence=_is_tiny_vit(encoder))


def _plain(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


def run_tail(
    tail: Tail,
    tap: torch.Tensor,
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _plain,
) -> torch.Tensor:
    """The tail: ``(B, 64, 64, C)`` tap tokens -> ``(B, 256, 64, 64)`` image embeddings.

    ``tail`` is a ``Tail`` or anything with the same three attributes (``trainer.encoder_tail``);
    ``run_block(block, x)`` runs one block (the trainer passes activation checkpointing here).
    """
    b, h, w, c = tap.shape
    x = tap.reshape(b, h * w, c) if tail.sequence else tap
    for blk in tail.blocks:
        x = run_block(blk, x)
    return tail.neck(x.reshape(b, h, w, c).permute(0, 3, 1, 2))


def encode_with_tap(encoder: nn.Module, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder(x)`` and the tap tokens on the way: ``(B, 256, 64, 64)`` and ``(B, 64, 64, C)``."""
    tap = prefix_forward(encoder, x, k)
    return run_tail(split_tail(encoder, k), tap), tap
