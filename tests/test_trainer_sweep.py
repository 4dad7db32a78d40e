"""``trainer sweep``: successive halving over learning rates on held-out training images, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedcache import open_cache
from embedcache.build import BuildConfig, build_cache
from embedcache.synthetic import make_dataset
from trainer import checkpoint as ckpt
from trainer.cli import main
from trainer.config import DEFAULT_CONFIG, load_config
from trainer.sweep import holdout_split, rungs, sweep

FAST = [
    "model.model_type=vit_tiny",
    "model.checkpoint=null",
    "data.images_per_batch=1",
    "data.max_objects=2",
    "data.residency=host",
    "loss.focal=0",
    "loss.bce=1",
    "run.steps=2",
    "run.save_every=0",
]


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    data = make_dataset(tmp_path_factory.mktemp("sweep_data") / "data", n_images=6, seed=1)
    out = tmp_path_factory.mktemp("sweep_cache") / "c.zarr"
    build_cache(
        BuildConfig(data=data, out=out, model_type="vit_tiny", device="cpu", val_fraction=0.2, progress=False)
    )
    return out


def test_rungs_and_holdout(cache_path):
    assert rungs(100, 25, 3) == [25, 75, 100]
    assert rungs(4, 1, 2) == [1, 2, 4]
    cache = open_cache(cache_path)
    train = cache.image_indices("train")
    kept, held = holdout_split(cache, train, 0.25)
    assert len(held) == round(0.25 * len(train)) and not set(kept) & set(held)
    assert sorted([*kept, *held]) == sorted(train)
    assert not set(held) & set(cache.image_indices("val"))  # the cache's val split is never touched
    with pytest.raises(ValueError, match="holdout"):
        holdout_split(cache, train, 1.0)


def test_sweep_prunes_picks_and_resumes_exactly(cache_path, tmp_path, monkeypatch):
    """Three learning rates, rungs at 1 and 2 steps. The trials really train and validate; their score is
    replaced by a known function of the learning rate (a random-init model's scores say nothing), so the
    halving's decisions are known: the first trial is never stopped, the second is the best and runs on, the
    third is stopped at its first rung. A rerun of the same command replays the recorded rungs: the same
    decisions, nothing trained again."""
    import trainer.sweep as sweep_mod

    seen = []

    def known(metrics: dict, metric: str, task) -> float:
        seen.append(metrics["box"]["n_objects"])  # real validation metrics reach the scorer
        return -abs(np.log10(metrics["lr"]) + 3)

    def validate_with_lr(s):
        return {**real_validate(s), "lr": s.cfg.optim.lr}

    real_validate = sweep_mod.validate
    monkeypatch.setattr(sweep_mod, "score", known)
    monkeypatch.setattr(sweep_mod, "validate", validate_with_lr)
    out = tmp_path / "sw"
    args = ["sweep", "--cache", str(cache_path), "--out", str(out), "--lr", "1e-2,1e-3,1e-4"]
    args += ["--min-steps", "1", "--reduction", "2", "--holdout", "0.4", *FAST]
    assert main(args) == 0
    first = json.loads((out / "sweep.json").read_text())
    states = {t["trial"]: t["state"] for t in first["trials"]}
    assert states == {
        "default_lr0.01": "complete",
        "default_lr0.001": "complete",
        "default_lr0.0001": "stopped at 1",
    }
    assert first["best"] == "default_lr0.001" and first["rungs"] == [1, 2]
    assert min(seen) > 0
    best = load_config(out / "best.yaml")
    assert best.optim.lr == 1e-3 and best.run.steps == 2 and best.model.model_type == "vit_tiny"
    assert best.prompts.corrective_rounds == load_config(DEFAULT_CONFIG).prompts.corrective_rounds
    # the stopped trial trained one step only; beside its score, the box and point mIoU it was measured at
    state = json.loads(next(out.glob("trials/default_lr0.0001/checkpoints/*/trainer_state.json")).read_text())
    assert state["step"] == 1
    box, point = (state["evals"]["1"][k]["miou"] for k in ("box", "point"))
    row = f"| default_lr0.0001 | 0.0001 | -1.0000 | - | stopped at 1 | {box:.4f} / {point:.4f} |"
    assert row in (out / "table.md").read_text()
    # resume: every rung is read back from the trials' folders, nothing is trained again
    weights = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/checkpoints/*/model.safetensors")}
    (out / "sweep.json").unlink()
    seen.clear()
    assert main(args) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again["trials"] == first["trials"] and again["best"] == first["best"]
    assert {p: p.stat().st_mtime_ns for p in weights} == weights


def test_sweep_scores_other_tasks_by_their_own_number(cache_path, tmp_path):
    """An AIS sweep trains on the held-in images (its targets are built for them) and scores each trial by
    the head's validation mSA, as ``trainer run`` picks its best checkpoint; ``--metric`` is the instance
    task's and is refused here, as is a mix of tasks."""
    out = tmp_path / "ais"
    args = ["sweep", "--cache", str(cache_path), "--out", str(out), "--lr", "1e-3,1e-2"]
    # the default's hardest objects and decoder rates are the instance task's: the AIS task trains its head
    ais = [*FAST, "model.task=ais", "data.hardest_of=0", "optim.lr_scale={}"]
    args += ["--min-steps", "1", "--reduction", "2", "--holdout", "0.4", *ais]
    assert main(args) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["metric"] == "AIS mSA"
    for trial in summary["trials"]:
        for step, value in trial["scores"].items():
            folder = ckpt.step_dir(out / "trials" / trial["trial"], int(step))
            state = json.loads((folder / "trainer_state.json").read_text())
            assert value == state["evals"][step]["auto"]["msa"]
    table = (out / "table.md").read_text()
    assert "Validation AIS mSA on 40% of the training images" in table and "box / point" not in table
    assert load_config(out / "best.yaml").model.task == "ais"
    assert main([*args[:4], str(tmp_path / "m"), *args[5:], "--metric", "box"]) == 2  # said, nothing run
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="takes no --metric"):
        sweep(cache_path, [DEFAULT_CONFIG], ais, tmp_path / "m", lrs=[1], metric="box")
    other = tmp_path / "ais.yaml"
    other.write_text("model:\n  task: ais\n")
    with pytest.raises(ValueError, match="share model.task"):
        sweep(cache_path, [DEFAULT_CONFIG, other], FAST, tmp_path / "m", lrs=[1e-3])


