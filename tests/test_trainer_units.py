"""Fast trainer checks that need no cache: config, order, prompts, one-call batching, losses, LoRA."""

from __future__ import annotations

import dataclasses
import itertools
import re
import typing
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedcache.models import build_sam
from trainer.config import DEFAULT_CONFIG, Config, load_config, to_dict
from trainer.decoder import PromptedDecoder, decode, embed_prompts, instance_head
from trainer.lora import add_lora, merge_lora
from trainer.order import batches, micro_batches, permutation
from trainer.prompts import (
    Prompts,
    corrective_click,
    farthest_interior_point,
    initial_prompts,
    restart_with_click,
    single_point,
    step_generator,
)
from trainer.session import lr_factor


@pytest.fixture(scope="module")
def sam():
    return build_sam("vit_tiny", seed=0)


def test_config_overrides_and_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# trainer run ...\noptim:\n  lr: 1e-3\nrun:\n  steps: 7\n")
    cfg = load_config(path, ["data.max_objects=3", "prompts.multimask=false", "optim.lr=2e-4"])
    assert (cfg.optim.lr, cfg.run.steps, cfg.data.max_objects, cfg.prompts.multimask) == (2e-4, 7, 3, False)
    assert to_dict(load_config(None, [])) == to_dict(Config())
    with pytest.raises(ValueError, match="unknown field"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="residency"):
        load_config(None, ["data.residency=disk"])
    with pytest.raises(ValueError, match="section.field=value"):
        load_config(None, ["lr=1"])


@pytest.mark.parametrize(
    "override",
    [
        "model.task=panoptic",
        "model.semantic_prompt=point",
        "data.residency=disk",
        "loss.backend=cuda",
        "optim.optimizer=sgd",
        "optim.schedule=linear",
        "optim.mixed_precision=fp16",
    ],
)
def test_config_choices_are_checked_from_the_literal_annotations(override):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"{re.escape(key)} must be one of \S+\|\S+, got '{value}'"):
        load_config(None, [override])


def test_config_is_frozen_and_task_choices_are_the_registry():
    from trainer.config import ModelConfig
    from trainer.task import TASKS
    from trainer.variants import ENCODER_ADAPTERS

    hints = typing.get_type_hints(ModelConfig)
    assert set(typing.get_args(hints["task"])) == set(TASKS)
    assert set(typing.get_args(hints["encoder_adapter"])) == set(ENCODER_ADAPTERS)
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_classes = 3  # type: ignore[misc]
    assert Config().optim.betas == (0.9, 0.999) and isinstance(load_config(None, []).optim.betas, tuple)


def test_shipped_configs_load_and_start_with_their_command():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"tutorial", "sam_interactive", "semantic"}
    for c in configs:
        assert c.read_text().startswith("# trainer run --cache"), c
        load_config(c)


def test_permutation_is_pure_disjoint_and_shard_local():
    shard_of = np.arange(40) // 8
    a = permutation(3, 5, 40, 4, shard_of=shard_of)
    assert np.array_equal(a, permutation(3, 5, 40, 4, shard_of=shard_of))  # pure
    assert not np.array_equal(a, permutation(3, 6, 40, 4, shard_of=shard_of))  # fresh each epoch
    assert sorted(a.ravel().tolist()) == list(range(40))  # disjoint ranks, nothing missed
    flat = a.T.ravel()  # the global order before dealing to ranks
    assert (np.diff(shard_of[flat]) != 0).sum() == 4  # shards are visited one after another
    assert permutation(0, 0, 10, 3).shape == (3, 3)  # the remainder is dropped, ranks stay even
    b = batches(0, 0, 10, 2, 1, 2)
    assert [len(x) for x in b] == [2, 2]


def test_micro_batches_resume_exactly_and_cover_each_epoch_once_per_rank():
    """The loader's order: 10 images (cache indices 100..109) in shards of 4, 2 ranks, batches of 2."""
    images, shard_of = np.arange(100, 110), np.arange(10) // 4
    kw = dict(seed=7, world=2, batch=2, shard_of=shard_of)
    run = list(itertools.islice(micro_batches(images, rank=1, **kw), 9))
    assert [e for e, _ in run] == [0, 0, 1, 1, 2, 2, 3, 3, 4]  # 5 per rank per epoch, 1 left over: 2 batches
    # resuming at any (epoch, position) continues the uninterrupted order exactly
    for k in range(9):
        epoch, position = divmod(k, 2)
        resumed = list(
            itertools.islice(micro_batches(images, rank=1, epoch=epoch, position=position, **kw), 9 - k)
        )
        assert [(e, b.tolist()) for e, b in resumed] == [(e, b.tolist()) for e, b in run[k:]]
    # one epoch: the ranks read disjoint images, none twice, all but the remainder of 10 over 2 x 2
    both = [b for r in (0, 1) for _, b in itertools.islice(micro_batches(images, rank=r, **kw), 2)]
    flat = np.concatenate(both)
    assert len(flat) == len(set(flat.tolist())) == 8 and set(flat.tolist()) <= set(images.tolist())
    assert run[0][1].tolist() != run[2][1].tolist() or run[1][1].tolist() != run[3][1].tolist()  # reshuffled


