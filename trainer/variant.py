"""What a model variant is: one small protocol, in the spirit of torchtitan's model converters.

A tuned model is the preset's SAM plus variants: decoder LoRA (``trainer.lora``), an encoder tail
(``trainer.encoder_tail``) with LoRA or Conv-LoRA (``trainer.adapted``) on its blocks, a task's head (the
semantic head, ``trainer.semantic``). Each variant is one class that says how it changes the model, what it
does per micro-step, what it adds to the loss, and how it exports and loads. The session, the export, eval
and the Predictor call these methods through ``trainer.variants`` (the registry) and never name a variant.

The methods have do-nothing defaults, so a variant writes only the ones it needs (subclass ``Variant``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from trainer.decoder import PromptedDecoder


class Variant(Protocol):
    """One change to the preset's SAM; built from the model config by ``trainer.variants.variants_for``."""

    sidecar: ClassVar[str | None] = None
    """The name of the file this variant's export writes beside the SAM state dict
    (``trainer.tuned.sidecar_path``: ``x.pth`` -> ``x.<name>.pth``), and the key ``trainer.load_tuned``
    finds its loader by; ``None``: it merges into SAM's own weights and needs no file."""

    def apply(self, sam: Sam, model: PromptedDecoder) -> None:
        """Change the model: wrap layers of ``sam`` (which ``model`` shares) or fill a slot of ``model``.

        Called in registry order under one seeded generator (``model.init_seed``), so that the same config
        builds the same starting model in any process. What it adds trains; ``sam``'s own weights are frozen
        before (the config's ``train_*`` flags aside)."""

    def before_micro_step(self, model: PromptedDecoder, g: torch.Generator) -> None:
        """Set per micro-step state from the micro-step's prompt generator ``g`` (a pure function of the
        seed, the micro-step and the rank), so that resume draws what an uninterrupted run draws."""

    def loss_terms(self, model: PromptedDecoder) -> dict[str, torch.Tensor]:
        """Scalar terms added to the task's loss after the micro-step's forward, by name (each is logged)."""
        return {}

    def merge(self, sam: Sam) -> None:
        """Fold what can be folded into ``sam``'s plain weights (LoRA), for prediction and export."""

    def export(self, sam: Sam, model: PromptedDecoder) -> dict | None:
        """After ``merge``: take off ``sam`` what could not merge, so that ``sam.state_dict()`` has
        segment_anything's keys alone, and return the content of this variant's ``sidecar`` file."""
        return None

    @classmethod
    def load(cls, sam: Sam, model: PromptedDecoder, content: dict, where: Path) -> None:
        """Put ``export``'s ``content`` (read from the file ``where``) back on a ``sam`` built from the
        exported state dict and on the ``PromptedDecoder`` over its prompt encoder and mask decoder. A
        content that does not fit raises ``ValueError`` naming ``where``."""
