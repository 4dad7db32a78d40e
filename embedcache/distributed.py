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


def process_context() -> ProcessContext:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return ProcessContext(
            rank=state.process_index,
            world_size=state.num_processes,
            default_device=state.device,
            barrier=state.wait_for_everyone,
        )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return ProcessContext(rank=0, world_size=1, default_device=device, barrier=lambda: None)
