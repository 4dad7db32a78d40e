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
import zipfile
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
    """``model.safetensors`` of ``best`` (falling back to the latest), ``last``, or a step number / folder.

    Raises ``CheckpointReadError`` when that file is damaged, naming it and another good checkpoint.
    """
    run = Path(run)
    if which == "best" and (run / "best" / "model.safetensors").is_file():
        path = run / "best" / "model.safetensors"
    elif which in ("best", "last"):
        latest = latest_checkpoint(run)
        if latest is None:
            raise FileNotFoundError(f"{run}: no checkpoint found (expected {run}/checkpoints/step_*/)")
        path = latest / "model.safetensors"
    else:
        path = step_dir(run, int(which)) if which.isdigit() else Path(which)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint weights")
    problem = damage(path)
    if problem:
        good = good_checkpoints(run, before=path.parent)
        offer = f"pass --which {good[0][0]} ({good[0][1]})" if good else "no other good checkpoint in the run"
        raise CheckpointReadError(f"{problem}; {offer}")
    return path


def weights_and_config(run: Path, which: str = "best"):
    """``resolve_weights(run, which)`` and the ``Config`` saved beside those weights.

    Raises ``FileNotFoundError`` naming the folder when it holds no ``config.yaml``: ``--which`` then named a
    folder that ``trainer run`` did not write (weights made elsewhere, such as averaged ones, need the run's
    ``config.yaml`` copied beside them).
    """
    from trainer.config import load_config

    weights = resolve_weights(run, which)
    config = weights.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{weights.parent}: no config.yaml beside {weights.name}; a checkpoint folder of trainer run "
            f"holds the run's resolved config (for weights made elsewhere, copy the run's config.yaml there)"
        )
    return weights, load_config(config)


class CheckpointReadError(RuntimeError):
    """A checkpoint file is damaged (truncated, altered, of the wrong types); the message names the file and
    the previous good checkpoint."""


def damage(path: Path) -> str | None:
    """Why the checkpoint file ``path`` cannot be loaded (``"<path>: <why>"``), or ``None`` when it is whole.

    Cheap checks, no unpickling: a ``.safetensors`` header must cover the file exactly; a torch ``.bin`` or
    ``.pkl`` (a zip archive) must have its central directory and every member's CRC-32; a ``.json`` must
    parse. Other files are not checked.
    """
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt"):
                pass
        elif path.suffix in (".bin", ".pkl"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{path}: damaged (member {bad} fails its CRC)"
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as e:
        return f"{path}: damaged or truncated ({type(e).__name__}: {e})"
    return None


def damage_in(folder: Path) -> str | None:
    """The first damaged file of a checkpoint folder (see ``damage``), or ``None``."""
    return next(filter(None, map(damage, sorted(Path(folder).iterdir()))), None)


def good_checkpoints(run: Path, *, before: Path | None = None) -> list[tuple[int, Path]]:
    """Step checkpoints of ``run`` whose files are whole (``damage_in``), newest first; with ``before`` (a
    step folder), only older ones (``best/`` or any other folder: all of them)."""
    limit = int(m.group(1)) if before is not None and (m := STEP_DIR.match(Path(before).name)) else None
    found = [(s, p) for s, p in list_checkpoints(run) if limit is None or s < limit]
    return [(s, p) for s, p in reversed(found) if damage_in(p) is None]
