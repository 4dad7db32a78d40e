"""``trainer.amg``: the grid, the frames, the thresholds, NMS and the label image, on a decoder whose answer
is known (the disc under each point), and the plumbing on a random-init vit_tiny."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.amg import MaskData, mask_to_rle_pytorch, rle_to_mask
from torch import nn

from embedcache.models import build_sam
from embedcache.synthetic import make_image
from trainer.amg import AmgConfig, amg_labels, grid_candidates, select, sweep_configs, to_labels
from trainer.decoder import Decoded, PromptedDecoder
from trainer.instance_metrics import image_scores

SIDE = 256  # a LiteMedSAM-like frame: 256 input, logits at the input frame's size
ORIGINAL = (128, 96)  # portrait, twice the input size: the padding is below and to the right
INPUT = (64, 48)
DISCS = [(15, 12, 6), (38, 30, 8), (48, 12, 5)]  # (y, x, r) in the input frame


def disc_labels(hw, scale=1.0) -> np.ndarray:
    yy, xx = np.mgrid[: hw[0], : hw[1]] + 0.5
    out = np.zeros(hw, np.int32)
    for k, (y, x, r) in enumerate(DISCS, 1):
        out[(yy - y * scale) ** 2 + (xx - x * scale) ** 2 < (r * scale) ** 2] = k
    return out


class DiscDecoder(nn.Module):
    """``PromptedDecoder``'s interface; each point's first multimask output is the disc under it (predicted
    IoU 0.95, else an empty mask at 0.3), the second the same disc (0.9, an NMS duplicate), the third all
    discs at once (0.5)."""

    semantic_head = None
    encoder_tail = None

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # for the device
        self.labels = torch.from_numpy(disc_labels((SIDE, SIDE)))
        self.calls = 0

    def image_embeddings(self, inputs):
        return inputs

    def decode_prompts(self, embeddings, image_index, prompts):
        self.calls += 1
        xy = prompts.point_coords[:, 0].long()
        under = self.labels[xy[:, 1].clamp(0, SIDE - 1), xy[:, 0].clamp(0, SIDE - 1)]
        p = len(under)
        own = (self.labels[None] == under[:, None, None]) & (under[:, None, None] > 0)
        logits = torch.stack([own, own, own, (self.labels > 0).expand(p, -1, -1)], 1).float() * 40 - 20
        hit = (under > 0).float()
        iou = torch.stack([hit, 0.95 * hit + 0.3 * (1 - hit), 0.9 * hit, torch.full((p,), 0.5)], 1)
        return Decoded(logits, iou)


def test_amg_finds_the_discs_at_the_original_size():
    model = DiscDecoder()
    cfg = AmgConfig(points_per_side=6, points_per_batch=16)
    labels = amg_labels(model, torch.zeros(1, 256, 64, 64), INPUT, ORIGINAL, SIDE, cfg)
    assert labels.shape == ORIGINAL and labels.dtype == np.int32
    assert model.calls == 3  # 36 points, 16 a call
    truth = disc_labels(ORIGINAL, scale=2.0)
    s = image_scores(labels, truth)
    assert (s["n_pred"], s["n_true"], s["sa50"]) == (3, 3, 1.0)
    assert s["msa"] > 0.9, s


def test_chunking_does_not_change_the_candidates():
    model = DiscDecoder()
    emb = torch.zeros(1, 256, 64, 64)
    a = grid_candidates(model, emb, INPUT, ORIGINAL, SIDE, AmgConfig(points_per_side=6, points_per_batch=5))
    b = grid_candidates(model, emb, INPUT, ORIGINAL, SIDE, AmgConfig(points_per_side=6, points_per_batch=64))
    assert a["rles"] == b["rles"] and len(a["rles"]) > 0
    for k in ("iou_preds", "stability_score", "boxes", "points"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_sweep_rescoring_equals_a_fresh_run_at_its_thresholds():
    model = DiscDecoder()
    emb = torch.zeros(1, 256, 64, 64)
    base = AmgConfig(points_per_side=6)
    configs = sweep_configs(base)
    floor = (min(c.pred_iou_thresh for c in configs), min(c.stability_score_thresh for c in configs))
    candidates = grid_candidates(model, emb, INPUT, ORIGINAL, SIDE, base, floor=floor)
    kept = {c: len(select(candidates, c)["rles"]) for c in configs}
    assert len(set(kept.values())) > 1  # the thresholds matter: pred IoU < 0.5 lets the all-discs mask in
    for c in (configs[0], configs[-1]):  # a fresh run of each would take as long as the whole sweep
        again = to_labels(select(candidates, c), ORIGINAL)
        np.testing.assert_array_equal(again, amg_labels(model, emb, INPUT, ORIGINAL, SIDE, c))


def test_to_labels_paints_largest_first_and_numbers_what_stays_visible():
    big, small, square, same = np.zeros((4, 10, 10), bool)
    big[:, :] = True
    small[2:4, 2:4] = True
    square[5:9, 5:9] = True
    same[5:9, 5:9] = True  # square's pixels again: painted over it, so square is hidden
    masks = torch.from_numpy(np.stack([small, big, square, same]))
    labels = to_labels(MaskData(rles=mask_to_rle_pytorch(masks)), (10, 10))
    assert sorted(np.unique(labels).tolist()) == [1, 2, 3]  # ids 1..n, no gap for the hidden mask
    assert len({labels[0, 0], labels[2, 2], labels[6, 6]}) == 3  # small and the square stay on top of big


def test_plumbing_on_random_vit_tiny_and_refusals():
    sam = build_sam("vit_tiny", seed=0)
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder).eval()
    cfg = AmgConfig(points_per_side=1, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    emb = torch.randn(1, 256, 64, 64)
    candidates = grid_candidates(model, emb, (1024, 768), (400, 300), 1024, cfg, floor=(-1e9, 0.0))
    assert len(candidates["rles"]) == 3  # the one point's three multimask outputs
    assert candidates["rles"][0]["size"] == [400, 300]
    labels = amg_labels(model, emb, (1024, 768), (400, 300), 1024, cfg)
    assert labels.shape == (400, 300) and labels.dtype == np.int32
    with pytest.raises(ValueError, match="semantic head"):
        semantic = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder, semantic_head=nn.Identity())
        grid_candidates(semantic, emb, (1024, 768), (400, 300), 1024, cfg)
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        AmgConfig(pred_iou_thresh=1.5)


@pytest.mark.slow  # SAM's generator upsamples every mask to 1024 x 1024: 25 s on the shared 2 cores
def test_a_plain_sam_gives_sam_automatic_mask_generators_masks():
    sam = build_sam("vit_tiny", seed=1).eval()
    with torch.no_grad():  # a random decoder's logits hardly leave (-1, 1); scaled, its masks are stable
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 30
    image, _ = make_image(np.random.default_rng(0), 120, 90, 2)
    # NMS at 1.0 keeps every mask that passes, so the two lists are long enough to differ
    kw = dict(points_per_side=3, pred_iou_thresh=0.05, stability_score_thresh=0.05, box_nms_thresh=1.0)
    theirs = SamAutomaticMaskGenerator(sam, points_per_batch=4, **kw).generate(image)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder).eval()
    cfg = AmgConfig(points_per_batch=5, **kw)
    ours = select(grid_candidates(model, predictor.features, predictor.input_size, (120, 90), 1024, cfg), cfg)
    assert len(theirs) == len(ours["rles"]) > 1
    for t, rle, iou, xy in zip(theirs, ours["rles"], ours["iou_preds"], ours["points"]):
        np.testing.assert_array_equal(rle_to_mask(rle), t["segmentation"])
        assert float(iou) == pytest.approx(t["predicted_iou"], abs=1e-5)
        np.testing.assert_allclose(xy.numpy(), t["point_coords"][0])
