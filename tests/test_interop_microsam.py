"""micro-sam: a vit_b export opens through micro-sam's own model loader (the one its napari annotators use
for custom weights) with every weight in place. Skips where micro-sam is not installed (it is not a samtune
dependency: it comes from conda-forge with napari)."""

from __future__ import annotations

import pytest
import torch

from embedcache.models import build_sam


@pytest.mark.slow
def test_vit_b_export_loads_through_micro_sam(tmp_path):
    util = pytest.importorskip("micro_sam.util")
    sam = build_sam("vit_b", seed=5)
    path = tmp_path / "sam_tuned.pth"
    torch.save(sam.state_dict(), path)  # what `trainer export --format sam` writes for a vit_b run
    _, loaded = util.get_sam_model(model_type="vit_b", device="cpu", checkpoint_path=path, return_sam=True)
    state = loaded.state_dict()
    assert set(state) == set(sam.state_dict())
    assert all(torch.equal(state[k].cpu(), v) for k, v in sam.state_dict().items())
