"""HF transformers ``SamModel``: the key map covers every key both ways (vit_b/l/h and vit_tiny, built on the
meta device), an export folder loads with ``SamModel.from_pretrained`` and gives the SAM masks, and
``--checkpoint hf:FOLDER`` comes back to the same SAM. Skips without the ``hf`` extra."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from embedcache.hf_keys import HF_TIED, KeyMapError, hf_key_to_sam, sam_key_to_hf  # noqa: E402
from embedcache.models import build_sam  # noqa: E402
from embedcache.weights import resolve_checkpoint  # noqa: E402
from trainer.export import ExportError  # noqa: E402
from trainer.export_hf import hf_config, save_hf  # noqa: E402


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h", "vit_tiny"])
def test_key_map_covers_every_key_both_ways(model_type):
    with torch.device("meta"):  # names and shapes only: no weights are drawn
        state = build_sam(model_type).state_dict()
        hf = _shapes(transformers.SamModel(hf_config(state)))
    sam = {k: tuple(v.shape) for k, v in state.items()}
    to_hf = {sam_key_to_hf(k): k for k in sam}
    assert len(to_hf) == len(sam), "two SAM keys map to one HF key"
    assert set(to_hf) | set(HF_TIED) == set(hf)
    assert all(hf[h] == sam[s] for h, s in to_hf.items())
    to_sam = {hf_key_to_sam(k): k for k in hf if k not in HF_TIED}
    assert len(to_sam) == len(hf) - len(HF_TIED), "two HF keys map to one SAM key"
    assert set(to_sam) == set(sam)
    assert all(sam[s] == hf[h] for s, h in to_sam.items())


def test_an_unknown_key_is_named():
    with pytest.raises(KeyMapError, match="image_encoder.blocks.0.attn.qkv.lora_a"):
        sam_key_to_hf("image_encoder.blocks.0.attn.qkv.lora_a")


def _sam_and_hf_masks(sam, hf, seed: int):
    """Low-res logits and IoUs of SAM and of HF SamModel for one embedding: 3 click prompts (one negative
    click each) with multimask outputs, and 2 box prompts with the single output."""
    g = torch.Generator().manual_seed(seed)
    side = sam.image_encoder.img_size
    emb = torch.randn(1, 256, 64, 64, generator=g)
    pts = torch.rand(3, 3, 2, generator=g) * side
    labels = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]])
    boxes = torch.tensor([[10.0, 20, 500, 600], [100, 100, 900, 300]])
    pe = sam.prompt_encoder.get_dense_pe()
    out = []
    with torch.no_grad():
        for points, box, multi in [((pts, labels), None, True), (None, boxes, False)]:
            sparse, dense = sam.prompt_encoder(points=points, boxes=box, masks=None)
            low, iou = sam.mask_decoder(emb, pe, sparse, dense, multimask_output=multi)
            kw = {"input_points": pts[None], "input_labels": labels[None]} if box is None else {}
            kw |= {"input_boxes": box[None]} if box is not None else {}
            got = hf(image_embeddings=emb, multimask_output=multi, **kw)
            out.append((low, iou, got.pred_masks[0], got.iou_scores[0]))
    return out


def test_export_folder_loads_in_transformers_with_the_same_masks(tmp_path, seed):
    sam = build_sam("vit_tiny", seed=seed)
    save_hf(sam.state_dict(), tmp_path / "hf")
    hf = transformers.SamModel.from_pretrained(tmp_path / "hf").eval()
    for low, iou, hf_low, hf_iou in _sam_and_hf_masks(sam, hf, seed):
        assert hf_low.shape == low.shape
        # float32 attention in a different order (HF's SDPA): equal to rounding. Measured over 8 seeds, the
        # largest differences were 3.1e-5 (masks) and 1.4e-5 (IoU scores, which went over the 1e-5 once
        # allowed for them on half the seeds); a wrong key in the map moves either by 1e-2 or more
        torch.testing.assert_close(hf_low, low, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hf_iou, iou, atol=1e-4, rtol=1e-4)
        clear = low.abs() > 1e-4  # pixels whose sign rounding cannot flip
        assert torch.equal((hf_low > 0)[clear], (low > 0)[clear])


def test_hf_checkpoint_builds_the_same_sam(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMTUNE_WEIGHTS", str(tmp_path / "weights"))
    sam = build_sam("vit_tiny", seed=7)
    save_hf(sam.state_dict(), tmp_path / "hf")
    path = resolve_checkpoint(f"hf:{tmp_path / 'hf'}")
    assert path.is_relative_to(tmp_path / "weights")
    back = build_sam("vit_tiny", path).state_dict()
    assert all(torch.equal(back[k], v) for k, v in sam.state_dict().items())
    # the same folder gives the same file, byte for byte: one cache signature per HF model
    first = path.read_bytes()
    path.unlink()
    assert resolve_checkpoint(f"hf:{tmp_path / 'hf'}").read_bytes() == first


def test_hf_checkpoint_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="HF SamModel folder not found"):
        resolve_checkpoint(f"hf:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyMapError, match=r"empty: no model\.safetensors"):
        resolve_checkpoint(f"hf:{tmp_path / 'empty'}")


def test_tiny_vit_presets_are_refused():
    # a TinyViT encoder's first keys (lite_medsam, mobile_sam): no ViT pos_embed
    state = {"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3)}
    with pytest.raises(ExportError, match="TinyViT.*--format sam or --format onnx"):
        hf_config(state)


def test_a_model_with_sidecars_is_refused(tmp_path, monkeypatch):
    """A variant that cannot merge (Conv-LoRA, a task head) leaves a sidecar beside the SAM export."""
    import trainer.export_hf as export_hf

    def fake_export(run, out, *, which):
        for path in (out, out.with_name("sam.conv_lora.pth")):
            torch.save({}, path)
        return [out, out.with_name("sam.conv_lora.pth")]

    monkeypatch.setattr(export_hf, "export", fake_export)
    with pytest.raises(ExportError, match="conv_lora.pth.*cannot hold.*--format sam"):
        export_hf.export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_vit_b_export_gives_the_same_embeddings_and_masks(tmp_path, seed):
    sam = build_sam("vit_b", seed=seed)
    save_hf(sam.state_dict(), tmp_path / "hf")
    hf = transformers.SamModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(
            hf.get_image_embeddings(pixels), sam.image_encoder(pixels), atol=1e-4, rtol=1e-4
        )
    for low, iou, hf_low, hf_iou in _sam_and_hf_masks(sam, hf, seed):
        torch.testing.assert_close(hf_low, low, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hf_iou, iou, atol=1e-5, rtol=1e-4)
