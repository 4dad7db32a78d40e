"""The SAM model registry: the official ViT-B/L/H configurations and a small random-init ``vit_tiny``.

Every preset builds a ``segment_anything.modeling.Sam`` from segment_anything's own modules, so a state dict
written by samtune loads into ``segment_anything.sam_model_registry`` and back. All presets share the prompt
encoder and mask decoder shapes and produce ``(B, 256, 64, 64)`` image embeddings from ``(B, 3, 1024, 1024)``
inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
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

IMAGE_SIZE = 1024  # SAM's square input side, in pixels
PATCH_SIZE = 16  # ViT patch side; 1024 / 16 = 64 embedding cells per side
PROMPT_EMBED_DIM = 256  # channels of the image embedding and of every prompt token
PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's normalisation, RGB, on 0..255 pixels
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """The ViT image-encoder hyper-parameters that distinguish the presets."""

    embed_dim: int
    """Token width of the ViT."""
    depth: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads per block."""
    global_attn_indexes: tuple[int, ...]
    """Blocks that attend globally; the others use 14x14 windows."""

    def as_dict(self) -> dict:
        """JSON-friendly form, stored in the cache signature."""
        d = asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        d.update(img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, out_chans=PROMPT_EMBED_DIM, window_size=14)
        return d


ENCODER_CONFIGS: dict[str, EncoderConfig] = {
    "vit_h": EncoderConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": EncoderConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": EncoderConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    # Two blocks of width 64: about 1% of vit_b's encoder cost, same output shapes, for tests and demos.
    "vit_tiny": EncoderConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)),
}
MODEL_TYPES = tuple(ENCODER_CONFIGS)


def _build_sam(*, encoder: EncoderConfig) -> Sam:
    """Assemble an untrained ``Sam`` from the given encoder and SAM's standard prompt encoder and decoder."""
    grid = IMAGE_SIZE // PATCH_SIZE
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder.depth,
            embed_dim=encoder.embed_dim,
            img_size=IMAGE_SIZE,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder.num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=encoder.global_attn_indexes,
            window_size=14,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
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
        model_type: one of ``MODEL_TYPES`` (``vit_b``, ``vit_l``, ``vit_h``, ``vit_tiny``).
        checkpoint: path to a segment_anything-style state dict, loaded strictly. ``None`` gives a random
            initialisation drawn from ``seed`` (reproducible across machines on CPU).
        seed: the seed for random initialisation; ignored when a checkpoint is given.
    """
    if model_type not in ENCODER_CONFIGS:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = _build_sam(encoder=ENCODER_CONFIGS[model_type])
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