def test_lr_schedule():
    from trainer.config import OptimConfig

    cfg = OptimConfig(lr=1.0, warmup=0.2, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # 20 % of 20 steps
    assert all(x > y for x, y in zip(f[4:], f[5:]))  # strictly decaying: a constant schedule fails here
    assert 0.1 < f[-1] < 0.12  # cosine ends near min_lr_ratio
    # the warm-up is a fraction of the run: a 10-step run warms up for 2 steps and then decays, not for ever
    short = [lr_factor(s, cfg, 10) for s in range(10)]
    assert short[:2] == [0.5, 1.0] and short[-1] < 0.2
    flat = OptimConfig(lr=1.0, warmup=0.0, schedule="constant")
    assert [lr_factor(s, flat, 5) for s in range(5)] == [1.0] * 5


def test_lr_scale_groups_by_the_longest_module_prefix():
    from trainer.model import param_groups

    inner = torch.nn.ModuleDict({"b": torch.nn.Linear(2, 2), "bc": torch.nn.Linear(2, 2)})
    model = torch.nn.ModuleDict({"a": inner, "c": torch.nn.Linear(2, 2)})
    model["c"].bias.requires_grad_(False)  # not trained: in no group
    groups = param_groups(model, {"a": 0.5, "a.b": 2.0})
    by_scale = {g["lr_scale"]: {id(p) for p in g["params"]} for g in groups}
    ids = lambda *ps: {id(p) for p in ps}  # noqa: E731
    # "a.b" is the longer key for a.b.*; "a" holds a.bc (a dotted prefix, not a string prefix of "a.b")
    assert by_scale == {
        0.5: ids(*model["a"]["bc"].parameters()),
        1.0: ids(model["c"].weight),
        2.0: ids(*model["a"]["b"].parameters()),
    }
    assert len(param_groups(model, {})) == 1
    with pytest.raises(ValueError, match=r"\['a.d'\] name no trained parameter"):
        param_groups(model, {"a.d": 3.0})
    refused = {
        "{mask_decoder: -1}": "optim.lr_scale factors must be >= 0",
        "3": "optim.lr_scale=3: expected a mapping from a string to a number",
        "{mask_decoder: .nan}": "optim.lr_scale must be finite",
    }
    for value, message in refused.items():
        with pytest.raises(ValueError, match=message):
            load_config(None, [f"optim.lr_scale={value}"])
    # YAML reads 1e-1 (no dot) as a string; a factor takes it as the number it means, as a float field does
    assert load_config(None, ["optim.lr_scale={mask_decoder: 1e-1}"]).optim.lr_scale == {"mask_decoder": 0.1}
    cfg = load_config(None, ["optim.lr_scale={mask_decoder.transformer: 0.25}"])
    assert to_dict(cfg)["optim"]["lr_scale"] == {"mask_decoder.transformer": 0.25}


def test_embed_prompts_matches_sam_prompt_encoder(sam):
    pe = sam.prompt_encoder
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0], [0.0, 5.0, 50.0, 60.0]])
    prompts = Prompts(
        point_coords=torch.zeros(2, 0, 2),
        point_labels=torch.zeros(2, 0, dtype=torch.long),
        boxes=boxes,
        has_box=torch.ones(2, dtype=torch.bool),
    )
    sparse, dense = embed_prompts(pe, prompts)
    ref_sparse, ref_dense = pe(points=None, boxes=boxes, masks=None)
    torch.testing.assert_close(sparse, ref_sparse, rtol=0, atol=0)
    torch.testing.assert_close(dense, ref_dense, rtol=0, atol=0)

    # a box row beside click rows, as training batches them: each row is SAM's prompt for that object alone
    # ([TL, BR]; [click, PAD]; after a corrective round [click, TL, BR] beside [click, click, PAD]). The
    # reference embeds one object, a batch of another shape, and the positional encoding's matmul may round
    # differently there (up to 2e-6 seen on an AMD EPYC): float32 rounding is allowed, a wrong token is not
    # (a misplaced token changes the embedding by order 1)
    def rounding_close(got: torch.Tensor, want: torch.Tensor) -> None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    clicks = torch.tensor([[[30.0, 40.0]], [[70.0, 80.0]], [[0.0, 0.0]]])
    mixed = Prompts(
        point_coords=clicks,
        point_labels=torch.tensor([[1], [1], [-1]]),
        boxes=torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [10.0, 20.0, 300.0, 400.0]]),
        has_box=torch.tensor([False, False, True]),
    )
    sparse, _ = embed_prompts(pe, mixed)
    assert sparse.shape[1] == 2
    for row in range(2):
        ref, _ = pe(points=(clicks[row : row + 1], torch.tensor([[1]])), boxes=None, masks=None)
        rounding_close(sparse[row : row + 1], ref)
    ref, _ = pe(points=None, boxes=mixed.boxes[2:], masks=None)
    rounding_close(sparse[2:], ref)
    fix = torch.tensor([[[5.0, 6.0]], [[7.0, 8.0]], [[50.0, 60.0]]])
    after = mixed.add_points(fix, torch.tensor([[0], [1], [1]]))
    sparse, _ = embed_prompts(pe, after)
    assert sparse.shape[1] == 3
    for row in range(2):
        pts = (torch.cat([clicks[row : row + 1], fix[row : row + 1]], 1), after.point_labels[row : row + 1])
        ref, _ = pe(points=pts, boxes=None, masks=None)
        rounding_close(sparse[row : row + 1], ref)
    ref, _ = pe(points=(fix[2:], torch.tensor([[1]])), boxes=mixed.boxes[2:], masks=None)
    rounding_close(sparse[2:], ref)
    coords, labels = clicks[:1], torch.tensor([[1]])
    # without box slots, SAM's own padding (evaluation and the Predictor), and a mask prompt as SAM embeds it
    low = torch.randn(1, 1, 256, 256)
    no_slots = Prompts(point_coords=coords, point_labels=labels, boxes=None, has_box=None, mask_input=low)
    sparse, dense = embed_prompts(pe, no_slots)
    ref, ref_dense = pe(points=(coords, labels), boxes=None, masks=low)
    torch.testing.assert_close(sparse, ref, rtol=0, atol=0)
    torch.testing.assert_close(dense, ref_dense, rtol=0, atol=0)


