"""Partial caches (``--tail-blocks k``): tap tokens beside unchanged embeddings, exact resume, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from test_embedcache_support import arrays, assert_same_cache, build, cli_build, tiny_dataset

from embedcache import CacheError, open_cache
from embedcache.build import CacheExistsError
from embedcache.encode import EXIT_AFTER_SHARDS_ENV
from embedcache.info import info_text
from embedcache.models import build_sam
from embedcache.tap import run_tail, split_tail
from embedcache.verify import verify


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """One 6-image dataset built twice: a full cache and a partial one with ``--tail-blocks 1``."""
    root = tmp_path_factory.mktemp("partial")
    data = tiny_dataset(root / "data")
    build(data, root / "full.zarr")
    build(data, root / "partial.zarr", tail_blocks=1)
    return data, root / "full.zarr", root / "partial.zarr"


def test_partial_cache_keeps_the_full_embeddings_and_adds_the_tap_tokens(caches):
    _, full, partial = caches
    a, b = arrays(full), arrays(partial)
    assert sorted(set(b) - set(a)) == ["tap_tokens"]
    for name in a:  # every array of the full cache, embeddings included, is bit-identical
        va, vb = a[name], b[name]
        bits = va.dtype.kind == "f"  # NaN-aware: compare the bits
        assert np.array_equal(va.view(np.uint8), vb.view(np.uint8)) if bits else np.array_equal(va, vb), name
    c = open_cache(partial)
    assert c.tail_blocks == 1 and open_cache(full).tail_blocks == 0
    want = {"blocks": 1, "enters": "blocks.1", "shape": [64, 64, 64], "dtype": "float16"}
    assert c.signature["tap"] == want
    assert c.tap_tokens.dtype == np.float16 and c.tap_tokens.shape == (6, 64, 64, 64)
    assert c.tap_tokens.chunks == (1, 64, 64, 64) and c.tap_tokens.shards == (2, 64, 64, 64)
    tap = c.read_tap([4, 1])
    assert np.array_equal(tap[1], c.tap_tokens[1])
    assert verify(partial) == []


def test_tap_tokens_run_through_the_tail_give_the_stored_embeddings(caches):
    _, _, partial = caches
    c = open_cache(partial)
    encoder = build_sam("vit_tiny").image_encoder
    idx = np.arange(c.num_images)
    with torch.no_grad():
        got = run_tail(split_tail(encoder, 1), torch.from_numpy(c.read_tap(idx)).float())
    want = torch.from_numpy(c.read_embeddings(idx)).float()
    rel = float((got - want).norm() / want.norm())
    assert rel < 2e-3, rel


def test_info_reports_tap_bytes_per_image(caches):
    _, full, partial = caches
    text = info_text(partial)
    assert "tokens entering blocks.1 (last 1 block(s)), float16 (N, 64, 64, 64)" in text
    per_image = [ln for ln in text.splitlines() if ln.startswith("per image")][0]
    tap_kib = float(per_image.split(",")[-1].split()[0])
    assert tap_kib == pytest.approx(64 * 64 * 64 * 2 / 1024, rel=0.01)  # raw float16, one image per chunk
    assert "none (full cache" in info_text(full) and "0.0 KiB tap tokens" in info_text(full)


def test_full_cache_has_no_tap_tokens(caches):
    _, full, _ = caches
    with pytest.raises(CacheError, match="not a partial cache.*--tail-blocks"):
        open_cache(full).read_tap([0])


def test_partial_resume_after_exit_mid_build_is_exact(caches, tmp_path):
    data, _, partial = caches
    out = tmp_path / "c.zarr"
    r = cli_build(data, out, "--tail-blocks", "1", env={EXIT_AFTER_SHARDS_ENV: "1"}, check=False)
    assert r.returncode == 75, r.stderr
    done = np.asarray(zarr.open_group(out, mode="r")["shard_done"][...])
    assert done.tolist() == [1, 0, 0]
    report = build(data, out, tail_blocks=1)
    assert report["runs"][-1]["shards_encoded"] == 2
    assert_same_cache(partial, out)


def test_another_tap_point_is_refused_not_mixed(caches):
    data, full, partial = caches
    with pytest.raises(CacheExistsError, match="tap: existing None"):
        build(data, full, tail_blocks=2)
    with pytest.raises(CacheExistsError, match="tap.blocks: existing 1, this build 2"):
        build(data, partial, tail_blocks=2)
    assert open_cache(partial).tail_blocks == 1


def test_more_tail_blocks_than_the_encoder_has_is_refused(caches, tmp_path):
    data, _, _ = caches
    with pytest.raises(ValueError, match="tail-blocks 3 does not fit model vit_tiny.*has 2 blocks"):
        build(data, tmp_path / "c.zarr", tail_blocks=3)
    assert not (tmp_path / "c.zarr").exists()
