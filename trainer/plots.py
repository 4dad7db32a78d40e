"""Figures: the loss curve and the GT / starting model / tuned model overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def loss_curve(steps: list[int], losses: list[float], out: str | Path, *, evals: dict | None = None) -> Path:
    """Training loss per step (and validation box mIoU per evaluation, on a second axis) -> PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, color="tab:blue", label="train loss")
    if len(losses) >= 10:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=2, color="tab:blue", alpha=0.6)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        xs = sorted(evals)
        ax2.plot(xs, [evals[x] for x in xs], "o-", color="tab:orange", label="val box mIoU")
        ax2.set_ylabel("val box mIoU")
        ax2.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def _colour(instances: list[np.ndarray], shape: tuple[int, int], background: np.ndarray | None) -> np.ndarray:
    """Masks painted with a fixed palette over the image (or grey)."""
    rgb = np.full((*shape, 3), 60, np.float32) if background is None else background.astype(np.float32) * 0.6
    palette = matplotlib.colormaps["tab10"]
    for k, m in enumerate(instances):
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.array(palette(k % 10)[:3]) * 255
    return rgb.clip(0, 255).astype(np.uint8)


def overlay(
    gt: list[np.ndarray],
    start: list[np.ndarray],
    tuned: list[np.ndarray],
    out: str | Path,
    *,
    image_path: str | None = None,
    title: str = "",
    scores: tuple[float, float] | None = None,
) -> Path:
    """GT, starting-model and tuned masks (box prompts) side by side -> PNG."""
    shape = gt[0].shape
    background = None
    if image_path and Path(image_path).is_file():
        img = Image.open(image_path).convert("RGB")
        if img.size == (shape[1], shape[0]):
            background = np.asarray(img)
    names = ["ground truth", "starting model", "tuned"]
    if scores:
        names[1] += f" (mIoU {scores[0]:.2f})"
        names[2] += f" (mIoU {scores[1]:.2f})"
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), dpi=100)
    for ax, name, masks in zip(axes, names, (gt, start, tuned)):
        ax.imshow(_colour(masks, shape, background))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