def test_sweeps_run_apart_are_gathered_without_training(cache_path, tmp_path):
    """With one rung (``--min-steps`` = ``run.steps``) each rate can run as its own sweep, on its own
    machine; their trial folders copied into one ``--out`` and the whole command run there scores them
    together from their recorded rungs, training nothing, as one sweep of every rate would."""

    def run(out: Path, lrs: str) -> dict:
        args = ["sweep", "--cache", str(cache_path), "--out", str(out), "--lr", lrs]
        assert main([*args, "--min-steps", "2", "--reduction", "2", "--holdout", "0.4", *FAST]) == 0
        return json.loads((out / "sweep.json").read_text())

    apart = [run(tmp_path / f"apart{i}", lr)["trials"][0] for i, lr in enumerate(["1e-2", "1e-3"])]
    for i in range(2):
        shutil.copytree(tmp_path / f"apart{i}" / "trials", tmp_path / "all" / "trials", dirs_exist_ok=True)
    weights = {
        p: p.stat().st_mtime_ns for p in (tmp_path / "all").glob("trials/*/checkpoints/*/model.safetensors")
    }
    assert len(weights) == 2
    gathered = run(tmp_path / "all", "1e-2,1e-3")
    assert gathered["trials"] == apart
    assert gathered["best"] == max(apart, key=lambda t: t["scores"]["2"])["trial"]
    assert {p: p.stat().st_mtime_ns for p in weights} == weights
