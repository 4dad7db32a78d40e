"""Figures: the loss curve and the GT / starting model / tuned model overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from embedcache.images import BadInput, load_image  # noqa: E402


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
    first: list[np.ndarray],
    second: list[np.ndarray],
    out: str | Path,
    *,
    image_path: str | None = None,
    channels: tuple[int, int, int] | None = None,
    title: str = "",
    labels: tuple[str, str] = ("starting model", "tuned"),
    scores: tuple[float, float] | None = None,
) -> Path:
    """Image, ground truth and two models' masks (box prompts) side by side -> PNG.

    ``gt``, ``first`` and ``second`` are lists of ``(H, W)`` bool masks, one per object; ``labels`` name the
    two models and ``scores`` their mIoU on this image. The image is read as the cache's build read it
    (``channels``: the build's ``--channels``, ``cache.signature["dataset"]["channels"]``); its panel is grey
    when ``image_path`` is missing, unreadable or of another size than the masks.
    """
    shape = gt[0].shape
    background = _image(image_path, channels, shape)
    names = ["image", "ground truth", *labels]
    if scores:
        names[2] += f" (mIoU {scores[0]:.2f})"
        names[3] += f" (mIoU {scores[1]:.2f})"
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), dpi=100)
    for ax, name, masks in zip(axes, names, ([], gt, first, second)):
        ax.imshow(_colour(masks, shape, background))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def instance_overlay(
    truth: np.ndarray,
    preds: dict[str, np.ndarray],
    out: str | Path,
    *,
    image_path: str | None = None,
    channels: tuple[int, int, int] | None = None,
    title: str = "",
    scores: dict[str, float] | None = None,
) -> Path:
    """Image, true instances and each model's instances, coloured by instance id, side by side -> PNG.

    ``truth`` and each of ``preds`` (model label -> labels) are ``(H, W)`` int labels, 0 background;
    ``scores`` gives each model's mSA on this image. The image is read as in ``overlay``.
    """
    background = _image(image_path, channels, truth.shape)
    base = np.full((*truth.shape, 3), 60, np.float32) if background is None else background * 0.6
    # tab20 cycled over ids: neighbouring objects rarely share a colour
    palette = np.array([matplotlib.colormaps["tab20"](k)[:3] for k in range(20)], np.float32) * 255
    panels = {"image": None, "ground truth": truth}
    for name, labels in preds.items():
        panels[name + (f" (mSA {scores[name]:.2f})" if scores and name in scores else "")] = labels
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), dpi=100, squeeze=False)
    for ax, (name, labels) in zip(axes[0], panels.items()):
        rgb = base.copy()
        if labels is not None:
            on = labels > 0
            rgb[on] = 0.45 * rgb[on] + 0.55 * palette[labels[on] % 20]
        ax.imshow(rgb.clip(0, 255).astype(np.uint8))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def _image(path: str | None, channels, shape: tuple[int, int]) -> np.ndarray | None:
    """``(H, W, 3)`` uint8 of the image at ``path`` by embedcache's rule, or None when it is missing,
    unreadable, or not of ``shape``."""
    if not path or not Path(path).is_file():
        return None
    try:
        image = load_image(Path(path), channels)
    except BadInput:
        return None
    return image if image.shape[:2] == tuple(shape) else None


def iou_distributions(per_model: dict[str, dict[str, list[float]]], out: str | Path) -> Path:
    """Per-object IoU distributions, one panel per prompt type, one box per model -> PNG.

    ``per_model`` maps a model label to ``{prompt type: [per-object IoU, ...]}``.
    """
    prompts = sorted({p for d in per_model.values() for p in d})
    fig, axes = plt.subplots(1, len(prompts), figsize=(4.2 * len(prompts), 3.6), dpi=100, squeeze=False)
    for ax, prompt in zip(axes[0], prompts):
        labels = [m for m in per_model if per_model[m].get(prompt)]
        data = [per_model[m][prompt] for m in labels]
        ax.boxplot(data, showmeans=True, whis=(5, 95))
        for k, d in enumerate(data, start=1):  # every object as a dot, jittered sideways
            jitter = np.random.default_rng(k).uniform(-0.12, 0.12, len(d))
            ax.scatter(np.full(len(d), k) + jitter, d, s=6, alpha=0.4, color="tab:blue")
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8, rotation=15)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("IoU per object")
        ax.set_title(f"{prompt} prompts", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def click_curves(curves: dict[str, list[float]], out: str | Path) -> Path:
    """mIoU against corrective clicks, one line per ``"<model> from <start>"`` (``trainer eval --clicks``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, miou in curves.items():
        style = "--" if label.endswith("point") else "-"
        ax.plot(range(len(miou)), miou, style, marker="o", label=label)
    ax.set_xlabel("corrective clicks")
    ax.set_ylabel("mIoU")
    ax.set_xticks(range(max(len(m) for m in curves.values())))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
