"""``trainer export``: a full SAM state dict (frozen encoder + tuned prompt encoder/decoder, LoRA merged) and
one sidecar per variant that cannot merge, named by ``trainer.tuned.sidecar_path``, each written atomically.

The SAM file loads strictly with ``embedcache.build_sam(type, path)`` and, for the official types, with
``segment_anything.sam_model_registry[type](checkpoint=path)``. Each variant's ``merge`` and ``export``
(``trainer.variant``) decide what goes where: with an encoder tail the tuned neck is in the SAM file and
encoder LoRA is merged into the tail blocks' ``qkv``; Conv-LoRA adapters go to ``.conv_lora.pth``, a task's
head to its own sidecar (``.semantic.pth``). ``trainer.load_tuned`` rebuilds any of them from the manifest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from trainer.checkpoint import weights_and_config
from trainer.config import Config, ModelConfig
from trainer.decoder import PromptedDecoder
from trainer.model import tuned_sam
from trainer.tuned import MANIFEST, manifest, sidecar_path
from trainer.variants import variants_for


def export(run: str | Path, out: str | Path, *, which: str = "best") -> list[Path]:
    """Write the tuned model of run folder ``run`` to ``out`` and its sidecars; returns the files written,
    ``out`` first.

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
    weights, cfg = weights_and_config(run, which)
    sam, model = tuned_sam(cfg, weights)
    return export_model(sam, model, cfg.model, out, config=cfg)


def export_model(
    sam: Sam, model: PromptedDecoder, m: ModelConfig, out: Path, *, config: Config | None = None
) -> list[Path]:
    """Write ``tuned_sam``'s ``sam`` and ``model`` (variants merged, built from model config ``m``) to
    ``out`` and its sidecars; returns the files written, ``out`` first. ``config``, the run's resolved
    config, goes into the manifest: ``trainer eval --checkpoint`` scores the export by its task."""
    sidecars = {}
    for variant in variants_for(m):
        content = variant.export(sam, model)  # takes off sam what cannot merge: SAM keeps its own keys
        if content is not None:
            sidecars[variant.sidecar] = content
    out.parent.mkdir(parents=True, exist_ok=True)
    # the sidecars and the manifest before the model file, so that a model file never lacks them; when a
    # later file fails, the earlier ones go too: no sidecar is left without its model
    written = []
    try:
        for name, content in sidecars.items():
            written.append(_save(content, sidecar_path(out, name)))
        info = manifest(m.model_type, list(sidecars), config)
        written.append(_save(info, sidecar_path(out, MANIFEST, ".json"), _dump_json))
        return [_save(sam.state_dict(), out), *written]
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


def _dump_json(obj, f) -> None:
    f.write(json.dumps(obj, indent=2).encode() + b"\n")


class ExportError(RuntimeError):
    """``trainer export`` cannot write its file; the message names it and what to do."""


def _save(obj, path: Path, dump=torch.save) -> Path:
    """``dump(obj, file)`` (``torch.save``) to ``.tmp-<name>``, then ``os.replace`` onto ``path``: it is whole
    or untouched.

    Whatever stops the write, the temp file is removed. A full disk or the file-size limit (``ulimit -f``)
    raises ``ExportError``; a folder that refuses writes, the ``PermissionError`` the CLI names.
    """
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "wb") as f:  # a file object, so that a failed write's OSError reaches us
            dump(obj, f)
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