def test_one_decoder_call_with_uneven_object_counts_matches_sam_per_image(sam):
    """3 images with 1, 4 and 2 objects: one transformer call on all 7, each equal to SAM's own decoder."""
    torch.manual_seed(0)
    emb = torch.randn(3, 256, 64, 64)
    counts = [1, 4, 2]
    index = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    xy = torch.rand(7, 2) * 600
    boxes = torch.cat([xy, xy + 100 + torch.rand(7, 2) * 200], 1)
    prompts = Prompts(
        point_coords=torch.zeros(7, 0, 2),
        point_labels=torch.zeros(7, 0, dtype=torch.long),
        boxes=boxes,
        has_box=torch.ones(7, dtype=torch.bool),
    )
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder)
    calls = []
    hook = sam.mask_decoder.transformer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            masks, iou = model(emb, index, prompts)
    finally:
        hook.remove()
    assert calls == [7]  # ONE decoder call holding every object of every image
    assert masks.shape == (7, 4, 256, 256) and iou.shape == (7, 4)
    with torch.no_grad():
        for i in range(3):
            sel = index == i
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[sel], masks=None)
            ref_m, ref_i = sam.mask_decoder(
                emb[i : i + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense, True
            )
            torch.testing.assert_close(masks[sel, 1:], ref_m, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[sel, 1:], ref_i, rtol=1e-4, atol=1e-4)


def test_tutorial_threshold_normalize_mse_has_zero_gradient():
    """The tutorial loss MSE(normalize(threshold(x, 0, 0)), gt) cannot train; MSE on sigmoid probs can."""
    import kernels

    torch.manual_seed(0)
    logits = torch.randn(1, 1, 64, 64, requires_grad=True)
    gt = (torch.rand(1, 1, 256, 256) > 0.5).float()
    up = F.interpolate(logits, (256, 256), mode="bilinear", align_corners=False)
    tutorial = F.mse_loss(F.normalize(F.threshold(up, 0.0, 0.0)), gt)
    (grad,) = torch.autograd.grad(tutorial, logits)
    assert tutorial.item() > 0.1  # the loss is far from zero...
    assert grad.abs().max().item() < 1e-9  # ...yet nothing flows back
    ours = kernels.mask_losses(logits[:, 0], gt[:, 0].bool(), torch.tensor([[256, 256]])).mse.mean()
    (grad,) = torch.autograd.grad(ours, logits)
    assert grad.abs().max().item() > 1e-6


def test_lora_starts_unchanged_and_merges_exactly():
    sam = build_sam("vit_tiny", seed=1)
    torch.manual_seed(0)
    q = torch.randn(2, 5, 256)
    attn = sam.mask_decoder.transformer.layers[0].self_attn
    before = attn(q, q, q)
    n = add_lora(sam.mask_decoder.transformer, rank=4, alpha=8)
    assert n == 4 * 7  # 7 attention blocks in SAM's two-way transformer, 4 projections each
    torch.testing.assert_close(attn(q, q, q), before)
    for name in ("q_proj", "v_proj"):
        torch.nn.init.normal_(getattr(attn, name).lora_b)
    adapted = attn(q, q, q)
    assert not torch.allclose(adapted, before)
    merge_lora(sam.mask_decoder.transformer)
    assert isinstance(attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(attn(q, q, q), adapted, rtol=1e-5, atol=1e-5)
    assert set(sam.state_dict()) == set(build_sam("vit_tiny").state_dict())  # SAM's own keys after merge


def test_prompts_from_masks_and_corrective_click():
    masks = torch.zeros(3, 1024, 1024, dtype=torch.bool)
    masks[0, 100:200, 100:300] = True
    masks[1, 500:520, 600:640] = True
    masks[2, 0:50, 0:50] = True
    boxes = torch.tensor([[100.0, 100, 300, 200], [600, 500, 640, 520], [0, 0, 50, 50]])
    valid = torch.tensor([[800, 1024], [800, 1024], [800, 1024]])
    from trainer.config import PromptConfig

    cfg = PromptConfig(box_fraction=0.0, pos_points=2, neg_points=1)
    g = step_generator(0, 0, 0, torch.device("cpu"))
    p = initial_prompts(masks, boxes, valid, cfg, g)
    xy, lab = p.point_coords.long(), p.point_labels
    for i in range(3):
        for k in range(3):
            inside = bool(masks[i, xy[i, k, 1], xy[i, k, 0]])
            assert inside == (lab[i, k].item() == 1), (i, k)
    again = initial_prompts(masks, boxes, valid, cfg, step_generator(0, 0, 0, torch.device("cpu")))
    assert torch.equal(again.point_coords, p.point_coords)  # a pure function of (seed, step, rank)
    # a prediction that misses object 0 entirely and is perfect on object 2
    low = torch.full((3, 256, 256), -10.0)
    low[2, :13, :13] = 10.0
    low[1, 100:200, 100:200] = 10.0  # false positives only
    q = corrective_click(p, low, masks, valid, g, mask_prompt_prob=1.0)
    assert q.point_labels[0, -1] == 1 and q.point_labels[1, -1] == 0
    assert q.mask_input.shape == (3, 1, 256, 256) and q.has_mask.all()
    assert corrective_click(p, low, masks, valid, g, mask_prompt_prob=0.0).mask_input is None
    # the mask prompt is drawn per object with the configured probability (600 small objects)
    small = torch.zeros(600, 32, 32, dtype=torch.bool)
    small[:, 4:20, 4:20] = True
    half = corrective_click(
        Prompts(
            point_coords=torch.zeros(600, 0, 2),
            point_labels=torch.zeros(600, 0, dtype=torch.long),
            boxes=torch.tensor([[4.0, 4, 20, 20]]).repeat(600, 1),
            has_box=torch.ones(600, dtype=torch.bool),
        ),
        torch.full((600, 256, 256), -10.0),
        small,
        torch.tensor([[32, 32]]).repeat(600, 1),
        g,
        mask_prompt_prob=0.5,
    )
    assert 0.4 < half.has_mask.float().mean() < 0.6
    # prompts.click_restart: a share of the box starts becomes a click start, the rest keep their correction
    r = restart_with_click(half, small, 0.5, g)
    restarted = half.has_box & ~r.has_box
    assert 0.4 < restarted.float().mean() < 0.6
    assert torch.equal(single_point(r), restarted) and not (r.has_mask & restarted).any()
    xy = r.point_coords[restarted, -1].long()
    assert small[restarted][torch.arange(len(xy)), xy[:, 1], xy[:, 0]].all()  # the click is inside the object
    kept = ~restarted
    assert torch.equal(r.point_labels[kept], half.point_labels[kept]) and torch.equal(
        r.has_mask[kept], half.has_mask[kept]
    )
    clicks = dataclasses.replace(half, has_box=torch.zeros(600, dtype=torch.bool))
    assert torch.equal(restart_with_click(clicks, small, 1.0, g).point_labels, clicks.point_labels)


def test_farthest_interior_point():
    m = np.zeros((50, 80), bool)
    m[10:31, 30:51] = True  # 21 x 21 square: the centre (40, 20) is the one farthest pixel
    assert farthest_interior_point(m) == (40.0, 20.0)
    m = np.ones((10, 10), bool)  # touching the image border: the border counts as boundary
    x, y = farthest_interior_point(m)
    assert 4 <= x <= 5 and 4 <= y <= 5


def test_instance_loss_multimask_backprops_the_min_loss_mask():
    from trainer.config import LossConfig
    from trainer.losses import instance_loss

    target = torch.zeros(2, 1024, 1024, dtype=torch.bool)
    target[:, :512] = True
    logits = torch.full((2, 4, 256, 256), -5.0)
    logits[:, 2, :128] = 5.0  # multimask output 2 is right
    logits.requires_grad_(True)
    iou = torch.full((2, 4), 0.5, requires_grad=True)
    multimask = torch.tensor([True, False])  # object 0: a single click; object 1: a box
    valid = torch.tensor([[1024, 1024]] * 2)
    loss, logged = instance_loss(logits, iou, target, valid, LossConfig(), multimask)
    loss.backward()
    per_mask = logits.grad.abs().sum((2, 3))
    # the single click back-propagates only its least-loss multimask output...
    assert per_mask[0, 2] > 0 and per_mask[0, 0] == 0 and per_mask[0, 1] == 0 and per_mask[0, 3] == 0
    # ...the box trains output 0 alone, the one a box uses at inference
    assert per_mask[1, 0] > 0 and (per_mask[1, 1:] == 0).all()
    assert (iou.grad[0, 1:] != 0).all() and iou.grad[0, 0] == 0  # the IoU head learns on all three
    assert iou.grad[1, 0] != 0 and (iou.grad[1, 1:] == 0).all()
    # the logged IoU is of the chosen masks: object 0's output 2 (perfect) and object 1's output 0 (empty)
    assert abs(float(logged["iou"]) - 0.5) < 1e-6


def test_instance_loss_weight_scales_each_objects_gradient():
    from trainer.config import LossConfig
    from trainer.losses import instance_loss

    torch.manual_seed(0)
    target = torch.rand(2, 256, 256) > 0.5
    raw = torch.randn(2, 4, 256, 256)
    valid = torch.tensor([[256, 256]] * 2)
    multimask = torch.tensor([True, False])
    grads = []
    for weight in (None, torch.tensor([0.25, 1.0])):
        logits, iou = raw.clone().requires_grad_(True), torch.full((2, 4), 0.5, requires_grad=True)
        instance_loss(logits, iou, target, valid, LossConfig(bce=1.0), multimask, weight)[0].backward()
        grads.append((logits.grad, iou.grad))
    (plain, plain_iou), (weighted, weighted_iou) = grads
    torch.testing.assert_close(weighted[0], 0.25 * plain[0])  # the click start: a quarter of its gradient
    torch.testing.assert_close(weighted[1], plain[1])  # the box start: unchanged
    torch.testing.assert_close(weighted_iou, plain_iou * torch.tensor([[0.25], [1.0]]))


def test_interactive_loss_sums_every_round_and_trains_output_0(sam, tmp_path):
    """Every round's loss counts: with one corrective round the loss is the sum of two rounds' losses, and
    a box-only batch gets gradient through output 0 in both rounds and never through the multimask outputs."""
    from trainer.config import Config, LossConfig, PromptConfig
    from trainer.data import Batch
    from trainer.decoder import PromptedDecoder
    from trainer.instance import InstanceTask

    torch.manual_seed(0)
    masks = torch.zeros(2, 1024, 1024, dtype=torch.bool)
    masks[0, 100:300, 200:400] = True
    masks[1, 500:700, 500:600] = True
    batch = SimpleNamespace(
        embeddings=torch.randn(1, 256, 64, 64),
        image_index=torch.zeros(2, dtype=torch.long),
        masks=masks,
        boxes=torch.tensor([[200.0, 100, 400, 300], [500, 500, 600, 700]]),
        valid_hw=torch.tensor([[1024, 1024]] * 2),
        targets=None,
    )
    batch.prompt_masks = lambda: Batch.prompt_masks(batch)
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder)
    seen = []
    model.mask_decoder.output_upscaling.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    accel = SimpleNamespace(unwrap_model=lambda m: m)

    def loss_of(
        rounds: int,
        box_fraction: float = 1.0,
        point_start: float = 1.0,
        point_refine: float = 1.0,
        click_restart: float = 0.0,
    ):
        prob = 0.5 if rounds else 0.0
        prompts = PromptConfig(
            box_fraction=box_fraction,
            corrective_rounds=rounds,
            mask_prompt_prob=prob,
            click_restart=click_restart,
        )
        loss = LossConfig(focal=0, dice=1, bce=1, point_start=point_start, point_refine=point_refine)
        g = step_generator(0, 0, 0, torch.device("cpu"))
        return InstanceTask(Config(prompts=prompts, loss=loss)).loss(model, batch, g, accel)

    seen.clear()
    one, _ = loss_of(0)
    two, logged = loss_of(1)
    assert seen == [2, 2, 2]  # one batched decoder call per round
    # the first round's loss is in the sum, not replaced by the last round's
    assert float(two.detach()) > float(one.detach()) * 1.5
    assert "iou_first" in logged and "iou_last" in logged
    # loss.point_start weighs the click starts' loss in every round and leaves the box starts' alone
    clicks = float(loss_of(1, box_fraction=0.0)[0].detach())
    assert float(loss_of(1, box_fraction=0.0, point_start=0.25)[0].detach()) == pytest.approx(0.25 * clicks)
    assert float(loss_of(1, point_start=0.25)[0].detach()) == pytest.approx(float(two.detach()))
    # loss.point_refine weighs only the click starts' corrective rounds: 0 leaves their first round alone...
    first = float(loss_of(0, box_fraction=0.0)[0].detach())
    assert float(loss_of(1, box_fraction=0.0, point_refine=0.0)[0].detach()) == pytest.approx(first)
    half = float(loss_of(1, box_fraction=0.0, point_refine=0.5)[0].detach())
    assert half == pytest.approx(first + 0.5 * (clicks - first))
    assert float(loss_of(1, point_refine=0.0)[0].detach()) == pytest.approx(float(two.detach()))
    # ...and no click-only prompt trains output 0, the box's output
    sam.zero_grad()
    loss_of(1, box_fraction=0.0, point_refine=0.0)[0].backward()
    w = model.mask_decoder.output_hypernetworks_mlps
    assert float(w[0].layers[-1].weight.grad.abs().sum()) == 0.0
    assert sum(float(w[i].layers[-1].weight.grad.abs().sum()) for i in (1, 2, 3)) > 0
    sam.zero_grad()
    two.backward()
    w = model.mask_decoder.output_hypernetworks_mlps
    assert w[0].layers[-1].weight.grad.abs().sum() > 0
    for i in (1, 2, 3):
        grad = w[i].layers[-1].weight.grad
        assert grad is None or grad.abs().sum() == 0
    # prompts.click_restart: the box starts' second round is a lone click, trained on the multimask outputs
    sam.zero_grad()
    restarted, _ = loss_of(1, click_restart=1.0)
    assert float(restarted.detach()) != pytest.approx(float(two.detach()))
    restarted.backward()
    assert sum(float(w[i].layers[-1].weight.grad.abs().sum()) for i in (1, 2, 3)) > 0
    assert w[0].layers[-1].weight.grad.abs().sum() > 0  # from the box round
    # data.targets: coverage: the loss reads the batch's coverage (255 where the mask is: the same loss),
    # the prompts still the bool masks
    batch.targets = masks.to(torch.uint8) * 255
    assert float(loss_of(1)[0].detach()) == pytest.approx(float(two.detach()), rel=1e-6)
    batch.targets = masks.to(torch.uint8) * 200
    assert float(loss_of(1)[0].detach()) != pytest.approx(float(two.detach()), rel=1e-3)


def test_decode_output_tokens_override(sam):
    """The semantic head reuses decode() with its own tokens: shapes follow the token count."""
    emb = torch.randn(2, 256, 64, 64)
    tokens = torch.randn(5, 256)
    sparse = torch.zeros(2, 0, 256)
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, 64, 64)
    with torch.no_grad():
        hs, up = decode(
            sam.mask_decoder, emb, torch.arange(2), sam.prompt_encoder.get_dense_pe(), sparse, dense, tokens
        )
        assert hs.shape == (2, 5, 256) and up.shape == (2, 32, 256, 256)
        hs, up = decode(
            sam.mask_decoder, emb, torch.arange(2), sam.prompt_encoder.get_dense_pe(), sparse, dense
        )
        masks, iou = instance_head(sam.mask_decoder, hs, up)
        assert masks.shape == (2, 4, 256, 256)


