"""The cache signature (group attributes) and the compatibility check the trainer runs before using a cache.

A signature is a JSON dict::

    format_version   int, bumped on any incompatible layout change
    model_type       a preset name (embedcache.presets.MODEL_TYPES: vit_b, lite_medsam, ...)
    checkpoint       sha256 hex of the weights file, or "random-init:<seed>"
    encoder          the encoder hyper-parameters and input side (Preset.encoder_dict)
    preprocessing    input side, resize rule, normalisation, pixel mean/std, padding, image conversion,
                     upstream reference (Preset.preprocessing)
    storage_dtype    "float16"
    compute_dtype    "float32" or "bfloat16": what the encoder ran in (bf16 autocast on GPU)
    dataset          fingerprint (sha256 over every input file), reader settings, split definition
    layout           images_per_shard (the counts are in the build report: they follow from the data)

The build report (counts, skipped items, timings) is stored beside it under ``build_report``; it describes a
run, so it is not part of what must match when resuming.
"""

from __future__ import annotations

import re
from pathlib import Path

from embedcache.models import checkpoint_id
from embedcache.presets import get_preset

FORMAT_VERSION = 3  # 2: presets (input side, resize rule and normalisation per model); 3: chunk crc32c
STORAGE_DTYPE = "float16"


class SignatureMismatch(Exception):
    """A cache was built for another model, weights or preprocessing than the one it is used with."""


def expected_signature(model_type: str, checkpoint: str | Path | None, *, init_seed: int = 0) -> dict:
    """The model-side fields a cache must carry to be used with this model and these weights."""
    preset = get_preset(model_type)
    return {
        "format_version": FORMAT_VERSION,
        "model_type": preset.name,
        "checkpoint": resolve_checkpoint_id(checkpoint, init_seed=init_seed),
        "encoder": preset.encoder_dict(),
        "preprocessing": preset.preprocessing(),
        "storage_dtype": STORAGE_DTYPE,
    }


def resolve_checkpoint_id(checkpoint: str | Path | None, *, init_seed: int = 0) -> str:
    """``None`` -> ``random-init:<init_seed>``; an id string (sha256 hex or ``random-init:N``) -> itself;
    a path -> the file's sha256."""
    if checkpoint is None:
        return checkpoint_id(None, init_seed)
    s = str(checkpoint)
    if re.fullmatch(r"[0-9a-f]{64}", s) or re.fullmatch(r"random-init:\d+", s):
        return s
    if not Path(s).is_file():
        raise FileNotFoundError(f"{s}: checkpoint file not found")
    return checkpoint_id(s)


def check_compatible(cache, model_type: str, checkpoint: str | Path | None, *, init_seed: int = 0) -> None:
    """Raise ``SignatureMismatch`` naming the cache and the first differing field, else return None.

    Args:
        cache: an open ``Cache`` (anything with ``.signature`` and ``.path``).
        model_type: the model the caller builds.
        checkpoint: its weights: a path, a sha256 hex, ``random-init:<seed>``, or None for random init.
        init_seed: the seed of a random init when ``checkpoint`` is None.
    """
    expected = expected_signature(model_type, checkpoint, init_seed=init_seed)
    got = cache.signature
    for field, want in expected.items():
        have = got.get(field)
        if have != want:
            raise SignatureMismatch(
                f"{cache.path}: cache signature field {field!r} is {have!r}, but the model needs {want!r}"
            )
