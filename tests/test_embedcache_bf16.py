"""The bf16 autocast encode path against the float32 reference: on CPU always, on CUDA when present."""

from __future__ import annotations

import numpy as np
import pytest
from test_embedcache_support import build, tiny_dataset

from embedcache import open_cache

# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through vit_tiny's two blocks and neck the measured
# relative error on CPU autocast is 0.0066, while a preprocessing bug (e.g. no normalisation) gives ~1.
MAX_REL_ERROR = 2e-2


def _compare(tmp_path, **bf16_build):
    data = tiny_dataset(tmp_path / "data", n_images=2)
    build(data, tmp_path / "fp32.zarr")
    build(data, tmp_path / "bf16.zarr", **bf16_build)
    ref, low = open_cache(tmp_path / "fp32.zarr"), open_cache(tmp_path / "bf16.zarr")
    assert ref.signature["compute_dtype"] == "float32" and low.signature["compute_dtype"] == "bfloat16"
    a = ref.read_embeddings(np.arange(2)).astype(np.float32)
    b = low.read_embeddings(np.arange(2)).astype(np.float32)
    assert np.isfinite(b).all()
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert rel < MAX_REL_ERROR, f"relative error {rel:.4f}"
    assert not np.array_equal(a, b)  # it really ran in bf16


def test_bf16_autocast_on_cpu_is_close_to_fp32(tmp_path):
    _compare(tmp_path, dtype="bfloat16")


@pytest.mark.gpu
def test_bf16_cuda_build_is_close_to_fp32_cpu(tmp_path):
    _compare(tmp_path, device="cuda", batch_size=2)  # dtype auto = bf16 autocast, pinned copies, CUDA events
