"""Trainer faults (issue 10, items 8, 14, 15, 16, 18, 19): a broken cache, a full disk, wrong config values
and ``--resume`` without a run are clear errors; and SIGKILL at random moments, then ``--resume``, gives the
uninterrupted run's losses and weights."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_embedcache_support import REPO, sigkill_mid_work

from embedcache.verify import shard_file
from trainer import checkpoint as ckpt
from trainer.cli import main
from trainer.config import DEFAULT_CONFIG, load_config, model_from_cache
from trainer.train import run

# one image and one object per micro-batch, no evaluation: each step is a few ms of decoder work
TINY = ["data.images_per_batch=1", "data.max_objects=1", "run.eval_every=0", "run.overlays=0"]


def _run(cache: Path, out: Path, *overrides: str, resume: bool = False) -> tuple[int, str]:
    """``trainer run`` in this process; returns (exit status, stderr)."""
    argv = ["run", "--cache", str(cache), "--out", str(out), *TINY, *overrides]
    with contextlib.redirect_stderr(buf := _Buffer()):
        rc = main([*argv, "--resume"] if resume else argv)
    return rc, buf.text


class _Buffer:
    """A minimal text stream for redirect_stderr."""

    def __init__(self):
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def _copy(ref: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad.zarr"
    shutil.copytree(ref, bad)
    return bad


# ---- item 8 and item 14 (trainer side): a cache with a deleted or corrupt file ----


def test_a_deleted_shard_file_is_refused_naming_it(reference, tmp_path):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    shard_file(bad, 1).unlink()
    rc, err = _run(bad, tmp_path / "run", "run.steps=2")
    assert rc == 2 and f"{shard_file(bad, 1)}: shard file missing" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("where", ["shard", "objects/area", "objects/mask_bits"])
def test_a_corrupt_chunk_is_an_error_naming_the_file_not_a_traceback(reference, tmp_path, where):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    f = shard_file(bad, 0) if where == "shard" else bad / where / "c" / "0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    f.write_bytes(bytes(raw))
    rc, err = _run(bad, tmp_path / "run", "run.steps=6", "run.save_every=0")
    assert rc == 2 and "Traceback" not in err, err
    assert (str(f) if where == "shard" else str(bad / where)) in err and "unreadable" in err, err


# ---- item 15 (trainer side): a full disk while checkpointing ----


def test_disk_full_while_checkpointing_says_so_and_names_the_last_checkpoint(
    reference, tmp_path, monkeypatch
):
    _, ref = reference
    import accelerate

    real = accelerate.Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: step 4
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    rc, err = _run(ref, out, "run.steps=6", "run.save_every=2")
    assert rc == 2, err
    assert (
        f"{out}/checkpoints/.tmp-step_0000004: writing the checkpoint failed: the disk holding {out} is full"
        in err
    )
    assert f"last complete checkpoint: {ckpt.step_dir(out, 2)}" in err
    assert not ckpt.step_dir(out, 4).with_name(".tmp-step_0000004").exists()  # the partial folder is gone
    monkeypatch.undo()
    assert _run(ref, out, "run.steps=6", "run.save_every=2", resume=True)[0] == 0  # space freed: resumes
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 6]


def test_really_full_disk_while_checkpointing(reference, tmp_path):
    """A real tmpfs too small for one checkpoint: torch reports `enforce fail at inline_container.cc`."""
    _, ref = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        rc, err = _run(ref, disk / "run", "run.steps=2", "run.save_every=2")
        assert rc == 2 and "Traceback" not in err, err
        assert (
            f"the disk holding {disk / 'run'} is full" in err and "last complete checkpoint: none" in err
        ), err
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        rc, err = _run(ref, disk / "run", "run.steps=2", "run.save_every=2", resume=True)
        assert rc == 0, err
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---- items 16 and 18: config values of the wrong type, bad YAML, overrides after the options ----


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", "optim.lr='abc': expected a number"),
        ("optim.lr=[1,2]", "optim.lr=[1, 2]: expected a number"),
        ("model.train_mask_decoder=maybe", "model.train_mask_decoder='maybe': expected true or false"),
        ("run.steps=2.5", "run.steps=2.5: expected an integer"),
        ("optim.betas=[0.9]", "optim.betas=[0.9]: expected a list of 2 values"),
        ("optim.lr=[1,", "override 'optim.lr=[1,': the value is not valid YAML"),
    ],
    ids=["lr-abc", "lr-list", "bool-maybe", "steps-2.5", "betas-short", "yaml-override"],
)
def test_wrong_type_override_is_a_named_error(reference, tmp_path, override, message):
    _, ref = reference
    rc, err = _run(ref, tmp_path / "run", override)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1e-4\nrun:\n  steps: 3\n")
    with pytest.raises(ValueError, match=rf"{bad}: not valid YAML (?s:.*)line 3"):
        load_config(bad)


def test_overrides_may_follow_the_options(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "run"
    config = tmp_path / "small.yaml"
    config.write_text("run:\n  steps: 5\noptim:\n  lr: 1.0e-3\n")
    argv = ["run", "--cache", str(ref), "--out", str(out), *TINY, "run.steps=1", "--config", str(config)]
    argv += ["run.save_every=1", "optim.lr=2e-4"]  # after --config too
    assert main(argv) == 0
    saved = load_config(ckpt.step_dir(out, 1) / "config.yaml")
    assert (saved.run.steps, saved.optim.lr) == (1, 2e-4)
    with pytest.raises(SystemExit):  # anything else unknown is still refused
        main([*argv, "--no-such-flag"])


# ---- item 19: --resume without a run to resume ----


def test_resume_of_a_missing_or_empty_folder_is_refused(reference, tmp_path):
    _, ref = reference
    for out in (tmp_path / "missing", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        rc, err = _run(ref, out, "run.steps=1", resume=True)
        assert rc == 2 and f"--resume: {out} is not a run folder" in err, err
        assert not (out / "config.yaml").exists()


def test_resume_of_a_run_stopped_before_its_first_checkpoint_says_so(reference, tmp_path, capsys):
    _, ref = reference
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("# a run killed before its first save\n")
    rc, _ = _run(ref, out, "run.steps=1", resume=True)
    assert (
        rc == 0 and f"--resume: {out} has no checkpoint yet; starting from step 0" in capsys.readouterr().out
    )


# ---- kill and resume: SIGKILL at a random moment, then --resume, equals the uninterrupted run ----

KILL_RUN = [*TINY, "run.steps=8", "run.save_every=2", "prompts.box_fraction=0.5"]


def _kill_config(cache: Path):
    """The config ``trainer run`` builds from KILL_RUN without ``--config``: the default recipe, the cache's
    model."""
    from embedcache import open_cache

    return load_config(DEFAULT_CONFIG, KILL_RUN, under=model_from_cache(open_cache(cache)))


@pytest.fixture(scope="module")
def uninterrupted(reference, tmp_path_factory) -> Path:
    _, ref = reference
    out = tmp_path_factory.mktemp("trainer_kill") / "ref"
    run(ref, _kill_config(ref), out, progress=False)
    return out


def _logged_steps(out: Path) -> int:
    f = out / "losses.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _kill_at_random_and_resume(cache: Path, reference_run: Path, out: Path, rng: np.random.Generator) -> None:
    """SIGKILL ``trainer run`` once ``after`` steps are logged (0: during setup) and a random few ms more,
    check the signal killed it mid-run (not after it exited), then resume in this process."""
    cmd = [sys.executable, "-m", "trainer", "run", "--cache", str(cache), "--out", str(out), *KILL_RUN]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = int(rng.integers(0, 7))  # of 8 steps: at least the last step and its checkpoint are still to come

    def logged() -> bool:
        return (out / "config.yaml").exists() and _logged_steps(out) >= after

    sigkill_mid_work(proc, logged, rng, f"step {after} was logged", within=0.05)
    assert not (ckpt.step_dir(out, 8) / "model.safetensors").exists()
    run(cache, _kill_config(cache), out, resume=True, progress=False)
    want = [json.loads(ln)["loss"] for ln in (reference_run / "losses.jsonl").read_text().splitlines()]
    got = [json.loads(ln)["loss"] for ln in (out / "losses.jsonl").read_text().splitlines()]
    assert got == want
    wa = load_file(ckpt.step_dir(reference_run, 8) / "model.safetensors")
    wb = load_file(ckpt.step_dir(out, 8) / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("trial", range(2))
def test_sigkill_at_a_random_moment_then_resume(reference, uninterrupted, tmp_path, trial, seed):
    _kill_at_random_and_resume(reference[1], uninterrupted, tmp_path / "run", np.random.default_rng(seed))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_at_random_moments_then_resume_many(reference, uninterrupted, tmp_path, trial, seed):
    _kill_at_random_and_resume(reference[1], uninterrupted, tmp_path / "run", np.random.default_rng(seed))
