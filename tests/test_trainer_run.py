"""End-to-end trainer checks on a generated dataset and a random-init ``vit_tiny`` cache, on CPU.

Runs are tiny (a few images, 1-2 objects per image, tens of steps) to keep the file near two minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embedcache import open_cache
from embedcache.build import BuildConfig, build_cache
from embedcache.models import build_sam
from embedcache.synthetic import make_dataset
from trainer import checkpoint as ckpt
from trainer.cli import main
from trainer.config import load_config
from trainer.data import ImageStore, read_batch
from trainer.evaluate import predict_objects
from trainer.model import build_start_sam, tuned_sam
from trainer.session import lr_factor
from trainer.train import run

# small and quick: 2 images x at most 2 objects per step, no evaluation or checkpoints unless a test asks
FAST = [
    "data.max_objects=2",
    "data.images_per_batch=2",
    "run.eval_every=0",
    "run.save_every=0",
    "run.overlays=0",
]
# what learns fastest from a random init in a few dozen steps: BCE + dice at a high learning rate (SAM's
# focal:dice 20:1 first drives a random decoder to empty masks; it gets there, but in hundreds of steps)
LEARN = ["loss.focal=0", "loss.bce=1", "optim.lr=1e-3", "optim.warmup=0.1"]


def _cfg(*overrides):
    return load_config(None, [*FAST, *overrides])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("trainer_data") / "data", n_images=8, seed=0)


@pytest.fixture(scope="module")
def cache_path(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trainer_cache") / "train.zarr"
    build_cache(
        BuildConfig(
            data=data_dir, out=out, model_type="vit_tiny", device="cpu", val_fraction=0.25, progress=False
        )
    )
    return out


@pytest.fixture(scope="module")
def trained(cache_path, tmp_path_factory) -> Path:
    """One short run that learns: 30 steps, evaluated at the start and end, 1 overlay, checkpoint at 30."""
    out = tmp_path_factory.mktemp("trainer_runs") / "trained"
    cfg = _cfg(*LEARN, "run.steps=30", "run.save_every=30", "run.overlays=1")
    run(cache_path, cfg, out, progress=False)
    return out


def test_lr_scale_reaches_the_optimiser(cache_path, tmp_path):
    """``optim.lr_scale``: a module at factor 0 keeps its starting weights while the rest learn, and the
    checkpointed optimiser ran each group at its factor times the scheduled rate."""
    out = tmp_path / "scaled"
    scale = "optim.lr_scale={mask_decoder.transformer: 0, prompt_encoder: 0.5}"
    cfg = _cfg(*LEARN, "run.steps=3", "run.save_every=3", "model.train_prompt_encoder=true", scale)
    run(cache_path, cfg, out, progress=False)
    start = build_start_sam(cfg)
    after = load_file(ckpt.step_dir(out, 3) / "model.safetensors")
    for name, p in start.mask_decoder.named_parameters():
        moved = not torch.equal(after[f"mask_decoder.{name}"], p.detach())
        assert moved != name.startswith("transformer."), name
    groups = torch.load(ckpt.step_dir(out, 3) / "optimizer.bin", weights_only=True)["param_groups"]
    last = cfg.optim.lr * lr_factor(2, cfg.optim, 3)
    groups = sorted(groups, key=lambda g: g["lr_scale"])
    assert [g["lr_scale"] for g in groups] == [0, 0.5, 1]
    assert [g["lr"] for g in groups] == pytest.approx([0, last / 2, last])


def test_loss_falls_and_val_box_miou_beats_start(trained):
    rows = [json.loads(ln) for ln in (trained / "losses.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30
    # the schedule reaches the optimiser: warm-up then cosine per step (a constant learning rate fails here),
    # and the checkpointed optimiser ran its last step at the last scheduled rate
    optim = load_config(trained / "config.yaml").optim
    want = [optim.lr * lr_factor(r["step"] - 1, optim, 30) for r in rows]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12)
    saved = torch.load(trained / "checkpoints" / "step_0000030" / "optimizer.bin", weights_only=True)
    assert [g["lr"] for g in saved["param_groups"]] == pytest.approx([want[-1]] * len(saved["param_groups"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    metrics = json.loads((trained / "metrics.json").read_text())
    start, tuned = metrics["start"], metrics["tuned"]
    assert set(start) == set(tuned) == {"box", "point"}
    assert tuned["box"]["n_objects"] == start["box"]["n_objects"] > 0
    assert tuned["box"]["miou"] > start["box"]["miou"] + 0.15, metrics
    # the run leaves its figures, best checkpoint and step checkpoint behind
    assert (trained / "loss_curve.png").stat().st_size > 0
    assert len(list((trained / "overlays").glob("*.png"))) == 1
    assert (trained / "best" / "model.safetensors").is_file()
    assert [s for s, _ in ckpt.list_checkpoints(trained)] == [30]
    assert load_config(trained / "checkpoints" / "step_0000030" / "config.yaml").run.steps == 30


def test_export_round_trip_matches_sam_predictor(trained, cache_path, data_dir, tmp_path):
    from segment_anything import SamPredictor

    out = tmp_path / "sam_tuned.pth"
    assert main(["export", str(trained), "--out", str(out), "--which", "last"]) == 0
    sam = build_sam("vit_tiny", out)  # strict load of a full SAM state dict
    ref = build_sam("vit_tiny")
    for k, v in ref.image_encoder.state_dict().items():  # the frozen encoder is the starting one
        assert torch.equal(sam.image_encoder.state_dict()[k], v), k
    cfg = load_config(trained / "config.yaml")
    _, tuned = tuned_sam(cfg, ckpt.resolve_weights(trained, "last"))
    cache = open_cache(cache_path)
    store = ImageStore(cache, "host", torch.device("cpu"))
    image = int(cache.image_indices("val")[0])
    ours = predict_objects(tuned, store, image, "box", torch.device("cpu"))
    lo, hi = cache.object_range(image)
    predictor = SamPredictor(sam)
    # 1) on the cached embedding: exactly SamPredictor.predict(box=...)
    predictor.reset_image()
    predictor.features = torch.from_numpy(cache.read_embeddings([image])).float()
    predictor.original_size = tuple(int(v) for v in cache.original_size[image])
    predictor.input_size = tuple(int(v) for v in cache.input_size[image])
    predictor.is_image_set = True
    for j, mask in zip(range(lo, hi), ours):
        theirs, _, _ = predictor.predict(box=cache.objects.box[j], multimask_output=False)
        assert np.array_equal(theirs[0], mask), f"object {j}: {np.sum(theirs[0] != mask)} pixels differ"
    # 2) from the image, through the exported (frozen) encoder: float32 vs the cache's float16 embedding
    from PIL import Image

    predictor.set_image(
        np.asarray(Image.open(data_dir / "images" / f"{cache.image_id[image]}.png").convert("RGB"))
    )
    for j, mask in zip(range(lo, hi), ours):
        theirs, _, _ = predictor.predict(box=cache.objects.box[j], multimask_output=False)
        agree = (theirs[0] & mask).sum() / max((theirs[0] | mask).sum(), 1)
        assert agree > 0.98, (j, agree)


def _eval_last(cache_path: Path, run_dir: Path, out: Path) -> None:
    """``trainer eval`` of ``run_dir``'s last checkpoint into ``out``; it must exit 0."""
    assert (
        main(
            ["eval", "--cache", str(cache_path), "--run", str(run_dir), "--which", "last", "--out", str(out)]
        )
        == 0
    )


