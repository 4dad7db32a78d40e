"""segment_anything ``Sam`` state dict <-> HF transformers ``SamModel`` state dict, both ways, and an HF
``save_pretrained`` folder read as a SAM checkpoint (``--checkpoint hf:FOLDER``).

The two models hold the same tensors under different names; no tensor is reshaped or transposed. One table,
``RULES``, names each tensor on both sides, so the two directions cannot drift apart. HF keeps the random
Fourier matrix of the prompt positions twice (``SamModel.shared_image_embedding`` is also
``prompt_encoder.shared_embedding``); SAM keeps it once. Reading an HF folder needs only ``safetensors`` (a
base dependency); writing one needs ``transformers`` (``trainer.export_hf``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

# Each placeholder matches one part of a dotted key, the same on both sides.
_PARTS = {
    "i": r"\d+",
    "j": r"[1-4]",
    "p": r"weight|bias",
    "proj": r"[qkv]_proj|out_proj",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    "vitattn": r"rel_pos_h|rel_pos_w|qkv\.weight|qkv\.bias|proj\.weight|proj\.bias",
    "lin": r"lin1|lin2",
    "head": r"output_hypernetworks_mlps\.\d+|iou_prediction_head",
}
_ENC, _HF_ENC = "image_encoder", "vision_encoder"
_DEC = "mask_decoder"
_TR = "mask_decoder.transformer"
_PE, _HF_PE = (
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "shared_image_embedding.positional_embedding",
)
RULES: tuple[tuple[str, str], ...] = (
    # (segment_anything key, HF SamModel key); the first rule whose side matches a key names it
    (f"{_ENC}.pos_embed", f"{_HF_ENC}.pos_embed"),
    (f"{_ENC}.patch_embed.proj.{{p}}", f"{_HF_ENC}.patch_embed.projection.{{p}}"),
    (f"{_ENC}.blocks.{{i}}.norm{{j}}.{{p}}", f"{_HF_ENC}.layers.{{i}}.layer_norm{{j}}.{{p}}"),
    (f"{_ENC}.blocks.{{i}}.attn.{{vitattn}}", f"{_HF_ENC}.layers.{{i}}.attn.{{vitattn}}"),
    (f"{_ENC}.blocks.{{i}}.mlp.{{lin}}.{{p}}", f"{_HF_ENC}.layers.{{i}}.mlp.{{lin}}.{{p}}"),
    # the neck: Conv 1x1, LayerNorm2d, Conv 3x3, LayerNorm2d (nn.Sequential indices 0-3)
    (f"{_ENC}.neck.0.weight", f"{_HF_ENC}.neck.conv1.weight"),
    (f"{_ENC}.neck.1.{{p}}", f"{_HF_ENC}.neck.layer_norm1.{{p}}"),
    (f"{_ENC}.neck.2.weight", f"{_HF_ENC}.neck.conv2.weight"),
    (f"{_ENC}.neck.3.{{p}}", f"{_HF_ENC}.neck.layer_norm2.{{p}}"),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.{i}.weight", "prompt_encoder.point_embed.{i}.weight"),
    ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    # mask_downscaling: Conv, LayerNorm2d, GELU, Conv, LayerNorm2d, GELU, Conv (indices 0-6)
    ("prompt_encoder.mask_downscaling.0.{p}", "prompt_encoder.mask_embed.conv1.{p}"),
    ("prompt_encoder.mask_downscaling.1.{p}", "prompt_encoder.mask_embed.layer_norm1.{p}"),
    ("prompt_encoder.mask_downscaling.3.{p}", "prompt_encoder.mask_embed.conv2.{p}"),
    ("prompt_encoder.mask_downscaling.4.{p}", "prompt_encoder.mask_embed.layer_norm2.{p}"),
    ("prompt_encoder.mask_downscaling.6.{p}", "prompt_encoder.mask_embed.conv3.{p}"),
    (f"{_TR}.layers.{{i}}.{{attn}}.{{proj}}.{{p}}", f"{_TR}.layers.{{i}}.{{attn}}.{{proj}}.{{p}}"),
    (f"{_TR}.layers.{{i}}.norm{{j}}.{{p}}", f"{_TR}.layers.{{i}}.layer_norm{{j}}.{{p}}"),
    (f"{_TR}.layers.{{i}}.mlp.{{lin}}.{{p}}", f"{_TR}.layers.{{i}}.mlp.{{lin}}.{{p}}"),
    (f"{_TR}.final_attn_token_to_image.{{proj}}.{{p}}", f"{_TR}.final_attn_token_to_image.{{proj}}.{{p}}"),
    (f"{_TR}.norm_final_attn.{{p}}", f"{_TR}.layer_norm_final_attn.{{p}}"),
    (f"{_DEC}.iou_token.weight", f"{_DEC}.iou_token.weight"),
    (f"{_DEC}.mask_tokens.weight", f"{_DEC}.mask_tokens.weight"),
    # output_upscaling: ConvTranspose, LayerNorm2d, GELU, ConvTranspose (indices 0-3)
    (f"{_DEC}.output_upscaling.0.{{p}}", f"{_DEC}.upscale_conv1.{{p}}"),
    (f"{_DEC}.output_upscaling.1.{{p}}", f"{_DEC}.upscale_layer_norm.{{p}}"),
    (f"{_DEC}.output_upscaling.3.{{p}}", f"{_DEC}.upscale_conv2.{{p}}"),
    # SAM's 3-layer MLPs (every preset: hypernetworks and iou_head_depth=3) as HF's proj_in, layers, proj_out
    (f"{_DEC}.{{head}}.layers.0.{{p}}", f"{_DEC}.{{head}}.proj_in.{{p}}"),
    (f"{_DEC}.{{head}}.layers.1.{{p}}", f"{_DEC}.{{head}}.layers.0.{{p}}"),
    (f"{_DEC}.{{head}}.layers.2.{{p}}", f"{_DEC}.{{head}}.proj_out.{{p}}"),
)
HF_TIED = {
    "prompt_encoder.shared_embedding.positional_embedding": "shared_image_embedding.positional_embedding"
}
"""HF keys that hold the same tensor as another HF key (``SamModel`` shares the module)."""


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, part in _PARTS.items():
        pattern = pattern.replace(re.escape(f"{{{name}}}"), f"(?P<{name}>{part})")
    return re.compile(pattern)


_SAM_TO_HF = [(_compile(s), h) for s, h in RULES]
_HF_TO_SAM = [(_compile(h), s) for s, h in RULES]


class KeyMapError(ValueError):
    """A state dict key that the map does not name, or an HF folder that cannot be read."""


def _rename(key: str, rules: list[tuple[re.Pattern, str]], side: str) -> str:
    for pattern, template in rules:
        if m := pattern.fullmatch(key):
            return template.format(**m.groupdict())
    raise KeyMapError(f"{key!r} is not a {side} key that embedcache.hf_keys maps")


def sam_key_to_hf(key: str) -> str:
    """The HF ``SamModel`` name of a segment_anything ``Sam`` state dict key."""
    return _rename(key, _SAM_TO_HF, "segment_anything Sam")


def hf_key_to_sam(key: str) -> str:
    """The segment_anything ``Sam`` name of an HF ``SamModel`` state dict key (tied keys excepted)."""
    return _rename(key, _HF_TO_SAM, "HF SamModel")


def sam_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``Sam`` state dict renamed for ``SamModel.load_state_dict`` (tied keys included)."""
    out = {sam_key_to_hf(k): v for k, v in state.items()}
    for tied, source in HF_TIED.items():
        if source in out:
            out[tied] = out[source]
    return out