def test_batch_targets_are_pasted_from_crops_exactly(tmp_path):
    """Pasting box crops on the device gives exactly the cache's input-frame masks, uneven sizes included."""
    from embedcache.build import BuildConfig, build_cache
    from embedcache.cache import open_cache
    from embedcache.synthetic import make_dataset
    from trainer.data import ImageStore, _scatter_crops, paste_crops, read_batch

    data = make_dataset(tmp_path / "data", n_images=3, seed=5, max_objects=5)
    build_cache(BuildConfig(data=data, out=tmp_path / "c.zarr", model_type="vit_tiny", progress=False))
    cache = open_cache(tmp_path / "c.zarr")
    store = ImageStore(cache, "stream", torch.device("cpu"))
    images = np.arange(cache.num_images)
    batch = read_batch(store, images, k=3, seed=0, epoch=0).to(torch.device("cpu"))
    want = cache.masks(batch.object_ids.numpy(), "input")
    assert batch.masks.shape == want.shape and batch.mask_pixels.numel() < want.size
    assert torch.equal(batch.masks, torch.from_numpy(want))
    scattered = torch.zeros_like(batch.masks)  # the CUDA path, run on the host
    widths = batch.mask_boxes[:, 2] - batch.mask_boxes[:, 0]
    areas = widths * (batch.mask_boxes[:, 3] - batch.mask_boxes[:, 1])
    _scatter_crops(scattered, batch.mask_pixels, batch.mask_boxes, widths, areas)
    assert torch.equal(scattered, batch.masks)
    no_objects = paste_crops(torch.zeros(0, dtype=torch.uint8), torch.zeros(0, 4, dtype=torch.int64), 256)
    assert no_objects.shape == (0, 256, 256)
    assert batch.targets is None  # the nearest rule's batch: the loss reads masks
    # data.targets: coverage: the coverage crops pasted, on the host and by the device path
    soft = read_batch(store, images, k=3, seed=0, epoch=0, coverage=True).to(torch.device("cpu"))
    assert torch.equal(soft.masks, batch.masks) and soft.targets.dtype == torch.uint8
    for k, j in enumerate(soft.object_ids.tolist()):
        (x1, y1, x2, y2), crop = cache.input_coverage_crop(j)
        want_k = np.zeros((cache.image_size,) * 2, np.uint8)
        want_k[y1:y2, x1:x2] = crop
        assert np.array_equal(soft.targets[k].numpy(), want_k)
    assert ((soft.targets > 0) != soft.masks).any()  # the two frames differ on the edges
    scattered = torch.zeros_like(soft.targets)
    widths = soft.target_boxes[:, 2] - soft.target_boxes[:, 0]
    areas = widths * (soft.target_boxes[:, 3] - soft.target_boxes[:, 1])
    _scatter_crops(scattered, soft.target_pixels, soft.target_boxes, widths, areas)
    assert torch.equal(scattered, soft.targets)
    # clicks come from the pixels at least half covered; an object with none keeps its nearest-rule mask
    assert torch.equal(batch.prompt_masks(), batch.masks)
    assert torch.equal(soft.prompt_masks(), soft.targets >= 128)
    soft.targets[0] = soft.targets[0].clamp(max=127)
    assert torch.equal(soft.prompt_masks()[0], soft.masks[0]) and soft.masks[0].any()
    assert torch.equal(soft.prompt_masks()[1:], soft.targets[1:] >= 128)
    # the training reader follows data.targets: coverage by default, nearest gives the old batches
    from trainer.data import Prefetcher

    jobs = [(0, images[:2])]
    for choice, has in (("coverage", True), ("nearest", False)):
        cfg = load_config(None, [f"data.targets={choice}"]).data
        (read,) = Prefetcher(store, jobs, cfg, seed=0, semantic=False, pin=False)
        assert (read.targets is not None) == has and torch.equal(
            read.masks, read_batch(store, images[:2], 8, 0, 0).to(torch.device("cpu")).masks
        )
    assert load_config(None, []).data.targets == "coverage"
    with pytest.raises(ValueError, match=r"data.targets must be one of coverage\|nearest, got 'soft'"):
        load_config(None, ["data.targets=soft"])


