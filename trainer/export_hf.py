"""``trainer export RUN --format hf``: the tuned SAM as an HF transformers ``save_pretrained`` folder.

``transformers.SamModel.from_pretrained(FOLDER)`` loads it and gives the masks of the SAM state dict
``trainer export`` writes, for the same image embeddings and prompts (tests/test_interop_hf.py). The names
come from ``embedcache.hf_keys``; the architecture (``SamConfig``) is read off the state dict itself, so any
ViT preset exports. The way back is ``--checkpoint hf:FOLDER`` (``embedcache.weights.resolve_checkpoint``).

Only a model that *is* a plain SAM fits ``SamModel``: LoRA is merged by the SAM export this starts from, and a
run whose SAM export needs a sidecar (Conv-LoRA adapters, a task head) is refused. TinyViT presets
(``lite_medsam``, ``mobile_sam``) are refused too: ``SamModel`` has SAM's ViT encoder only. Needs the ``hf``
extra (``pip install samtune[hf]``).
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

import torch

from embedcache.hf_keys import sam_to_hf
from trainer.export import ExportError, export

PATCH = 16  # SAM's ViT patch side, in input pixels


def export_hf(run: str | Path, out: str | Path, *, which: str = "best") -> list[Path]:
    """Write the tuned model of run folder ``run`` as the HF folder ``out``; returns ``[out]``.

    The folder is written beside ``out`` under a temporary name and renamed, so ``out`` is whole or absent.
    """
    out = Path(out)
    if out.exists():
        raise ExportError(
            f"--out {out} exists; name a new folder for the HF model (save_pretrained writes it)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=out.parent) as tmp:
        state = sam_export_state(run, Path(tmp), which=which, fmt="hf")
        save_hf(state, Path(tmp) / "model")
        (Path(tmp) / "model").rename(out)
    return [out]


def sam_export_state(run: str | Path, tmp: Path, *, which: str, fmt: str) -> dict[str, torch.Tensor]:
    """The state dict ``trainer export --format sam`` writes for ``run``, written into ``tmp`` and read back.

    Raises ``ExportError`` when that export needs a sidecar: the format ``fmt`` holds SAM's own weights only.
    """
    pth, *others = export(run, tmp / "sam.pth", which=which)
    # weights beside SAM's own (a .json manifest of the export is not)
    sidecars = [p for p in others if p.suffix == ".pth"]
    if sidecars:
        kinds = ", ".join(p.name.removeprefix("sam.") for p in sidecars)
        raise ExportError(
            f"{run}: this model has parts outside SAM's own weights ({kinds}: Conv-LoRA adapters or a task "
            f"head), which a {fmt} export cannot hold; export it with --format sam (the .pth and its "
            "sidecars)"
        )
    return torch.load(pth, map_location="cpu", weights_only=True)


def hf_config(state: dict[str, torch.Tensor]):
    """The ``transformers.SamConfig`` of a ViT SAM state dict, read off its tensor shapes.

    ``pos_embed`` ``(1, G, G, C)`` gives the width and the input side (16 G); each block's ``rel_pos_h``
    ``(2 S - 1, C / heads)`` gives the head count and whether it attends globally (S = G) or in windows.
    """
    SamConfig = require_extra("transformers", "hf").SamConfig  # noqa: N806 (a class)
    if "image_encoder.pos_embed" not in state:
        raise ExportError(
            "the model's image encoder is not SAM's ViT (a TinyViT preset such as lite_medsam or "
            "mobile_sam): HF SamModel has no such encoder; export it with --format sam or --format onnx"
        )
    _, grid, _, width = state["image_encoder.pos_embed"].shape
    rel_pos = [v for k, v in sorted(state.items(), key=_block_order) if k.endswith(".attn.rel_pos_h")]
    return SamConfig(
        vision_config={
            "hidden_size": width,
            "num_hidden_layers": len(rel_pos),
            "num_attention_heads": width // rel_pos[0].shape[1],
            "global_attn_indexes": [i for i, r in enumerate(rel_pos) if r.shape[0] == 2 * grid - 1],
            "mlp_dim": state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
            "image_size": grid * PATCH,
            "patch_size": PATCH,
            "output_channels": state["image_encoder.neck.0.weight"].shape[0],
        },
        prompt_encoder_config={"image_size": grid * PATCH, "image_embedding_size": grid, "patch_size": PATCH},
    )


def save_hf(state: dict[str, torch.Tensor], folder: Path) -> None:
    """``SamModel.save_pretrained(folder)`` of a ViT SAM state dict (strict: every key on both sides)."""
    SamModel = require_extra("transformers", "hf").SamModel  # noqa: N806 (a class)
    config = hf_config(state)
    with torch.device("meta"):  # no random init of weights that are all replaced next
        model = SamModel(config)
    model.load_state_dict(sam_to_hf(state), strict=True, assign=True)
    model.eval().save_pretrained(folder)


def require_extra(module: str, extra: str):
    """``import module``, or ``ExportError`` naming the optional extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(
            f"--format {extra} needs {module}, which is not installed: pip install 'samtune[{extra}]'"
        ) from e


def _block_order(item: tuple[str, torch.Tensor]) -> tuple[int, str]:
    """Sort key putting ``image_encoder.blocks.N.*`` in block order (10 after 9)."""
    parts = item[0].split(".")
    return (int(parts[2]) if parts[1] == "blocks" else -1, item[0])
