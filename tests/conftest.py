"""Shared pytest fixtures: the ``gpu`` and ``interpreter`` markers' clean skips, the shared real datasets, and
the kernel tests' seed, and the small caches several test files build alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_helpers import fresh_seed

from kernels._dispatch import INTERPRETED

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests cleanly when CUDA is absent, and ``interpreter`` tests when the kernels were built
    compiled, with the reason in the report."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    compiled = pytest.mark.skip(
        reason="needs TRITON_INTERPRET=1 set before the process starts; "
        "`make test` runs these in a pytest call of their own"
    )
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not INTERPRETED:
            item.add_marker(compiled)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that use it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (or ``SAMTUNE_TEST_SEED``), printed so that ``-rA`` and failures show it."""
    return fresh_seed()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 6-image synthetic dataset and its uninterrupted vit_tiny cache (3 shards of 2 images)."""
    from test_embedcache_support import build, tiny_dataset

    root = tmp_path_factory.mktemp("reference")
    data = tiny_dataset(root / "data")
    build(data, root / "ref.zarr")
    return data, root / "ref.zarr"


@pytest.fixture(scope="module")
def one_image_caches(tmp_path_factory):
    """``one_image_caches(kind)``: a partial (``--tail-blocks 1``) vit_tiny cache of one held-out synthetic
    image with at most 3 objects and ``kind`` masks (``instance`` or ``semantic``), built the first time a
    test asks (the export-eval and AIS tests)."""
    from embedcache.build import BuildConfig, build_cache
    from embedcache.synthetic import make_dataset

    root, built = tmp_path_factory.mktemp("one_image"), {}

    def cache(kind: str) -> Path:
        if kind not in built:
            built[kind] = root / f"{kind}.zarr"
            build_cache(
                BuildConfig(
                    data=make_dataset(root / kind, n_images=1, seed=1, max_objects=3, kind=kind),
                    out=built[kind],
                    model_type="vit_tiny",
                    device="cpu",
                    mask_kind=kind,
                    val_fraction=1.0,
                    progress=False,
                    tail_blocks=1,
                )
            )
        return built[kind]

    return cache
