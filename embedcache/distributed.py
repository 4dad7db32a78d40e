"""Who am I in a multi-process build: rank, world size, a barrier, and the device.

Under ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment) this is accelerate's ``PartialState``;
otherwise a single process with no process group, so a plain ``embedcache build`` does not pay for
initialising one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class ProcessContext:
    """The calling process's place in the build."""

    rank: int
    """0..world_size-1; rank 0 prepares and finalises the cache."""
    world_size: int
    """Number of processes building this cache."""
    default_device: torch.device
    """The device accelerate assigned (or the best local one)."""
    barrier: Callable[[], None]
    """Waits until every process reaches it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_context(*, cpu: bool = False) -> ProcessContext:
    """The context of this process; ``cpu`` forces CPU processes (gloo) even where CUDA exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # PartialState only forms a CPU (gloo) group when told to; `accelerate launch --cpu` says so through
        # ACCELERATE_USE_CPU, which PartialState itself does not read.
        cpu = (
            cpu
            or not torch.cuda.is_available()
            or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        )
        state = PartialState(cpu=cpu)
        return ProcessContext(
            rank=state.process_index,
            world_size=state.num_processes,
            default_device=state.device,
            barrier=state.wait_for_everyone,
        )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return ProcessContext(rank=0, world_size=1, default_device=device, barrier=lambda: None)
