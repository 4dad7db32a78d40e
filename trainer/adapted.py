"""A SAM with Conv-LoRA encoder adapters, exported as SAM's own state dict plus an adapter file, and loaded
back for prediction.

Conv-LoRA cannot be merged into the weights (its expert is chosen per input), so ``trainer export`` writes:

- ``OUT.pth``: the tuned SAM as a plain segment_anything state dict (the tail blocks' frozen ``qkv``, the
  tuned neck and decoder); it loads strictly with ``embedcache.build_sam`` and predicts without adapters;
- ``OUT.conv_lora.pth``: the adapters, ``{"format": 1, "adapters": {module path: {"rank", "alpha", "scales",
  "balance_coef", "state_dict"}}}``, each keyed by the path of the ``qkv`` it wraps
  (``image_encoder.blocks.11.attn.qkv``).

Predict with the adapters::

    from trainer.adapted import load_adapted_sam
    from trainer.predictor import Predictor

    sam = load_adapted_sam("lite_medsam", "tuned.pth")  # finds tuned.conv_lora.pth beside it
    predictor = Predictor(sam, "lite_medsam")  # set_image / predict as SamPredictor, any preset

(``segment_anything.SamPredictor(sam)`` works too for SAM's own 1024-input presets.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import Sam

from embedcache.models import build_sam
from trainer.conv_lora import ConvLoRALinear

FORMAT = 1


def conv_lora_sidecar(out: str | Path) -> Path:
    """The adapter file written beside the exported ``out`` (``x.pth`` -> ``x.conv_lora.pth``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.conv_lora.pth")


def detach_conv_lora(sam: Sam) -> dict:
    """Put each ``ConvLoRALinear`` of ``sam`` back to its frozen base ``nn.Linear`` and return the adapter
    file's content (module docstring); ``sam.state_dict()`` is then plain segment_anything keys."""
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


def load_adapted_sam(
    model_type: str, sam_path: str | Path, adapters: str | Path | None = None, *, seed: int = 0
) -> Sam:
    """The exported SAM with its Conv-LoRA adapters in place, in eval mode (for ``SamPredictor`` or samtune's
    own evaluation).

    Args:
        model_type: the preset (``vit_b``, ``lite_medsam``, ...).
        sam_path: the exported ``.pth`` (a plain SAM state dict).
        adapters: its adapter file; default ``conv_lora_sidecar(sam_path)``.
    """
    adapters = Path(adapters) if adapters is not None else conv_lora_sidecar(sam_path)
    if not adapters.is_file():
        raise FileNotFoundError(f"{adapters}: Conv-LoRA adapter file not found (written by trainer export)")
    content = torch.load(adapters, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"{adapters}: not a samtune Conv-LoRA adapter file (format {FORMAT})")
    sam = build_sam(model_type, sam_path, seed=seed)
    for path, spec in content["adapters"].items():
        parent, _, name = path.rpartition(".")
        try:
            owner = sam.get_submodule(parent)
            base = getattr(owner, name)
        except AttributeError as e:
            raise ValueError(f"{adapters}: adapter for {path!r}, which {model_type} does not have") from e
        layer = ConvLoRALinear(base, spec["rank"], spec["alpha"], tuple(spec["scales"]), spec["balance_coef"])
        missing, unexpected = layer.load_state_dict(spec["state_dict"], strict=False)
        if unexpected or any(not k.startswith("base.") for k in missing):
            raise ValueError(f"{adapters}: adapter {path!r} does not fit: {missing + unexpected}")
        setattr(owner, name, layer)
    return sam.eval()