def _hardest_candidates(tmp_path, *overrides: str):
    """The config (max_objects 2 of hardest_of 5) and the one micro-batch of candidates of a 3-image vit_tiny
    cache whose images have 8, 9 and 1 objects."""
    from embedcache.build import BuildConfig, build_cache
    from embedcache.cache import open_cache
    from embedcache.synthetic import make_dataset
    from trainer.data import ImageStore, Prefetcher

    data = make_dataset(tmp_path / "data", n_images=3, seed=1, max_objects=10)
    build_cache(BuildConfig(data=data, out=tmp_path / "c.zarr", model_type="vit_tiny", progress=False))
    cache = open_cache(tmp_path / "c.zarr")
    store = ImageStore(cache, "stream", torch.device("cpu"))
    cfg = load_config(None, ["data.max_objects=2", "data.hardest_of=5", *overrides])
    (batch,) = Prefetcher(store, [(0, np.arange(3))], cfg.data, seed=0, semantic=False, pin=False)
    has = [hi - lo for lo, hi in map(cache.object_range, range(3))]
    counts = np.bincount(batch.image_index.numpy(), minlength=3)
    assert counts.tolist() == [min(n, 5) for n in has] == [5, 5, 1]  # the candidates, not max_objects
    return cfg, batch


def test_hardest_objects_keep_each_images_lowest_box_iou(sam, tmp_path):
    """data.hardest_of: the reader draws N objects an image, and the loss trains the max_objects of each image
    the model segments worst from their boxes, with their own masks, crops and coverage."""
    from trainer.data import paste_crops
    from trainer.instance import InstanceTask, hardest_objects

    cfg, batch = _hardest_candidates(tmp_path)
    counts = np.bincount(batch.image_index.numpy(), minlength=3)
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder)
    kept = hardest_objects(model, batch, 2)
    # each object's box IoU on its own, one image at a time
    iou = []
    for k in range(batch.num_objects):
        b = int(batch.image_index[k])
        one = Prompts(
            point_coords=torch.zeros(1, 0, 2),
            point_labels=torch.zeros(1, 0, dtype=torch.long),
            boxes=batch.boxes[k : k + 1],
            has_box=torch.ones(1, dtype=torch.bool),
        )
        with torch.no_grad():
            logits = model(batch.embeddings[b : b + 1], torch.zeros(1, dtype=torch.long), one).logits[0, 0]
        pred = F.interpolate(logits[None, None], batch.targets.shape[1:], mode="bilinear")[0, 0] > 0
        vh, vw = batch.valid_hw[k].tolist()
        pred, target = pred[:vh, :vw], batch.targets[k, :vh, :vw] >= 128  # the soft targets' foreground
        iou.append(float((pred & target).sum() / (pred | target).sum()))
    iou, image = np.array(iou), batch.image_index.numpy()
    want = sorted(k for b in range(3) for k in np.flatnonzero(image == b)[np.argsort(iou[image == b])[:2]])
    rows = [int(np.flatnonzero(batch.object_ids.numpy() == j)[0]) for j in kept.object_ids.tolist()]
    assert rows == want
    assert np.array_equal(np.bincount(kept.image_index.numpy(), minlength=3), np.minimum(counts, 2))
    # the kept objects carry their own masks, coverage and crops (pasting the crops gives them back)
    assert torch.equal(kept.masks, batch.masks[rows]) and torch.equal(kept.targets, batch.targets[rows])
    assert torch.equal(paste_crops(kept.mask_pixels, kept.mask_boxes, kept.side), kept.masks)
    pasted = paste_crops(kept.target_pixels, kept.target_boxes, kept.side, torch.uint8)
    assert torch.equal(pasted, kept.targets)
    assert torch.equal(kept.embeddings, batch.embeddings)
    # the task's loss is the kept objects' loss, and prompts/s counts them
    task = InstanceTask(cfg)
    accel = SimpleNamespace(unwrap_model=lambda m: m)
    plain = InstanceTask(load_config(None, ["data.max_objects=2"]))
    loss, _ = task.loss(model, batch, step_generator(0, 0, 0, torch.device("cpu")), accel)
    want_loss, _ = plain.loss(model, kept, step_generator(0, 0, 0, torch.device("cpu")), accel)
    assert float(loss.detach()) == float(want_loss.detach())
    assert task.prompts_in(batch) == kept.num_objects and plain.prompts_in(batch) == batch.num_objects
    # refused: a pool no larger than max_objects, and the tasks without prompted objects
    pool = r"data.hardest_of must be 0 \(off\) or more than data.max_objects \(8\), got 8"
    with pytest.raises(ValueError, match=pool):
        load_config(None, ["data.hardest_of=8"])
    picks = "data.hardest_of picks prompted objects.*model.task={}.*configs/ais.yaml"
    with pytest.raises(ValueError, match=picks.format("ais")):
        load_config(None, ["model.task=ais", "data.hardest_of=16"])
    with pytest.raises(ValueError, match=picks.format("semantic")):
        load_config(DEFAULT_CONFIG, ["model.task=semantic", "loss.ce=1"])  # the default trains the hardest


