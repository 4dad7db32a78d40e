"""Checkpoints named by step, written atomically: fill a hidden temp folder, then ``os.replace`` it into
place.

Layout of a run folder::

    OUT/config.yaml                 resolved config of the run
    OUT/checkpoints/step_0000200/   accelerate.save_state: model.safetensors, optimizer.bin, random_states_*
                                    + trainer_state.json (step, epoch, batch_in_epoch, ...) + config.yaml
    OUT/best/                       model.safetensors + config.yaml + metrics.json of the best val box mIoU
    OUT/losses.jsonl, OUT/metrics.json, OUT/loss_curve.png, OUT/overlays/*.png, OUT/logs/ (tensorboard)

A crash mid-write leaves only a ``.tmp-*`` folder, which is ignored and cleared by the next save, so the last
complete checkpoint is always intact.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d+)$")
FULL_DISK_BYTES = 1 << 20  # under 1 MiB free after a failed write: the disk was full


def step_dir(run: Path, step: int) -> Path:
    """``run/checkpoints/step_0000042``."""
    return Path(run) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def temp_dir_for(final: Path) -> Path:
    """A fresh hidden sibling of ``final`` to fill before ``commit``."""
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def commit(tmp: Path, final: Path) -> None:
    """Move a filled temp folder into place atomically (replacing an older folder of the same name)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the message names the folder, says whether the disk is full, and names
    the last complete checkpoint to ``--resume`` from."""


def write_failed(tmp: Path, run: Path, e: Exception) -> CheckpointWriteError:
    """The error to raise when filling ``tmp`` failed with ``e``; removes the useless partial folder.

    torch's zip writer reports a full disk as ``enforce fail at inline_container.cc`` with no errno, so the
    free space left is what tells a full disk apart.
    """
    free = shutil.disk_usage(run).free
    shutil.rmtree(tmp, ignore_errors=True)
    full = (
        getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or os.strerror(errno.ENOSPC) in str(e)  # safetensors' own error type carries only the text
        or free < FULL_DISK_BYTES
    )
    why = f"the disk holding {run} is full ({free} bytes free)" if full else f"{type(e).__name__}: {e}"
    latest = latest_checkpoint(run)
    return CheckpointWriteError(
        f"{tmp}: writing the checkpoint failed: {why}; free space, then rerun with --resume (last complete "
        f"checkpoint: {latest if latest else 'none'})"
    )


def write_json(path: Path, obj) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def prune(run: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``keep == 0`` keeps them all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_weights(run: Path, which: str = "best") -> Path:
    """``model.safetensors`` of ``best`` (falling back to the latest), ``last``, or a step number / folder."""
    run = Path(run)
    if which == "best" and (run / "best" / "model.safetensors").is_file():
        return run / "best" / "model.safetensors"
    if which in ("best", "last"):
        latest = latest_checkpoint(run)
        if latest is None:
            raise FileNotFoundError(f"{run}: no checkpoint found (expected {run}/checkpoints/step_*/)")
        return latest / "model.safetensors"
    path = step_dir(run, int(which)) if which.isdigit() else Path(which)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint weights")
    return path
