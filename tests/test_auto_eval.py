"""``trainer eval --auto amg``: the ``auto`` entry, its table and its overlays, and ``AutoSegmenter`` on the
image files, on the vit_tiny reference cache with a random-init checkpoint file (its scores are whatever a
random decoder makes; the wiring and the equality are checked)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from embedcache import open_cache
from embedcache.models import build_sam
from trainer.amg import AmgConfig
from trainer.auto_eval import auto_table, evaluate_amg, true_labels
from trainer.automatic import AutoSegmenter
from trainer.cli import main
from trainer.data import ImageStore, image_file
from trainer.decoder import PromptedDecoder


@pytest.mark.slow  # the reference cache's build and a full eval: a minute on the shared 2-core machine
def test_eval_auto_amg_writes_scores_table_and_overlays(reference, tmp_path, capsys):
    _, cache_path = reference
    cache = open_cache(cache_path)
    seed = int(cache.signature["checkpoint"].split(":")[1])
    weights = tmp_path / "random.pth"
    torch.save(build_sam("vit_tiny", seed=seed).state_dict(), weights)
    out = tmp_path / "eval"
    argv = ["eval", "--cache", str(cache_path), "--checkpoint", str(weights), "--out", str(out)]
    assert main([*argv, "--auto", "amg", "--amg-sweep", "--amg-points-per-side", "2", "--overlays", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    auto = metrics["random.pth"]["auto"]
    assert auto["method"] == "amg" and auto["amg"]["points_per_side"] == 2
    scored = np.intersect1d(cache.image_indices("val"), cache.images_with_objects("all"))
    assert auto["n_images"] == len(scored) > 0
    assert auto["n_true"] == sum(int(true_labels(cache, i).max()) for i in scored)
    assert 0.0 <= auto["msa"] <= auto["sa50"] <= 1.0
    assert len(auto["sweep"]) == 20
    assert "box" in metrics["random.pth"]  # the prompted scores are still there
    table = (out / "table.md").read_text()
    assert "| random.pth | amg |" in table and "threshold sweep" in table
    assert table == capsys.readouterr().out.split(str(out / "metrics.json"))[0]
    assert len(list((out / "overlays_auto").glob("*.png"))) == 1


def test_auto_table_is_empty_without_auto_scores():
    assert auto_table({"m": {"box": {"miou": 0.5}}, "split": "val"}) == ""


@pytest.mark.slow  # shares the reference cache's build with the test above
def test_auto_segmenter_on_image_files_equals_eval_labels(reference, tmp_path):
    _, cache_path = reference
    cache = open_cache(cache_path)
    sam = build_sam("vit_tiny", seed=int(cache.signature["checkpoint"].split(":")[1]))
    weights = tmp_path / "random.pth"
    torch.save(sam.state_dict(), weights)
    # no thresholds and no NMS: a random decoder's masks all stay, so the labels have many objects
    cfg = AmgConfig(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    images = cache.images_with_objects("all")[:2]
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder).eval()
    store = ImageStore(cache, "host", torch.device("cpu"))
    _, scored = evaluate_amg(model, store, images, Accelerator(cpu=True), cfg, keep=len(images))
    segmenter = AutoSegmenter(weights, model_type="vit_tiny", amg=cfg, device="cpu")
    for i in images.tolist():
        labels = segmenter.segment(image_file(cache, i))
        assert labels.dtype == np.int32 and labels.shape == tuple(cache.original_size[i])
        np.testing.assert_array_equal(labels, scored[i])
        assert labels.max() > 1
