"""Conv-LoRA on the encoder tail as a variant: trained with its routers' balance loss, exported as an adapter
file beside SAM's own state dict, and loaded back for prediction.

Conv-LoRA cannot be merged into the weights (its expert is chosen per input), so ``trainer export`` writes:

- ``OUT.pth``: the tuned SAM as a plain segment_anything state dict (the tail blocks' frozen ``qkv``, the
  tuned neck and decoder); it loads strictly with ``embedcache.build_sam`` and predicts without adapters;
- ``OUT.conv_lora.pth``: the adapters, ``{"format": 1, "adapters": {module path: {"rank", "alpha", "scales",
  "balance_coef", "state_dict"}}}``, each keyed by the path of the ``qkv`` it wraps
  (``image_encoder.blocks.11.attn.qkv``).

Predict with the adapters::

    import trainer
    from trainer.predictor import Predictor

    tuned = trainer.load_tuned("tuned.pth")  # finds tuned.conv_lora.pth beside it
    predictor = Predictor(tuned)  # set_image / predict as SamPredictor, any preset

(``segment_anything.SamPredictor(tuned.sam)`` works too for SAM's own 1024-input presets.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from segment_anything.modeling import Sam
from torch import nn

from trainer.conv_lora import ConvLoRALinear
from trainer.variant import Variant

if TYPE_CHECKING:
    from trainer.config import ModelConfig
    from trainer.decoder import PromptedDecoder

FORMAT = 1


class EncoderConvLoRA(Variant):
    """``model.encoder_adapter=conv_lora``: Conv-LoRA on the tail blocks' ``qkv``; its routers learn from
    their balance loss, their noise is seeded per micro-step, and it exports to the ``conv_lora`` sidecar."""

    sidecar = "conv_lora"

    def __init__(self, m: ModelConfig):
        self.rank, self.alpha = m.encoder_rank, m.encoder_alpha
        self.scales, self.balance_coef = m.conv_lora_scales, m.conv_lora_balance

    def wrap(self, blocks: list[nn.Module]) -> None:
        """Wrap each block's ``attn.qkv`` (zero update at init)."""
        for blk in blocks:
            blk.attn.qkv = ConvLoRALinear(blk.attn.qkv, self.rank, self.alpha, self.scales, self.balance_coef)

    def apply(self, sam: Sam, model: PromptedDecoder) -> None:
        self.wrap(list(model.encoder_tail.blocks))

    def before_micro_step(self, model: PromptedDecoder, g: torch.Generator) -> None:
        model.encoder_tail.noise_seed = g.initial_seed() + 1  # the routers' noise: per micro-step, like g

    def loss_terms(self, model: PromptedDecoder) -> dict[str, torch.Tensor]:
        # the routers learn only from their balance loss (trainer.conv_lora), whatever the task
        return {"conv_lora_balance": model.encoder_tail.balance_loss()}

    def export(self, sam: Sam, model: PromptedDecoder) -> dict:
        """Put each ``ConvLoRALinear`` of ``sam`` back to its frozen base ``nn.Linear`` and return the
        adapter file's content (module docstring)."""
        adapters = {}
        for path, m in list(sam.named_modules()):
            if isinstance(m, ConvLoRALinear):
                state = {k: v.detach().cpu() for k, v in m.state_dict().items() if not k.startswith("base.")}
                adapters[path] = {
                    "rank": m.lora_a.shape[0],
                    "alpha": m.scale * m.lora_a.shape[0],
                    "scales": list(m.scales),
                    "balance_coef": m.router.balance_coef,
                    "state_dict": state,
                }
                parent, _, name = path.rpartition(".")
                setattr(sam.get_submodule(parent), name, m.base)
        return {"format": FORMAT, "adapters": adapters}

    @classmethod
    def load(cls, sam: Sam, model: PromptedDecoder, content: dict, where: Path) -> None:
        if not isinstance(content, dict) or content.get("format") != FORMAT:
            raise ValueError(f"{where}: not a samtune Conv-LoRA adapter file (format {FORMAT})")
        for path, spec in content["adapters"].items():
            parent, _, name = path.rpartition(".")
            try:
                owner = sam.get_submodule(parent)
                base = getattr(owner, name)
            except AttributeError as e:
                raise ValueError(f"{where}: adapter for {path!r}, which this model does not have") from e
            layer = ConvLoRALinear(
                base, spec["rank"], spec["alpha"], tuple(spec["scales"]), spec["balance_coef"]
            )
            missing, unexpected = layer.load_state_dict(spec["state_dict"], strict=False)
            if unexpected or any(not k.startswith("base.") for k in missing):
                raise ValueError(f"{where}: adapter {path!r} does not fit: {missing + unexpected}")
            setattr(owner, name, layer.to(base.weight.device))


def load_adapted_sam(model_type: str, sam_path: str | Path) -> Sam:
    """The exported SAM with its Conv-LoRA adapters in place, in eval mode: ``trainer.load_tuned``'s
    ``sam``. ``model_type`` must be the export's preset."""
    from trainer.tuned import load_tuned

    return load_tuned(sam_path, model_type=model_type).sam
