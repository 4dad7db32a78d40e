"""``trainer export``: a full SAM state dict (frozen encoder + tuned prompt encoder/decoder, LoRA merged).

The file loads strictly with ``embedcache.build_sam(type, path)`` and, for the official types, with
``segment_anything.sam_model_registry[type](checkpoint=path)``. With an encoder tail, the tuned neck is in
it and encoder LoRA is merged into the tail blocks' ``qkv``; Conv-LoRA adapters go to the
``.conv_lora.pth`` sidecar (``trainer.adapted.load_adapted_sam`` loads both). In semantic mode the class head
goes to the ``.semantic.pth`` sidecar (see ``trainer.semantic``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import torch

from trainer.adapted import conv_lora_sidecar, detach_conv_lora
from trainer.checkpoint import resolve_weights
from trainer.config import load_config
from trainer.model import tuned_sam
from trainer.semantic import semantic_sidecar


def export(run: str | Path, out: str | Path, *, which: str = "best") -> list[Path]:
    """Write the tuned SAM of run folder ``run`` to ``out`` (atomically); returns the files written.

    Args:
        run: a ``trainer run`` output folder.
        out: the ``.pth`` to write.
        which: ``best`` (falls back to the latest checkpoint), ``last``, a step number or a checkpoint folder.
    """
    run, out = Path(run), Path(out)
    if out.is_dir():
        raise ExportError(
            f"--out {out} is a folder; name the .pth file to write, e.g. {out / 'sam_tuned.pth'}"
        )
    weights = resolve_weights(run, which)
    cfg = load_config(weights.parent / "config.yaml")
    sam, model = tuned_sam(cfg, weights)
    adapters = detach_conv_lora(sam)  # Conv-LoRA cannot merge: it goes to its own file, SAM keeps its keys
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if adapters["adapters"]:  # before the model file, so that a model file never lacks its adapters
        written.append(_save(adapters, conv_lora_sidecar(out)))
    written.insert(0, _save(sam.state_dict(), out))
    if model.semantic_head is not None:
        head = model.semantic_head
        sidecar = {"num_classes": head.num_classes, "prompt": head.prompt, "state_dict": head.state_dict()}
        written.append(_save(sidecar, semantic_sidecar(out)))
    return written


class ExportError(RuntimeError):
    """``trainer export`` cannot write its file; the message names it and what to do."""


def _save(obj, path: Path) -> Path:
    """``torch.save`` to ``.tmp-<name>``, then ``os.replace`` onto ``path``: it is whole or untouched.

    Whatever stops the write, the temp file is removed. A full disk or the file-size limit (``ulimit -f``)
    raises ``ExportError``; a folder that refuses writes, the ``PermissionError`` the CLI names.
    """
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "wb") as f:  # a file object, so that a failed write's OSError reaches us
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else e.__context__  # torch raises RuntimeError from the OSError
        if isinstance(cause, OSError) and cause.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
            raise ExportError(
                f"{path}: writing failed ({cause.strerror}); free space on its disk or raise the file-size "
                "limit (ulimit -f), then rerun"
            ) from e
        raise
    return path
