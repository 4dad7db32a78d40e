"""What a training task is: one small protocol, and the registry that ``model.task`` names.

A task owns what differs between instance and semantic training: which images train, the decoder head (a
variant, ``trainer.variant``, so that it exports and loads like the others), the loss of a micro-batch (with
its prompts), validation, ``trainer eval``'s metrics and its headline score, and the end-of-run figures.
Everything else (the session, the step, the loop, checkpoints, eval, export) is shared. A new task is one
file with a class that has this shape, plus its line in ``TASKS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from trainer.ais import AisTask
from trainer.instance import InstanceTask
from trainer.semantic import SemanticTask

if TYPE_CHECKING:
    from embedcache.cache import Cache
    from trainer.config import Config
    from trainer.data import Batch, ImageStore
    from trainer.evaluate import Contender
    from trainer.variant import Variant


class Task(Protocol):
    """One kind of training; built from the resolved config by ``make_task``."""

    reads_labels: ClassVar[bool]
    """The loader builds ``(B, S, S)`` class maps (``Batch.labels``; S the input side), not object masks."""

    head: ClassVar[type[Variant] | None]
    """The variant that puts the task's head on the model, built from ``model`` config and exported like
    any variant (``trainer.variants``); ``None``: SAM's own mask and IoU heads."""

    scores_plain_sam: ClassVar[bool]
    """A plain SAM (a ``trainer eval --checkpoint`` state dict that is no ``trainer export`` with its run's
    config: no head) is a model of this task, so such files are scored beside a run or export of it."""

    scored_by_auto: ClassVar[str | None]
    """The ``trainer eval --auto`` method whose pass gives this task's own scores (``evaluate`` is then not
    run a second time), or ``None``."""

    sweep_metrics: ClassVar[tuple[str, ...]]
    """The validation numbers ``trainer sweep --metric`` chooses among (the first is its default), or ``()``:
    a sweep scores the task by ``score``."""

    score_name: ClassVar[str]
    """What ``score`` returns, as tables name it (``trainer sweep``)."""

    @staticmethod
    def check(cfg: Config) -> None:
        """Refuse a config this task cannot train (``ValueError`` naming the fields), when it is built."""
        ...

    @staticmethod
    def resolve(cfg: Config, cache: Cache) -> Config:
        """The config with the fields this task derives from the cache filled in (a new object)."""
        ...

    def train_images(self, cache: Cache) -> np.ndarray:
        """``(n,)`` int64 cache indices of the images that train."""
        ...

    def loss(
        self, model: nn.Module, batch: Batch, g: torch.Generator, accelerator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss of one micro-batch (prompts drawn from ``g``) and its detached named terms."""
        ...

    def prompts_in(self, batch: Batch) -> int:
        """How many prompted predictions a micro-batch trains (what prompts/s counts)."""
        ...

    def validate(self, model: nn.Module, store: ImageStore, images: np.ndarray, accelerator) -> dict:
        """Metrics of the unwrapped ``model`` on the cache images ``images``, equal on every process."""
        ...

    def evaluate(
        self,
        model: nn.Module,
        store: ImageStore,
        images: np.ndarray,
        accelerator,
        *,
        clicks: int,
        mask_prompt,
    ) -> dict:
        """``trainer eval``'s metrics: ``validate``'s, per object where the task has objects; with ``clicks``
        N > 0 the click curves (``ValueError`` where the task has no click rounds)."""
        ...

    def score(self, metrics: dict) -> float:
        """The one number of ``validate``'s metrics that picks the best checkpoint (higher is better)."""
        ...

    def overlays(
        self, folder: Path, images: np.ndarray, first: Contender, second: Contender, n: int
    ) -> list[Path]:
        """Figures of up to ``n`` of ``images``, ``first`` model against ``second``; the files written."""
        ...


TASKS: dict[str, type[Task]] = {"instance": InstanceTask, "semantic": SemanticTask, "ais": AisTask}
"""``model.task`` -> its class; the choices of ``ModelConfig.task`` must be these keys."""


def make_task(cfg: Config) -> Task:
    """The task ``cfg.model.task`` names, built from ``cfg`` (resolve it first where the cache is known)."""
    return TASKS[cfg.model.task](cfg)
