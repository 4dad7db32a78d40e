"""The mean of a run's weights at several saved steps, for `trainer eval --which FOLDER`.

    python docs/results/average_checkpoints.py RUN OUT STEP [STEP ...]

Reads ``RUN/checkpoints/step_*/model.safetensors`` at the given steps (saved with ``run.save_every`` small
enough and ``run.keep_checkpoints=0``), averages every floating-point tensor element-wise in float64 and
writes ``OUT/model.safetensors`` in the tensors' own dtypes; integer tensors must agree across the steps.
Used for docs/results.md's *Weights averaged over the last steps*.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoint import step_dir


def average(run: Path, steps: list[int]) -> dict[str, torch.Tensor]:
    """``{name: tensor}``: the element-wise mean of the run's weights at ``steps``."""
    states = [load_file(str(step_dir(run, s) / "model.safetensors")) for s in steps]
    mean = {}
    for name, first in states[0].items():
        stack = [state[name] for state in states]
        if first.is_floating_point():
            mean[name] = torch.stack([t.double() for t in stack]).mean(0).to(first.dtype)
        elif all(torch.equal(first, t) for t in stack):
            mean[name] = first
        else:
            raise SystemExit(f"{run}: integer tensor {name} differs between steps {steps}")
    return mean


def main(run: str, out: str, *steps: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(average(Path(run), [int(s) for s in steps]), str(folder / "model.safetensors"))
    print(f"{folder / 'model.safetensors'}: mean of steps {', '.join(steps)} of {run}")


if __name__ == "__main__":
    main(*sys.argv[1:])
