"""The variant protocol end to end without a run: every combination of task and variants exports by one rule
and ``trainer.load_tuned`` rebuilds it to predict exactly as the tuned model does; bad exports are named."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.config import load_config
from trainer.export import export_model
from trainer.model import build_start_sam, build_trainable, trainable_parameters
from trainer.prompts import Prompts
from trainer.tuned import MANIFEST, load_tuned, sidecar_path
from trainer.variants import variants_for

SLOW = pytest.mark.slow  # about 2 s of CPU each; the first combination has every kind of variant
COMBOS = [
    # decoder LoRA merged, Conv-LoRA and the semantic head in their sidecars: the config accepted this one
    # before any loader applied both sidecars
    ("semantic", "conv_lora", 2),
    pytest.param("instance", "none", 0, marks=SLOW),
    pytest.param("instance", "conv_lora", 0, marks=SLOW),
    pytest.param("semantic", "lora", 2, marks=SLOW),
]


def _tuned(task: str, adapter: str, lora_rank: int):
    """A vit_tiny model with the variants of the config, every trainable weight moved off its start, and
    the variants merged (what ``trainer.model.tuned_sam`` gives)."""
    overrides = [
        f"model.task={task}",
        f"model.lora_rank={lora_rank}",
        "model.encoder_tail_blocks=1",
        f"model.encoder_adapter={adapter}",
        "model.conv_lora_scales=[1,2]",
    ]
    if task == "semantic":
        overrides += ["model.num_classes=3", "model.semantic_prompt=box", "loss.ce=1"]
    cfg = load_config(None, overrides)
    sam = build_start_sam(cfg)
    model = build_trainable(sam, cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model):  # zero-init adapters would hide a sidecar that is not loaded
            p.add_(torch.randn_like(p) * 0.05)
    for variant in variants_for(cfg.model):
        variant.merge(sam)
    return cfg, sam, model


def _prompts(n: int) -> Prompts:
    boxes = torch.tensor([[100.0, 120.0, 600.0, 500.0], [10.0, 20.0, 300.0, 900.0]])[:n]
    return Prompts(
        point_coords=torch.zeros(n, 0, 2),
        point_labels=torch.zeros(n, 0, dtype=torch.long),
        boxes=boxes,
        has_box=torch.ones(n, dtype=torch.bool),
    )


@pytest.mark.parametrize(("task", "adapter", "lora_rank"), COMBOS)
def test_every_combination_exports_and_loads_predicting_as_tuned(task, adapter, lora_rank, tmp_path):
    cfg, sam, model = _tuned(task, adapter, lora_rank)
    n = 2 if task == "instance" else 1
    emb, index = torch.randn(1, 256, 64, 64), torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        want = model.decode_prompts(emb, index, _prompts(n))
    # the whole SAM with its variants in place (Conv-LoRA in the tail), before the export detaches them
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    out = tmp_path / "tuned.pth"
    written = export_model(sam, model, cfg.model, out)

    on = {"conv_lora": adapter == "conv_lora", "semantic": task == "semantic"}
    expected = [name for name, here in on.items() if here]
    manifest = json.loads(sidecar_path(out, MANIFEST, ".json").read_text())
    assert manifest == {"format": 1, "model_type": "vit_tiny", "sidecars": expected}
    assert written == [
        out,
        *(sidecar_path(out, name) for name in expected),
        sidecar_path(out, MANIFEST, ".json"),
    ]
    assert not list(tmp_path.glob(".tmp-*"))  # every file went through its temp name and was renamed

    tuned = load_tuned(out)
    got = tuned.sam.state_dict()
    assert list(got) == list(state)  # the same modules in the same places, adapters included
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        decoded = tuned.model.decode_prompts(emb, index, _prompts(n))
    torch.testing.assert_close(decoded.logits, want.logits, rtol=0, atol=0)
    assert (decoded.iou is None) == (task == "semantic")


def test_load_tuned_names_what_is_missing_or_unknown(tmp_path):
    cfg, sam, model = _tuned("instance", "conv_lora", 0)
    out = tmp_path / "t.pth"
    export_model(sam, model, cfg.model, out)
    manifest = sidecar_path(out, MANIFEST, ".json")
    with pytest.raises(ValueError, match="vit_tiny model, not vit_b"):
        load_tuned(out, model_type="vit_b")
    manifest.rename(tmp_path / "kept.json")
    with pytest.raises(FileNotFoundError, match="no manifest beside"):
        load_tuned(out)
    # an export without a manifest (written before them): the registered sidecars found beside it
    assert type(load_tuned(out, model_type="vit_tiny").sam.image_encoder.blocks[1].attn.qkv).__name__ == (
        "ConvLoRALinear"
    )
    (tmp_path / "kept.json").rename(manifest)
    sidecar_path(out, "conv_lora").unlink()
    with pytest.raises(FileNotFoundError, match="t.conv_lora.pth: missing"):
        load_tuned(out)
    manifest.write_text(json.dumps({"format": 1, "model_type": "vit_tiny", "sidecars": ["no_such_head"]}))
    with pytest.raises(ValueError, match=r"sidecars \['no_such_head'\] have no loader"):
        load_tuned(out)


def test_sidecars_follow_one_rule():
    assert sidecar_path("a/x.pth", "conv_lora").as_posix() == "a/x.conv_lora.pth"
    assert sidecar_path("a/x.bin", "semantic").as_posix() == "a/x.bin.semantic.pth"
    assert sidecar_path("x.pth", MANIFEST, ".json").as_posix() == "x.samtune.json"


def test_a_failed_export_leaves_no_sidecar_without_its_model(tmp_path, monkeypatch):
    import trainer.export

    cfg, sam, model = _tuned("instance", "conv_lora", 0)
    out = tmp_path / "t.pth"
    save = trainer.export._save

    def full_disk(obj, path, *args):
        if path == out:
            raise trainer.export.ExportError(f"{path}: writing failed (No space left on device)")
        return save(obj, path, *args)

    monkeypatch.setattr(trainer.export, "_save", full_disk)
    with pytest.raises(trainer.export.ExportError, match="No space left"):
        export_model(sam, model, cfg.model, out)
    assert list(tmp_path.iterdir()) == []  # the Conv-LoRA sidecar and the manifest were written, then removed
