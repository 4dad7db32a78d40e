"""The variant registry: which variants a config builds, in which order, and which loads each sidecar.

The one place (with ``trainer.task.TASKS``) where a variant's config value is matched to its class; the
session, the export, eval and the Predictor go through ``variants_for`` and ``SIDECARS``
(``tests/test_source_layout.py`` refuses variant or task name comparisons elsewhere).
"""

from __future__ import annotations

from torch import nn

from trainer.adapted import EncoderConvLoRA
from trainer.config import ModelConfig
from trainer.encoder_tail import EncoderLoRA, EncoderTailVariant
from trainer.lora import DecoderLoRA
from trainer.task import TASKS
from trainer.variant import Variant

ENCODER_ADAPTERS: dict[str, type[EncoderLoRA] | type[EncoderConvLoRA] | None] = {
    "none": None,
    "lora": EncoderLoRA,
    "conv_lora": EncoderConvLoRA,
}
"""``model.encoder_adapter`` -> its variant; the choices of ``ModelConfig.encoder_adapter`` are these keys."""


def variants_for(m: ModelConfig) -> list[Variant]:
    """The variants model config ``m`` builds, in the order they apply: decoder LoRA, the encoder tail, its
    adapter, the task's head. The order is part of the numbers: the adapters draw their initial weights one
    after the other from one seeded generator."""
    found: list[Variant] = []
    if m.lora_rank:
        found.append(DecoderLoRA(m))
    if m.encoder_tail_blocks:
        found.append(EncoderTailVariant(m))
        adapter = ENCODER_ADAPTERS[m.encoder_adapter]
        if adapter is not None:
            found.append(adapter(m))
    head = TASKS[m.task].head
    if head is not None:
        found.append(head(m))
    return found


SIDECARS: dict[str, type[Variant]] = {
    cls.sidecar: cls
    for cls in (
        DecoderLoRA,
        EncoderTailVariant,
        *ENCODER_ADAPTERS.values(),
        *(t.head for t in TASKS.values()),
    )
    if cls is not None and cls.sidecar is not None
}
"""An export's sidecar name -> the variant that loads it (``trainer.load_tuned``)."""


def add_encoder_adapters(blocks: list[nn.Module], m: ModelConfig) -> int:
    """Wrap each of ``blocks``' ``attn.qkv`` in ``m.encoder_adapter`` (zero update at init), as the encoder
    tail variant's adapter does; returns how many were wrapped."""
    adapter = ENCODER_ADAPTERS[m.encoder_adapter]
    if adapter is None:
        return 0
    adapter(m).wrap(blocks)
    return len(blocks)
