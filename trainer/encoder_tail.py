"""The trainable end of the image encoder, run on a partial cache's tap tokens once per image per step.

A partial cache (``embedcache build --tail-blocks k``) holds the tokens entering the encoder's last ``k``
blocks. ``EncoderTail`` runs those blocks and the neck on them, so the frozen prefix (most of the encoder)
never runs in training. Adapters go on the tail blocks' attention ``qkv`` projection, as in SAMed and
Conv-LoRA: ``lora`` (``trainer.lora.LoRALinear``, merged into plain SAM weights on export) or ``conv_lora``
(``trainer.conv_lora.ConvLoRALinear``, exported beside the SAM state dict, ``trainer.adapted``). The base
weights of the blocks stay frozen; the adapters and the neck train.

The tail modules are shared with the SAM they come from, so loading trained weights into the tail updates
that SAM, as ``build_trainable`` does for the decoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from embedcache.tap import run_tail, split_tail
from trainer.conv_lora import ConvLoRALinear
from trainer.lora import LoRALinear, merge_lora
from trainer.variant import Variant

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from trainer.config import ModelConfig
    from trainer.decoder import PromptedDecoder

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""torch's public batch-norm classes (their common base ``_BatchNorm`` is private)."""


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # recompute the block in backward: a tail keeps one block's input per block instead of every activation
    # (vit_b's global-attention block alone holds a (12, 4096, 4096) attention map per image)
    return checkpoint(block, x, use_reentrant=False)


def _plain(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


class EncoderTail(nn.Module):
    """The encoder's last ``k`` blocks (with whatever adapters they carry) and its neck.

    ``forward``: ``(B, 64, 64, C)`` tap tokens (float16 from the cache, or float32) ->
    ``(B, 256, 64, 64)`` float32 image embeddings, the same tensor the cache stores for the frozen model.
    """

    def __init__(self, encoder: nn.Module, k: int, *, checkpoint_blocks: bool = True):
        super().__init__()
        tail = split_tail(encoder, k)
        self.blocks = nn.ModuleList(tail.blocks)
        self.neck = tail.neck
        self.sequence = tail.sequence
        self.checkpoint_blocks = checkpoint_blocks
        self.noise_seed: int | None = None
        """Seed of Conv-LoRA's router noise in the next training ``forward`` (set per micro-step by the
        session), so that a step's draws are a pure function of the step and resume is exact. Torch's
        global generator carries them, because checkpointing replays its state when it recomputes a block."""

    def train(self, mode: bool = True) -> EncoderTail:
        """Train mode everywhere except batch norm (TinyViT's convolutions), which keeps its pretrained
        statistics: a step's few images would otherwise replace them (measured: 0.58 relative error of
        LiteMedSAM's embeddings at zero-init adapters)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, BATCH_NORMS):
                m.eval()
        return self

    def forward(self, tap: torch.Tensor) -> torch.Tensor:
        grad = self.training and torch.is_grad_enabled() and self.checkpoint_blocks
        if not (self.training and self.noise_seed is not None):
            return run_tail(self, tap.float(), _checkpointed if grad else _plain)
        with torch.random.fork_rng(devices=[tap.device] if tap.is_cuda else []):
            torch.manual_seed(self.noise_seed)
            return run_tail(self, tap.float(), _checkpointed if grad else _plain)

    def balance_loss(self) -> torch.Tensor:
        """The Conv-LoRA routers' load-balancing loss of the latest ``forward`` (0 without Conv-LoRA)."""
        losses = [m.balance_loss for m in self.modules() if isinstance(m, ConvLoRALinear)]
        losses = [x for x in losses if x is not None]
        return torch.stack(losses).sum() if losses else self.neck[0].weight.new_zeros(())


class EncoderTailVariant(Variant):
    """``model.encoder_tail_blocks`` k > 0: the encoder's last k blocks and its neck train, run on a partial
    cache's tap tokens (``PromptedDecoder.encoder_tail``). The tail's modules are ``sam``'s own, so the
    export is in SAM's state dict; the adapters on its blocks are variants of their own."""

    def __init__(self, m: ModelConfig):
        self.k, self.checkpoint_blocks = m.encoder_tail_blocks, m.encoder_checkpoint

    def apply(self, sam: Sam, model: PromptedDecoder) -> None:
        tail = EncoderTail(sam.image_encoder, self.k, checkpoint_blocks=self.checkpoint_blocks)
        tail.neck.requires_grad_(True)
        model.encoder_tail = tail


class EncoderLoRA(Variant):
    """``model.encoder_adapter=lora``: LoRA on the tail blocks' ``qkv``, merged into SAM's weights."""

    def __init__(self, m: ModelConfig):
        self.rank, self.alpha = m.encoder_rank, m.encoder_alpha

    def wrap(self, blocks: list[nn.Module]) -> None:
        """Wrap each block's ``attn.qkv`` (zero update at init)."""
        for blk in blocks:
            blk.attn.qkv = LoRALinear(blk.attn.qkv, self.rank, self.alpha)

    def apply(self, sam: Sam, model: PromptedDecoder) -> None:
        self.wrap(list(model.encoder_tail.blocks))

    def merge(self, sam: Sam) -> None:
        merge_lora(sam.image_encoder)