def test_hardest_box_starts_leave_the_clicks_to_ordinary_objects(sam, tmp_path):
    """data.hardest_starts=box: an image's box slots take its lowest box IoUs, its click slots random others;
    box_fraction 1 keeps what hardest_objects keeps; the draw is the generator's, and the loss uses it."""
    from trainer.instance import (
        InstanceTask,
        box_iou_now,
        box_start_rows,
        hardest_box_starts,
        hardest_objects,
    )

    cfg, batch = _hardest_candidates(tmp_path, "data.hardest_starts=box", "prompts.box_fraction=0.5")
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder)
    iou, index = box_iou_now(model, batch), batch.image_index
    image = index.numpy()
    assert len(set(iou[index == 0].tolist())) == 5  # distinct IoUs: the hardest are well defined
    picked, n_box = {0: set(), 1: set()}, {0: set(), 1: set()}
    for s in range(24):
        rows, has_box = box_start_rows(iou, index, 3, 2, 0.5, torch.Generator().manual_seed(s))
        assert rows.tolist() == sorted(rows.tolist()) and has_box.shape == rows.shape
        assert np.bincount(image[rows], minlength=3).tolist() == [2, 2, 1]
        for b in range(3):
            mine = [int(r) for r in rows if image[r] == b]
            boxed = [int(r) for r, hb in zip(rows, has_box) if hb and image[r] == b]
            ranked = np.flatnonzero(image == b)[np.argsort(iou[index == b].numpy(), kind="stable")].tolist()
            assert boxed == sorted(ranked[: len(boxed)])  # the box starts are the hardest
            if b < 2:
                picked[b].update(set(mine) - set(boxed))
                n_box[b].add(len(boxed))
        again = box_start_rows(iou, index, 3, 2, 0.5, torch.Generator().manual_seed(s))
        assert torch.equal(again[0], rows) and torch.equal(again[1], has_box)
    # both slot kinds were drawn, and the click starts came from more than the two hardest
    assert n_box[0] == n_box[1] == {0, 1, 2} and len(picked[0]) > 2 and len(picked[1]) > 2
    kept, has_box = hardest_box_starts(model, batch, 2, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(kept.object_ids, hardest_objects(model, batch, 2).object_ids) and bool(has_box.all())
    # the task trains exactly the objects and starts hardest_box_starts draws from the step's generator
    real, calls = model.forward, []

    def spy(embeddings, image_index, prompts, **kw):
        calls.append((image_index.clone(), prompts.has_box.clone()))
        return real(embeddings, image_index, prompts, **kw)

    kept, has_box = hardest_box_starts(model, batch, 2, 0.5, step_generator(0, 0, 0, torch.device("cpu")))
    model.forward = spy
    task = InstanceTask(cfg)
    task.loss(model, batch, step_generator(0, 0, 0, torch.device("cpu")), SimpleNamespace(unwrap_model=None))
    (_, all_boxes), (trained_images, trained_starts) = calls  # the IoU pass, then the rounds
    assert bool(all_boxes.all()) and len(all_boxes) == batch.num_objects
    assert torch.equal(trained_images, kept.image_index) and torch.equal(trained_starts, has_box)
    assert task.prompts_in(batch) == kept.num_objects
    with pytest.raises(ValueError, match=r"data.hardest_starts must be one of all\|box, got 'clicks'"):
        load_config(None, ["data.hardest_starts=clicks"])


def test_config_without_a_model_takes_the_caches(tmp_path):
    """The default recipe names no model: a random-init cache gives its type and seed, an official
    checkpoint's sha256 gives its name, and a file's own value wins over the cache's."""
    from embedcache.weights import OFFICIAL
    from trainer.config import model_from_cache

    def cache(model_type: str, ck: str):
        return SimpleNamespace(signature={"model_type": model_type, "checkpoint": ck})

    under = model_from_cache(cache("vit_tiny", "random-init:7"))
    cfg = load_config(DEFAULT_CONFIG, under=under)
    assert (cfg.model.model_type, cfg.model.checkpoint, cfg.model.init_seed) == ("vit_tiny", None, 7)
    assert cfg.prompts.corrective_rounds == 1  # the recipe itself is the file's
    lite = OFFICIAL["lite_medsam"]
    cfg = load_config(DEFAULT_CONFIG, under=model_from_cache(cache("lite_medsam", lite.sha256)))
    assert (cfg.model.model_type, cfg.model.checkpoint) == ("lite_medsam", "lite_medsam")
    named = tmp_path / "c.yaml"
    named.write_text("model:\n  model_type: vit_b\n  checkpoint: vit_b\n")
    cfg = load_config(named, ["model.init_seed=3"], under=under)
    assert (cfg.model.model_type, cfg.model.checkpoint, cfg.model.init_seed) == ("vit_b", "vit_b", 3)
