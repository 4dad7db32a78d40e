"""``trainer export``: a full SAM state dict (frozen encoder + tuned prompt encoder/decoder, LoRA merged).

The file loads strictly with ``embedcache.build_sam(type, path)`` and, for the official types, with
``segment_anything.sam_model_registry[type](checkpoint=path)``. With an encoder tail, the tuned neck is in
it and encoder LoRA is merged into the tail blocks' ``qkv``; Conv-LoRA adapters go to the
``.conv_lora.pth`` sidecar (``trainer.adapted.load_adapted_sam`` loads both). In semantic mode the class head
goes to the ``.semantic.pth`` sidecar (see ``trainer.semantic``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.adapted import conv_lora_sidecar, detach_conv_lora
from trainer.checkpoint import resolve_weights
from trainer.config import load_config
from trainer.model import tuned_sam
from trainer.semantic import semantic_sidecar


def export(run: str | Path, out: str | Path, *, which: str = "best") -> list[Path]:
    """Write the tuned SAM of run folder ``run`` to ``out`` (atomically); returns the files written.

    Args:
        run: a ``trainer run`` output folder.
        out: the ``.pth`` to write.
        which: ``best`` (falls back to the latest checkpoint), ``last``, a step number or a checkpoint folder.
    """
    run, out = Path(run), Path(out)
    weights = resolve_weights(run, which)
    cfg = load_config(weights.parent / "config.yaml")
    sam, model = tuned_sam(cfg, weights)
    adapters = detach_conv_lora(sam)  # Conv-LoRA cannot merge: it goes to its own file, SAM keeps its keys
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if adapters["adapters"]:
        side = conv_lora_sidecar(out)
        torch.save(adapters, side.with_name(f".tmp-{side.name}"))
        os.replace(side.with_name(f".tmp-{side.name}"), side)
        written.append(side)
    tmp = out.with_name(f".tmp-{out.name}")
    torch.save(sam.state_dict(), tmp)
    os.replace(tmp, out)
    written.insert(0, out)
    if model.semantic_head is not None:
        head = model.semantic_head
        side = semantic_sidecar(out)
        torch.save(
            {"num_classes": head.num_classes, "prompt": head.prompt, "state_dict": head.state_dict()},
            side,
        )
        written.append(side)
    return written
