"""An exported tuned model: the one naming rule for its files, and ``load_tuned``, which rebuilds it.

``trainer export`` writes ``OUT.pth``, a plain segment_anything state dict (it loads strictly with
``embedcache.build_sam`` and, for SAM's own presets, ``sam_model_registry``), and beside it one sidecar per
variant that cannot merge into those weights, each named ``sidecar_path(OUT, name)``:

- ``OUT.conv_lora.pth``: Conv-LoRA encoder adapters (``trainer.adapted``);
- ``OUT.semantic.pth``: the semantic task's head (``trainer.semantic``);
- ``OUT.samtune.json``: the manifest, ``{"format": 1, "model_type": ..., "sidecars": [names], "config":
  {...}}`` (``config``: the run's resolved config, as in its ``config.yaml``; absent in older exports).

``load_tuned(OUT)`` builds the preset's SAM from ``OUT.pth`` and hands each sidecar the manifest lists to its
variant's ``load`` (``trainer.variants.SIDECARS``), for any combination of variants and task::

    import trainer
    from trainer.predictor import Predictor

    tuned = trainer.load_tuned("sam_tuned.pth")
    predictor = Predictor(tuned)  # set_image / predict as SamPredictor, with the adapters in place
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from torch import nn

from embedcache.models import build_sam
from trainer.config import Config, from_dict, to_dict
from trainer.decoder import PromptedDecoder
from trainer.encoder_tail import EncoderTail

FORMAT = 1
MANIFEST = "samtune"
"""The manifest's sidecar name (``OUT.samtune.json``)."""


def sidecar_path(out: str | Path, name: str, suffix: str = ".pth") -> Path:
    """The one rule for an export's sidecars: ``x.pth`` -> ``x.<name><suffix>``; a file not named ``.pth``
    keeps its whole name (``x.bin`` -> ``x.bin.<name><suffix>``), so two exports never share a sidecar."""
    out = Path(out)
    stem = out.stem if out.suffix == ".pth" else out.name
    return out.with_name(f"{stem}.{name}{suffix}")


class TunedSam(nn.Module):
    """An exported model rebuilt: ``sam``, the preset's SAM with its variants in place (Conv-LoRA in its
    image encoder), and ``model``, the ``PromptedDecoder`` over its prompt encoder and mask decoder with the
    task's head; ``trainer.predictor.Predictor`` runs the image encoder of one and the forward of the other.
    ``config`` is the run's resolved config from the manifest (``None``: a plain SAM file, or an export
    from before manifests recorded it); ``sidecars`` the names of the sidecars loaded.
    """

    def __init__(
        self,
        sam: Sam,
        model: PromptedDecoder,
        model_type: str,
        config: Config | None = None,
        sidecars: tuple[str, ...] = (),
    ):
        super().__init__()
        self.sam = sam
        self.model = model
        self.model_type = model_type
        self.config = config
        self.sidecars = sidecars

    def on_tap_tokens(self, k: int) -> PromptedDecoder:
        """``model`` with the image encoder's last ``k`` blocks and neck as its encoder tail (adapters
        included): it takes a partial cache's tap tokens (``ImageStore(..., tail_blocks=k)``), as a run with
        ``model.encoder_tail_blocks=k`` does. Shares its modules with ``sam``."""
        self.model.encoder_tail = EncoderTail(self.sam.image_encoder, k, checkpoint_blocks=False).eval()
        return self.model


def manifest(model_type: str, sidecars: list[str], config: Config | None = None) -> dict:
    """The manifest's content for an export of preset ``model_type`` with these sidecar names and the run's
    resolved ``config`` (left out when ``None``)."""
    info = {"format": FORMAT, "model_type": model_type, "sidecars": sidecars}
    return info if config is None else {**info, "config": to_dict(config)}


def load_tuned(path: str | Path, *, model_type: str | None = None) -> TunedSam:
    """Rebuild what ``trainer export`` wrote to ``path``, in eval mode on the CPU.

    Args:
        path: the exported SAM state dict; its sidecars and manifest are found beside it by
            ``sidecar_path``.
        model_type: the preset. Read from the manifest; needed only for an export written before exports
            had one (its sidecars are then the registered ones that exist beside it).
    """
    from trainer.variants import SIDECARS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported model not found (written by trainer export)")
    where = sidecar_path(path, MANIFEST, ".json")
    config = None
    if where.is_file():
        try:
            m = json.loads(where.read_text())
            recorded, names = m["model_type"], list(m["sidecars"])
            config = from_dict(m["config"]) if "config" in m else None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a samtune export manifest ({e})") from e
        if m.get("format") != FORMAT:
            raise ValueError(f"{where}: manifest format {m.get('format')!r}, this samtune reads {FORMAT}")
        if model_type is not None and model_type != recorded:
            raise ValueError(f"{where}: the export is a {recorded} model, not {model_type}")
        model_type = recorded
    elif model_type is None:
        raise FileNotFoundError(
            f"{where}: no manifest beside {path} (an export from before manifests, or not samtune's); "
            "pass model_type= to load it"
        )
    else:
        names = [name for name in SIDECARS if sidecar_path(path, name).is_file()]
    unknown = [name for name in names if name not in SIDECARS]
    if unknown:
        raise ValueError(f"{where}: sidecars {unknown} have no loader here (known: {sorted(SIDECARS)})")
    sam = build_sam(model_type, path)
    model = PromptedDecoder(sam.prompt_encoder, sam.mask_decoder)
    for name in names:
        file = sidecar_path(path, name)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing; {where} lists it beside {path}")
        content = torch.load(file, map_location="cpu", weights_only=True)
        SIDECARS[name].load(sam, model, content, file)
    return TunedSam(sam.eval(), model.eval(), model_type, config, tuple(names))
