"""``trainer export --format sam|hf|onnx`` end to end on a 2-step vit_tiny run: the three exports give the
same masks on the run's cache, and ``--checkpoint hf:FOLDER`` scores as the SAM export does. Slow: it trains,
and the ONNX export alone takes a minute on 2 cores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from embedcache import open_cache  # noqa: E402
from embedcache.build import BuildConfig, build_cache  # noqa: E402
from embedcache.models import build_sam  # noqa: E402
from embedcache.synthetic import make_dataset  # noqa: E402
from trainer.cli import main  # noqa: E402
from trainer.export_onnx import onnx_parity  # noqa: E402

pytestmark = pytest.mark.slow
RUN = ["run.steps=2", "run.eval_every=0", "run.save_every=2", "run.overlays=0", "data.max_objects=2"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(cache path, folder)``: ``run/`` and its three exports, ``sam.pth``, ``hf/``, ``decoder.onnx``."""
    tmp = tmp_path_factory.mktemp("interop")
    data = make_dataset(tmp / "data", n_images=4, seed=0)
    cache = tmp / "c.zarr"
    build_cache(BuildConfig(data=data, out=cache, model_type="vit_tiny", device="cpu", progress=False))
    assert main(["run", "--cache", str(cache), "--out", str(tmp / "run"), *RUN]) == 0
    for fmt, out in (("sam", "sam.pth"), ("hf", "hf"), ("onnx", "decoder.onnx")):
        assert main(["export", str(tmp / "run"), "--out", str(tmp / out), "--format", fmt]) == 0
    return cache, tmp


def test_hf_export_gives_the_sam_exports_masks(exported):
    cache_path, tmp = exported
    cache = open_cache(cache_path)
    sam = build_sam("vit_tiny", tmp / "sam.pth")
    hf = transformers.SamModel.from_pretrained(tmp / "hf").eval()
    emb = torch.from_numpy(cache.read_embeddings(np.array([0]))).float()
    boxes = torch.from_numpy(cache.objects.box[:2]) * 1024 / float(cache.original_size[0].max())
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        low, _ = sam.mask_decoder(
            emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False
        )
        got = hf(image_embeddings=emb, input_boxes=boxes[None], multimask_output=False).pred_masks[0]
    torch.testing.assert_close(got, low, atol=1e-4, rtol=1e-4)


def test_onnx_export_gives_the_sam_exports_masks(exported):
    cache_path, tmp = exported
    cache = open_cache(cache_path)
    result = onnx_parity(tmp / "decoder.onnx", build_sam("vit_tiny", tmp / "sam.pth"), cache, np.arange(2))
    assert result["prompts"] > 0
    assert result["max_logit_diff"] < 1e-3 and result["differing_max_abs_logit"] < 1e-3


def test_eval_from_the_hf_folder_scores_as_the_sam_export(exported, tmp_path, monkeypatch):
    cache_path, tmp = exported
    monkeypatch.setenv("SAMTUNE_WEIGHTS", str(tmp_path / "weights"))
    specs = [f"hf:{tmp / 'hf'}", str(tmp / "sam.pth")]
    args = ["eval", "--cache", str(cache_path), "--split", "all", "--out", str(tmp_path / "eval")]
    assert main([*args, "--checkpoint", specs[0], "--checkpoint", specs[1]]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics[specs[0]]["box"]["miou"] == metrics["sam.pth"]["box"]["miou"]


def test_hf_export_refuses_an_existing_folder(exported, capsys):
    _, tmp = exported
    assert main(["export", str(tmp / "run"), "--out", str(tmp / "hf"), "--format", "hf"]) == 2
    assert "exists; name a new folder" in capsys.readouterr().err
