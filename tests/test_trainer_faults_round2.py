"""Trainer faults of issue 18 (items 3, 8, 11-15): one writer per run folder, config keys written twice or
non-finite, unwritable folders, export into a folder or past a file-size limit, damaged checkpoint files, bad
config files, and Ctrl-C; each is a named error (exit 2, one line, no traceback) or a safe stop (exit 130)."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_embedcache_support import REPO, cli_build_cmd, tiny_dataset

from trainer import checkpoint as ckpt
from trainer.cli import main
from trainer.config import load_config

# one image and one object per micro-batch: each step is a few ms of decoder work
TINY = ["data.images_per_batch=1", "data.max_objects=1", "run.overlays=0", "run.val_max_images=2"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A config file of the dataclass defaults (vit_tiny, random init): no weights to fetch."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text("# the dataclass defaults\n{}\n")
    return path


def _argv(cache: Path, out: Path, recipe: Path, *overrides: str) -> list[str]:
    return ["run", "--cache", str(cache), "--config", str(recipe), "--out", str(out), *TINY, *overrides]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """``trainer`` in this process; returns (exit status, stderr); its stdout stays in ``capsys``."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    sys.stdout.write(out)
    return rc, err


def _one_line_error(err: str) -> str:
    """The error line of a named error: one line, no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("trainer ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(reference, recipe, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 and a ``best/``."""
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = _argv(reference[1], out, recipe, "run.steps=4", "run.save_every=2", "run.eval_every=2")
    assert main(argv) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4] and (out / "best").is_dir()
    return out


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _trainer(*args: str, **kw) -> subprocess.Popen:
    """``python -m trainer ...`` in a child process with Ctrl-C's default handling."""
    return _interruptible([sys.executable, "-m", "trainer", *args], **kw)


def _interruptible(cmd: list[str], **kw) -> subprocess.Popen:
    """``cmd`` in a child process with Ctrl-C's default handling, its stderr piped as text."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until ``path`` exists while ``proc`` still runs (so a signal sent next lands mid-work)."""
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"finished before {path} appeared: {proc.stderr.read()}"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the signal could land"


# ---- item 3: one writer per run folder ----


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(reference, recipe, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(reference[1], out, recipe, "run.steps=100000", "run.save_every=0", "run.eval_every=0")
    holder = _trainer(*argv)
    try:
        _wait_for(out / "config.yaml", holder)
        rc, err = _cli(capsys, *_argv(reference[1], out, recipe, "run.steps=2"))
        assert rc == 2, err
        line = _one_line_error(err)
        assert f"{out}: another trainer run is writing this run folder (pid {holder.pid} on host" in line
        assert holder.poll() is None  # the holder was running all along
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    # the OS released the killed holder's lock: a new run takes the folder
    rc, err = _cli(capsys, *_argv(reference[1], out, recipe, "run.steps=2", "run.eval_every=0"))
    assert rc == 0, err


def test_a_sweep_trial_folder_held_by_another_process_is_refused(reference, recipe, tmp_path, capsys):
    out = tmp_path / "sweep"
    trial = out / "trials" / "tiny_lr0.001"
    hold = (
        "import contextlib, pathlib, time; from trainer.session import run_folder_lock; "
        f"held = contextlib.ExitStack(); run_folder_lock(pathlib.Path({str(trial)!r}), held); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["sweep", "--cache", str(reference[1]), "--config", str(recipe), "--out", str(out)]
        rc, err = _cli(capsys, *argv, "--lr", "1e-3", "--min-steps", "1", *TINY, "run.steps=2")
        assert rc == 2, err
        assert (
            f"{trial}: another trainer run is writing this run folder (pid {holder.pid}"
            in _one_line_error(err)
        )
    finally:
        holder.kill()
        holder.communicate()


# ---- item 8: a key written twice, non-finite numbers ----


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim:\n  lr: 1.0e-3\n  lr: 1.0e-4\n", "optim.lr is written twice (lines 2 and 3)"),
        ("optim:\n  lr: 1.0e-3\nrun:\n  steps: 2\noptim:\n  warmup: 0\n", "section 'optim' is written twice"),
    ],
    ids=["key", "section"],
)
def test_a_key_written_twice_is_refused_naming_file_section_and_key(tmp_path, text, message):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_config(path)