def hf_to_sam(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF ``SamModel`` state dict renamed for ``Sam.load_state_dict``; a tied copy must equal its
    source."""
    for tied, source in HF_TIED.items():
        if tied in state and source in state and not torch.equal(state[tied], state[source]):
            raise KeyMapError(f"{tied} differs from {source}, which SamModel ties it to")
    return {hf_key_to_sam(k): v for k, v in state.items() if k not in HF_TIED}


def read_hf_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an HF ``save_pretrained`` folder: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` lists."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    raise KeyMapError(
        f"{folder}: no model.safetensors or model.safetensors.index.json; an HF SamModel folder is what "
        "SamModel.save_pretrained writes (or `trainer export RUN --format hf`)"
    )


def hf_folder_checkpoint(folder: str | Path, cache_dir: Path) -> Path:
    """A SAM state dict file converted from the HF folder ``folder``, for ``build_sam`` (``hf:FOLDER``).

    The file is ``cache_dir/hf/<sha256 of the folder's weights>/sam.pth``: the same folder always gives the
    same bytes (so the same cache signature), and a converted folder is not converted again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: HF SamModel folder not found (hf:FOLDER names a folder)")
    state = read_hf_state_dict(folder)
    if not any(k.startswith(_HF_ENC) for k in state):
        raise KeyMapError(f"{folder}: has no {_HF_ENC}.* weights, so it is not an HF SamModel folder")
    try:
        sam_state = hf_to_sam(state)
    except KeyMapError as e:
        raise KeyMapError(f"{folder}: {e}") from None
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().view(torch.uint8).numpy().tobytes())
    dest = cache_dir / "hf" / h.hexdigest()[:32] / "sam.pth"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{os.getpid()}-sam.pth")
        # a file object, not a path: torch.save names the archive inside after a path, and the bytes must
        # not depend on the temp file's name
        with open(tmp, "wb") as f:
            torch.save({k: sam_state[k].contiguous() for k in sorted(sam_state)}, f)
        os.replace(tmp, dest)
    return dest
