"""LoRA adapters on the mask decoder's attention projections (and, through ``trainer.encoder_tail``, on the
image encoder's tail blocks), merged back into plain ``nn.Linear`` on export.

A small module of our own rather than peft. What we need is (1) an adapter that wraps any ``nn.Linear``
in place (the decoder's 28 projections today; the image encoder's fused ``qkv`` next), (2) an exact merge
back into ``nn.Linear``, so that the exported state dict has segment_anything's keys and nothing else
(``tests/test_trainer_run.py`` loads it strictly), and (3) nothing more. During training both this module
and peft add keys (here ``q_proj.base.weight``, ``q_proj.lora_a``; peft ``qkv.base_layer.weight``,
``qkv.lora_A.default.weight``, seen with peft 0.21), and both merge them away. peft would add a
dependency on transformers (``import peft`` imports it: 6.3-6.8 s after torch on the 2-core build machine)
for 40 lines, and Conv-LoRA is not in peft, so it needs a module of its own either way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from segment_anything.modeling.transformer import Attention
from torch import nn

from trainer.variant import Variant

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from trainer.config import ModelConfig
    from trainer.decoder import PromptedDecoder

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x @ A.T @ B.T``. B starts at zero: the wrapped layer starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` -> ``(..., out_features)``."""
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device)


def add_lora(module: nn.Module, rank: int, alpha: float) -> int:
    """Wrap every attention projection under ``module`` in ``LoRALinear``; returns how many were wrapped."""
    n = 0
    for attn in [m for m in module.modules() if isinstance(m, Attention)]:
        for name in PROJECTIONS:
            setattr(attn, name, LoRALinear(getattr(attn, name), rank, alpha))
            n += 1
    return n


def merge_lora(module: nn.Module) -> int:
    """Replace every ``LoRALinear`` under ``module`` (decoder projections, encoder ``qkv``) by its merged
    ``nn.Linear``; returns how many."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                n += 1
    return n


class DecoderLoRA(Variant):
    """``model.lora_rank`` > 0: LoRA on every attention projection of the decoder's two-way transformer,
    merged into plain ``nn.Linear`` weights for prediction and export (no sidecar)."""

    def __init__(self, m: ModelConfig):
        self.rank, self.alpha = m.lora_rank, m.lora_alpha

    def apply(self, sam: Sam, model: PromptedDecoder) -> None:
        add_lora(sam.mask_decoder.transformer, self.rank, self.alpha)  # trainable by default

    def merge(self, sam: Sam) -> None:
        merge_lora(sam.mask_decoder)