def _summary(per_prompt: dict) -> dict:
    """A model's eval metrics without the per-object lists, which ``trainer eval`` adds to the run's own."""
    return {p: {k: v for k, v in m.items() if k not in ("object_ids", "ious")} for p, m in per_prompt.items()}


def test_eval_command_writes_start_and_tuned_metrics(trained, cache_path, tmp_path):
    _eval_last(cache_path, trained, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # against an independent reference: the exported model in SamPredictor on the cached embeddings, and
    # each box IoU counted here by hand against the stored original-frame mask
    from segment_anything import SamPredictor

    assert main(["export", str(trained), "--out", str(tmp_path / "tuned.pth"), "--which", "last"]) == 0
    predictor = SamPredictor(build_sam("vit_tiny", tmp_path / "tuned.pth"))
    cache = open_cache(cache_path)
    box = metrics["tuned"]["box"]
    assert box["n_objects"] == len(box["object_ids"]) > 0
    for j, iou in zip(box["object_ids"], box["ious"]):
        image = int(cache.objects.image_index[j])
        predictor.features = torch.from_numpy(cache.read_embeddings([image])).float()
        predictor.original_size = tuple(int(v) for v in cache.original_size[image])
        predictor.input_size = tuple(int(v) for v in cache.input_size[image])
        predictor.is_image_set = True
        mask = predictor.predict(box=cache.objects.box[j], multimask_output=False)[0][0]
        truth = cache.masks([j], "original")[0]
        union = np.count_nonzero(mask | truth)
        assert iou == pytest.approx(np.count_nonzero(mask & truth) / union if union else 1.0, abs=1e-12), j
    final = json.loads((trained / "metrics.json").read_text())
    assert _summary(metrics["tuned"]) == final["tuned"]  # the same numbers as the run's own last evaluation
    assert _summary(metrics["start"]) == final["start"]
    for m in metrics["tuned"].values():  # one IoU per object, and the quantiles are theirs
        assert len(m["ious"]) == len(m["object_ids"]) == m["n_objects"]
        assert m["miou"] == pytest.approx(np.mean(m["ious"]))
        assert m["iou_quantiles"]["0.5"] == pytest.approx(np.median(m["ious"]))
    assert len(list((tmp_path / "overlays").glob("*.png"))) >= 1
    assert (tmp_path / "iou_distributions.png").is_file()
    assert "| tuned | box |" in (tmp_path / "table.md").read_text()


def test_eval_clicks_round_0_is_todays_score_and_deterministic(trained, cache_path, tmp_path):
    """``--clicks N``: a click curve per model and start whose round 0 is exactly the plain box and point
    score, N + 1 entries, NoC within 1..N + 1, the same rounds again on a second run with fewer clicks; the
    table and figure."""
    args = ["eval", "--cache", str(cache_path), "--run", str(trained), "--which", "last", "--overlays", "0"]
    assert main([*args, "--clicks", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--clicks", "2", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for model in ("start", "tuned"):  # deterministic: the shorter run's rounds are the longer run's first
        for start in ("box_clicks", "point_clicks"):
            assert b[model][start]["miou"] == a[model][start]["miou"][:3]
    final = json.loads((trained / "metrics.json").read_text())
    for model in ("start", "tuned"):
        for start in ("box", "point"):
            curve = a[model][f"{start}_clicks"]
            assert len(curve["miou"]) == 4
            assert curve["miou"][0] == pytest.approx(final[model][start]["miou"], abs=1e-12)
            assert 1 <= curve["noc85"] <= 4 and curve["noc85"] <= curve["noc90"] <= 4
    # the clicks reach the model (this random-init model is not trained to use them: no direction asserted)
    assert len(set(a["tuned"]["box_clicks"]["miou"])) > 1
    table = (tmp_path / "a" / "table.md").read_text()
    assert "| tuned | box |" in table and "| tuned | point |" in table and "NoC85" in table
    assert (tmp_path / "a" / "clicks.png").stat().st_size > 0
    # without the mask prompt the corrective rounds differ, round 0 does not
    assert main([*args, "--clicks", "3", "--out", str(tmp_path / "c"), "--no-mask-prompt"]) == 0
    c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert c["tuned"]["box_clicks"]["miou"][0] == a["tuned"]["box_clicks"]["miou"][0]
    assert c["tuned"]["box_clicks"]["miou"][1:] != a["tuned"]["box_clicks"]["miou"][1:]


def test_eval_checkpoint_run_folder_is_its_tuned_model(trained, cache_path, tmp_path):
    """``--checkpoint RUN`` scores the run's tuned model alone, under the folder's name."""
    args = ["eval", "--cache", str(cache_path), "--checkpoint", str(trained), "--which", "last"]
    assert main([*args, "--out", str(tmp_path), "--overlays", "0"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    final = json.loads((trained / "metrics.json").read_text())
    assert [k for k in metrics if k not in ("split", "cache")] == [trained.name]
    assert _summary(metrics[trained.name]) == final["tuned"]


def test_resume_gives_the_same_losses_and_weights(cache_path, tmp_path):
    """Stop at step 2 (mid-epoch), resume to 4: identical per-step losses and final weights, on CPU (with
    two optimiser parameter groups, and each image's hardest object of two)."""
    common = [
        "data.images_per_batch=1",
        "data.max_objects=1",
        "data.hardest_of=2",  # the kept object depends on the weights the resumed step starts from
        "run.steps=4",
        "run.save_every=2",
        "run.val_max_images=1",
        "prompts.box_fraction=0.5",
        "prompts.corrective_rounds=1",
        "prompts.mask_prompt_prob=0.5",
        "optim.grad_accum=2",
        "optim.lr_scale={mask_decoder.output_upscaling: 3}",  # two parameter groups to restore
    ]
    run(cache_path, _cfg(*common), tmp_path / "a", progress=False)
    run(cache_path, _cfg(*common, "run.stop_at=2"), tmp_path / "b", progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [2]
    state = json.loads((ckpt.step_dir(tmp_path / "b", 2) / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 4)  # 6 micro-batches per epoch
    run(cache_path, _cfg(*common), tmp_path / "b", resume=True, progress=False)
    rows_a = [json.loads(ln) for ln in (tmp_path / "a" / "losses.jsonl").read_text().splitlines()]
    rows_b = [json.loads(ln) for ln in (tmp_path / "b" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    wa = load_file(ckpt.step_dir(tmp_path / "a", 4) / "model.safetensors")
    wb = load_file(ckpt.step_dir(tmp_path / "b", 4) / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(FileExistsError, match="--resume"):  # never silently restart over a run
        run(cache_path, _cfg(*common), tmp_path / "b", progress=False)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(
    cache_path, tmp_path, monkeypatch, capsys
):
    from trainer.instance import InstanceTask

    real = InstanceTask.loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, logged = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), logged

    monkeypatch.setattr(InstanceTask, "loss", poisoned)
    out = tmp_path / "nan"
    args = [
        "run",
        "--cache",
        str(cache_path),
        "--out",
        str(out),
        *FAST,
        "data.images_per_batch=1",
        "data.max_objects=1",
        "run.steps=4",
        "run.save_every=2",
        "run.val_max_images=1",
    ]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 3" in err and "step_0000002" in err
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    state = json.loads((ckpt.step_dir(out, 2) / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert load_file(ckpt.step_dir(out, 2) / "model.safetensors")  # intact and readable


def test_refuses_a_cache_from_another_model(cache_path, tmp_path, capsys):
    out = tmp_path / "wrong"
    assert (
        main(
            ["run", "--cache", str(cache_path), "--out", str(out), "model.init_seed=1", *FAST, "run.steps=1"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "checkpoint" in err and str(cache_path) in err
    assert not (out / "checkpoints").exists()


def test_residency_modes_read_the_same_batch(cache_path):
    cache = open_cache(cache_path)
    images = cache.image_indices("train")[:2]
    a = read_batch(ImageStore(cache, "stream", torch.device("cpu")), images, 3, 0, 0)
    host = ImageStore(cache, "host", torch.device("cpu"))
    read_batch(host, images, 3, 0, 0)
    b = read_batch(host, images, 3, 0, 0)  # second read from RAM
    for name in ("embeddings", "image_index", "mask_pixels", "mask_boxes", "boxes", "valid_hw", "object_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    counts = [cache.object_range(int(i))[1] - cache.object_range(int(i))[0] for i in images]
    assert a.num_objects == sum(min(c, 3) for c in counts)  # uneven counts kept, capped at K


@pytest.mark.slow  # two accelerate processes on gloo, 20 s on 2 cores
def test_two_processes_with_accelerate_launch(cache_path, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA the trainer picks CPU and
        # gloo. (`--cpu --num_processes 2` starts ONE process in accelerate 1.x unless given an MPI hostfile.)
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "trainer",
        "run",
        "--cache",
        str(cache_path),
        "--out",
        str(out),
        *FAST,
        "data.max_objects=1",
        "run.steps=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trainer: 2 process(es)" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    cache = open_cache(cache_path)
    n_val = sum(np.subtract(*cache.object_range(int(i))[::-1]) for i in cache.image_indices("val"))
    assert metrics["tuned"]["box"]["n_objects"] == n_val  # gathered from both ranks, no object twice
    # one process re-evaluating the same weights gets the same numbers
    _eval_last(cache_path, out, tmp_path / "e")
    assert _summary(json.loads((tmp_path / "e" / "metrics.json").read_text())["tuned"]) == metrics["tuned"]


def _semantic_cache(tmp_path: Path) -> tuple[Path, Path]:
    """``(data, cache)``: 5 synthetic semantic images (background + 3 shape kinds), one held out."""
    data = make_dataset(tmp_path / "sem", n_images=5, seed=1, kind="semantic")
    cache = tmp_path / "sem.zarr"
    build_cache(
        BuildConfig(
            data=data,
            out=cache,
            model_type="vit_tiny",
            device="cpu",
            mask_kind="semantic",
            val_fraction=0.2,
            progress=False,
        )
    )
    return data, cache


def test_semantic_mode_trains_and_exports(tmp_path):
    from trainer.semantic import SemanticSegmenter
    from trainer.tuned import load_tuned, sidecar_path

    data, cache = _semantic_cache(tmp_path)
    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "semantic.yaml"
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--cache",
                str(cache),
                "--config",
                str(cfg_path),
                "--out",
                str(out),
                "model.model_type=vit_tiny",
                "model.checkpoint=null",
                "data.images_per_batch=2",
                "run.steps=2",
                "run.eval_every=0",
                "run.save_every=0",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tuned"]) == {"semantic"} and metrics["tuned"]["semantic"]["n_images"] == 1
    assert load_config(out / "config.yaml").model.num_classes == 4  # background + 3 shape kinds
    exported = tmp_path / "sem.pth"
    assert main(["export", str(out), "--out", str(exported)]) == 0
    assert sidecar_path(exported, "semantic").is_file()
    build_sam("vit_tiny", exported)  # the SAM part loads strictly
    seg = SemanticSegmenter(load_tuned(exported))
    from PIL import Image

    image = np.asarray(Image.open(sorted((data / "images").glob("*.png"))[0]).convert("RGB"))
    labels = seg.predict(image)
    assert labels.shape == image.shape[:2] and labels.max() < 4


@pytest.mark.slow
def test_semantic_mode_learns_the_foreground_classes(tmp_path):
    """A semantic run that learns: validation mIoU over the foreground classes goes from the start's 0 (its
    class tokens are equal, so every pixel ties to background) to well above it. An all-background predictor
    scores 0 here. 30 steps: ~3 min on 2 loaded cores (20 steps reached 0.37, 40 steps 0.93)."""
    data, cache = _semantic_cache(tmp_path)
    cfg = Path(__file__).resolve().parents[1] / "configs" / "semantic.yaml"
    args = ["run", "--cache", str(cache), "--config", str(cfg), "--out", str(tmp_path / "run")]
    args += ["model.model_type=vit_tiny", "model.checkpoint=null", "data.images_per_batch=2"]
    args += ["run.steps=30", "run.eval_every=0", "run.save_every=0", "optim.lr=1e-3", "optim.warmup=0"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    start, tuned = metrics["start"]["semantic"], metrics["tuned"]["semantic"]
    assert start["miou"] == 0.0, start
    assert tuned["miou"] > 0.3 and min(tuned["per_class_iou"][1:]) > 0, tuned


def test_lora_only_run_exports_merged_sam(cache_path, tmp_path):
    out = tmp_path / "lora"
    cfg = _cfg(
        "model.lora_rank=4",
        "model.train_mask_decoder=false",
        "optim.lr=1e-3",
        "optim.warmup=0",
        "data.images_per_batch=1",
        "data.max_objects=1",
        "run.steps=2",
        "run.val_max_images=1",
    )
    run(cache_path, cfg, out, progress=False)
    weights = load_file(ckpt.resolve_weights(out, "last"))
    assert any("lora_a" in k for k in weights)
    exported = tmp_path / "lora.pth"
    assert main(["export", str(out), "--out", str(exported), "--which", "last"]) == 0
    tuned, start = build_sam("vit_tiny", exported).state_dict(), build_sam("vit_tiny").state_dict()
    assert set(tuned) == set(start)  # merged: SAM's own keys, nothing else
    changed = {k for k in start if not torch.equal(tuned[k], start[k])}
    assert changed and all(k.startswith("mask_decoder.transformer.") and "_proj.weight" in k for k in changed)


def test_run_summary_warns_when_tuning_lowered_a_score(capsys):
    from trainer.cli import _print_metrics

    def scores(box: float, point: float) -> dict:
        return {t: {"miou": v, "dice": v, "n_objects": 3} for t, v in (("box", box), ("point", point))}

    _print_metrics({"start": scores(0.9, 0.1), "tuned": scores(0.8, 0.5)})
    out = capsys.readouterr().out
    assert "warning: the tuned model is below the starting model" in out and "(box mIoU)" in out
    _print_metrics({"start": scores(0.7, 0.1), "tuned": scores(0.8, 0.5)})
    assert "warning" not in capsys.readouterr().out
