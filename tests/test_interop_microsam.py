"""micro-sam: a vit_b export opens through micro-sam's own model loader (the one its napari annotators use
for custom weights) with every weight in place. Skips where micro-sam is not installed: it is not a samtune
dependency (``pip install micro_sam`` or conda-forge's ``micro_sam``, both with napari and Qt)."""

from __future__ import annotations

import pytest
import torch

from trainer.config import load_config
from trainer.export import export_model
from trainer.model import build_start_sam, build_trainable, trainable_parameters
from trainer.variants import variants_for


@pytest.mark.slow
def test_vit_b_export_loads_through_micro_sam(tmp_path):
    util = pytest.importorskip("micro_sam.util")
    # decoder LoRA and an encoder tail with LoRA: both merge into SAM's own keys on export
    cfg = load_config(
        None,
        [
            "model.model_type=vit_b",
            "model.lora_rank=2",
            "model.encoder_tail_blocks=1",
            "model.encoder_adapter=lora",
        ],
    )
    sam = build_start_sam(cfg)
    model = build_trainable(sam, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model):  # zero-init LoRA would merge to nothing
            p.add_(torch.randn_like(p) * 0.05)
    for variant in variants_for(cfg.model):
        variant.merge(sam)
    out = tmp_path / "sam_tuned.pth"
    export_model(sam, model, cfg.model, out)  # what `trainer export --format sam` writes, manifest beside it

    predictor, loaded = util.get_sam_model(
        model_type="vit_b", device="cpu", checkpoint_path=out, return_sam=True
    )
    assert predictor.model_type == "vit_b"
    want, got = sam.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key].cpu(), value, rtol=0, atol=0, msg=key)
