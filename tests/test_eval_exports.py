"""``trainer eval --checkpoint`` on what ``trainer export`` writes: the export loads through
``trainer.load_tuned`` (sidecars, the run's task, an encoder tail on a partial cache's tap tokens) and scores
exactly as its run folder does; a bad spec is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from embedcache import open_cache
from trainer.cli import main
from trainer.config import load_config, save_config
from trainer.eval_run import _one_task
from trainer.model import build_start_sam, build_trainable, trainable_parameters
from trainer.task import TASKS

TAIL = ["model.encoder_tail_blocks=1", "model.conv_lora_scales=[1,2]"]
SEMANTIC = ["model.task=semantic", "model.semantic_prompt=box", "loss.ce=1", "loss.focal=0"]
CASES = [
    # decoder LoRA merged, Conv-LoRA in its sidecar, the tail run on the tap tokens
    ("instance", [*TAIL, "model.encoder_adapter=conv_lora", "model.lora_rank=2"]),
    # the task from the manifest's config, LoRA merged into the tail's qkv, the head in its sidecar
    pytest.param("semantic", [*TAIL, "model.encoder_adapter=lora", *SEMANTIC], marks=pytest.mark.slow),
    # the AIS head on the encoder tail's output (LoRA in the tail), the head in its sidecar
    pytest.param("instance", ["model.task=ais", *TAIL, "model.encoder_adapter=lora"], marks=pytest.mark.slow),
]


def _checkpoint(cache: Path, overrides: list[str], folder: Path) -> Path:
    """A checkpoint folder as a run writes one (``model.safetensors``, ``config.yaml``) of the config's model
    with every trainable weight moved off its start (zero-init adapters would hide a sidecar not loaded)."""
    cfg = load_config(None, overrides)
    cfg = TASKS[cfg.model.task].resolve(cfg, open_cache(cache))
    model = build_trainable(build_start_sam(cfg), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    folder.mkdir()
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    save_config(cfg, folder / "config.yaml")
    return folder


@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_an_export_scores_exactly_as_its_run_folder(one_image_caches, kind, overrides, tmp_path):
    tuned = _checkpoint(one_image_caches(kind), overrides, tmp_path / "run")
    exported = tmp_path / "tuned.pth"
    assert main(["export", str(tuned), "--out", str(exported), "--which", str(tuned)]) == 0
    args = ["eval", "--cache", str(one_image_caches(kind)), "--which", str(tuned), "--overlays", "0", "--out"]
    args += [str(tmp_path / "e"), "--checkpoint", str(tuned), "--checkpoint", str(exported)]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["run"]  # the run's task's scores
    # every object's IoU (per class, per instance) included; it fails with the Conv-LoRA sidecar left
    # unloaded or the export scored on the cached embeddings instead of its own tail (checked by hand)
    assert metrics["tuned.pth"] == metrics["run"]


def test_a_bad_checkpoint_spec_is_named(one_image_caches, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "tuned.pth"
    args = [
        "eval",
        "--cache",
        str(one_image_caches("instance")),
        "--checkpoint",
        str(missing),
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 2
    assert f"{missing}: checkpoint file not found" in capsys.readouterr().err


def test_models_of_different_tasks_are_not_scored_in_one_table():
    semantic = load_config(None, SEMANTIC)
    with pytest.raises(ValueError, match=r"a\.pth is a plain SAM, which b\.pth's task \(semantic\)"):
        _one_task([(semantic, "b.pth"), (None, "a.pth")])
    with pytest.raises(ValueError, match=r"b\.pth is a model.task=semantic model and run a model.task=inst"):
        _one_task([(load_config(None, []), "run"), (semantic, "b.pth")])