@pytest.mark.parametrize(
    "override",
    [
        "optim.weight_decay=.inf",
        "optim.clip_norm=.inf",
        "optim.betas=[0.9, .nan]",
        "loss.focal_gamma=.nan",
        "prompts.box_jitter=.inf",
        "model.lora_alpha=.inf",
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(override):
    field = override.partition("=")[0]
    with pytest.raises(ValueError, match=f"^{field} must be finite"):
        load_config(None, [override])


# ---- item 14: a scalar section, a folder, a file that is not UTF-8, a negative seed ----


@pytest.mark.parametrize(
    "kind, message",
    [
        ("scalar-section", "{path}: section 'optim' is 5, not a mapping of fields"),
        ("folder", "{path} is a folder; --config takes a YAML file"),
        ("not-utf8", "{path}: not UTF-8 text (byte 0xe9 on line 3); save it as UTF-8"),
        ("seed", "run.seed must be >= 0, got -1"),
    ],
    ids=["scalar-section", "folder", "not-utf8", "seed"],
)
def test_bad_config_files_and_fields_are_one_line_errors(reference, tmp_path, capsys, kind, message):
    path = tmp_path / "cfg.yaml"
    overrides = []
    if kind == "scalar-section":
        path.write_text("run:\n  steps: 2\noptim: 5\n")
    elif kind == "folder":
        path = tmp_path / "configs"
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"run:\n  steps: 2\n# caf\xe9\n")
    else:
        path.write_text("{}\n")
        overrides = ["run.seed=-1"]
    rc, err = _cli(capsys, *_argv(reference[1], tmp_path / "run", path, *overrides))
    assert rc == 2 and message.format(path=path) in _one_line_error(err), err
    assert not (tmp_path / "run").exists()


# ---- item 11: an unwritable folder ----


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder nobody may write to: a read-only tmpfs (root ignores permission bits), else mode 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("command", ["run", "eval", "export"])
def test_an_unwritable_folder_is_named_with_the_fix(
    reference, recipe, finished_run, read_only, capsys, command
):
    target = read_only / "out"
    if command == "run":
        argv = _argv(reference[1], target, recipe, "run.steps=2")
    elif command == "eval":
        argv = ["eval", "--cache", str(reference[1]), "--run", str(finished_run), "--out", str(target)]
    else:
        argv = ["export", str(finished_run), "--out", str(target / "sam.pth")]
    rc, err = _cli(capsys, *argv)
    assert rc == 2, err
    line = _one_line_error(err)
    assert f"{read_only} is not writable" in line and "pick an --out in a writable folder" in line, line


# ---- item 12: export into a folder, export past a file-size limit ----


def test_export_onto_an_existing_folder_is_a_named_error(finished_run, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    rc, err = _cli(capsys, "export", str(finished_run), "--out", str(folder))
    assert rc == 2, err
    assert f"--out {folder} is a folder; name the .pth file to write" in _one_line_error(err)
    assert list(folder.iterdir()) == []


def test_export_under_a_file_size_limit_leaves_no_temp_file(finished_run, tmp_path):
    out = tmp_path / "exports" / "sam.pth"
    out.parent.mkdir()

    def limit():  # 256 KiB: far below a vit_tiny SAM, far above anything else the export writes
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))

    r = subprocess.run(
        [sys.executable, "-m", "trainer", "export", str(finished_run), "--out", str(out)],
        cwd=REPO,
        env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert r.returncode == 2, r.stderr
    line = _one_line_error(r.stderr)
    assert f"{out}: writing failed (File too large)" in line and "ulimit -f" in line, line
    assert list(out.parent.iterdir()) == []  # neither the .pth nor a .tmp-*.pth


# ---- item 13: damaged checkpoint files ----

RESUME = ["run.steps=6", "run.save_every=2", "run.eval_every=2"]


def _damage(folder: Path, name: str) -> Path:
    path = folder / name
    if name == "trainer_state.json":
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "step": str(state["step"])}))
    else:
        _truncate(path)
    return path


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors", "trainer_state.json"])
def test_resume_falls_back_past_a_damaged_checkpoint_saying_so(
    reference, recipe, finished_run, tmp_path, capsys, name
):
    out = _copy_run(finished_run, tmp_path)
    bad = _damage(ckpt.step_dir(out, 4), name)
    rc, err = _cli(capsys, *_argv(reference[1], out, recipe, *RESUME), "--resume")
    assert rc == 0, err
    said = capsys.readouterr().out
    assert f"--resume: {bad}: damaged" in said, said
    assert f"resuming from the previous good checkpoint {ckpt.step_dir(out, 2)}" in said, said
    rows = [json.loads(ln) for ln in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 trained again from step 2
    assert ckpt.damage_in(ckpt.step_dir(out, 4)) is None  # and step 4 written whole again


def test_resume_with_every_checkpoint_damaged_is_a_named_error(
    reference, recipe, finished_run, tmp_path, capsys
):
    out = _copy_run(finished_run, tmp_path)
    bad = _damage(ckpt.step_dir(out, 4), "optimizer.bin")
    _damage(ckpt.step_dir(out, 2), "model.safetensors")
    rc, err = _cli(capsys, *_argv(reference[1], out, recipe, *RESUME), "--resume")
    assert rc == 2, err
    line = _one_line_error(err)
    assert f"--resume: {bad}: damaged or truncated" in line and "no earlier good checkpoint" in line, line


@pytest.mark.parametrize("command", ["export", "eval"])
@pytest.mark.parametrize("which", ["best", "4"])
def test_damaged_weights_are_named_with_the_previous_good_checkpoint(
    reference, finished_run, tmp_path, capsys, command, which
):
    out = _copy_run(finished_run, tmp_path)
    bad = _damage(out / "best" if which == "best" else ckpt.step_dir(out, 4), "model.safetensors")
    good = 4 if which == "best" else 2
    if command == "export":
        argv = ["export", str(out), "--out", str(tmp_path / "sam.pth"), "--which", which]
    else:
        argv = ["eval", "--cache", str(reference[1]), "--run", str(out), "--which", which]
    rc, err = _cli(capsys, *argv)
    assert rc == 2, err
    line = _one_line_error(err)
    assert f"{bad}: damaged or truncated" in line, line
    assert f"pass --which {good} ({ckpt.step_dir(out, good)})" in line, line
    assert not (tmp_path / "sam.pth").exists()


@pytest.mark.parametrize("command", ["export", "eval"])
def test_which_a_folder_without_the_runs_config_is_a_named_error(
    reference, finished_run, tmp_path, capsys, command
):
    out = _copy_run(finished_run, tmp_path)
    loose = tmp_path / "averaged"  # weights made outside trainer run, e.g. a mean of checkpoints
    loose.mkdir()
    shutil.copy(ckpt.step_dir(out, 4) / "model.safetensors", loose)
    if command == "export":
        argv = ["export", str(out), "--out", str(tmp_path / "sam.pth"), "--which", str(loose)]
    else:
        argv = ["eval", "--cache", str(reference[1]), "--run", str(out), "--which", str(loose)]
    rc, err = _cli(capsys, *argv)
    assert rc == 2, err
    line = _one_line_error(err)
    assert f"{loose}: no config.yaml beside model.safetensors" in line, line
    assert "copy the run's config.yaml there" in line, line
    assert not (tmp_path / "sam.pth").exists() and not (out / "eval").exists()
    shutil.copy(ckpt.step_dir(out, 4) / "config.yaml", loose)  # the fix the message names
    rc, err = _cli(capsys, *argv)
    assert rc == 0, err


# ---- item 15: Ctrl-C ----


def test_ctrl_c_during_a_run_says_what_is_safe_and_resume_continues(reference, recipe, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(reference[1], out, recipe, "run.steps=100000", "run.save_every=2", "run.eval_every=0")
    proc = _trainer(*argv)
    _wait_for(ckpt.step_dir(out, 2), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = _one_line_error(err)
    assert line.startswith(
        "trainer run: interrupted; complete checkpoints are safe (last: "
    ) and line.endswith("continue with the same command plus --resume"), line
    last = ckpt.latest_checkpoint(out)
    assert f"(last: {last})" in line and ckpt.damage_in(last) is None
    steps = int(last.name.split("_")[1])
    rc, err = _cli(
        capsys, *argv[:-3], f"run.steps={steps + 1}", "run.save_every=2", "run.eval_every=0", "--resume"
    )
    assert rc == 0, err


@pytest.mark.slow  # about 40 s on 2 cores: a 40-image build interrupted and rerun
def test_ctrl_c_during_a_build_says_what_is_safe_and_a_rerun_resumes(tmp_path):
    from embedcache import open_cache
    from embedcache.verify import shard_file

    data = tiny_dataset(tmp_path / "data", n_images=40)
    out = tmp_path / "c.zarr"
    cmd = cli_build_cmd(data, out, "--no-progress")
    proc = _interruptible(cmd)
    _wait_for(shard_file(out, 0), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"embedcache build: interrupted; finished shards of {out} are kept (a shard is whole or absent); "
        "rerun the same command to resume"
    ), err
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert open_cache(out).num_images == 40


# ---- the build's --channels, honoured where the trainer reads images again ----


def test_overlays_read_images_with_the_builds_channel_mapping(tmp_path):
    import numpy as np
    import tifffile
    from PIL import Image

    from trainer.plots import overlay

    image = np.zeros((2, 16, 16), np.uint16)
    image[1] = 4000  # the second channel carries the picture; the first is dark
    tifffile.imwrite(tmp_path / "two.tif", image, photometric="minisblack", planarconfig="separate")
    gt = [np.zeros((16, 16), bool)]
    mapped = overlay(
        gt, gt, gt, tmp_path / "mapped.png", image_path=str(tmp_path / "two.tif"), channels=(1, 1, 1)
    )
    grey = overlay(gt, gt, gt, tmp_path / "grey.png", image_path=str(tmp_path / "two.tif"))
    assert not np.array_equal(np.asarray(Image.open(mapped)), np.asarray(Image.open(grey)))
