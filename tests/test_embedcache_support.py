"""Helpers shared by the embedcache tests (no tests here): tiny datasets, builds and cache comparison."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr
from PIL import Image

from embedcache.build import BuildConfig, build_cache
from embedcache.prepare import collect_metadata
from embedcache.presets import PRESETS
from embedcache.readers import CocoReader
from embedcache.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
RUN_ONLY = ("shard_done", "shard_seconds", "shard_rank")  # describe a run, not the content


def tiny_dataset(root: Path, n_images: int = 6, **kw) -> Path:
    """A small synthetic folder-layout dataset (images 96..160 px: decode is cheap, encode cost is fixed)."""
    return make_dataset(root, n_images=n_images, min_side=96, max_side=160, max_objects=4, **kw)


def build(data: Path, out: Path, **kw) -> dict:
    """An in-process vit_tiny CPU build with test-friendly defaults (3 shards for 6 images)."""
    opts = dict(
        model_type="vit_tiny", images_per_shard=2, batch_size=2, workers=2, device="cpu", progress=False
    )
    opts.update(kw)
    return build_cache(BuildConfig(data=data, out=out, **opts))


def cli_build_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    """The ``python -m embedcache build`` command line of ``build``'s test defaults."""
    cmd = [sys.executable, "-m", "embedcache", "build", "--data", str(data), "--out", str(out)]
    cmd += ["--model", "vit_tiny", "--images-per-shard", "2", "--batch-size", "2", "--workers", "2"]
    return [*cmd, "--device", "cpu", "--no-progress", *extra]


def sigkill_mid_work(
    proc: subprocess.Popen, ready, rng: np.random.Generator, what: str, within: float = 0.2
) -> None:
    """SIGKILL ``proc`` (a build or a run) a random 0-``within`` s after ``ready()`` turns true, and fail
    unless the signal is what ended it: a process that had already exited would make a resume check
    vacuous."""
    while not ready():
        assert proc.poll() is None, f"the process exited ({proc.returncode}) before {what}"
        time.sleep(0.005)
    time.sleep(float(rng.uniform(0.0, within)))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the process had already exited when SIGKILL came ({what})"


def cli_build(data: Path, out: Path, *extra: str, env: dict | None = None, check: bool = True):
    """``python -m embedcache build`` in a subprocess (what a user would kill)."""
    cmd = cli_build_cmd(data, out, *extra)
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"build failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a cache by path name, run-describing ones left out."""
    out = {}

    def walk(g: zarr.Group, prefix: str) -> None:
        for name, member in g.members():
            if isinstance(member, zarr.Group):
                walk(member, f"{prefix}{name}/")
            elif name not in RUN_ONLY:
                out[prefix + name] = np.asarray(member[...])

    walk(zarr.open_group(path, mode="r"), "")
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    """Bit-identical content (every array, NaN-aware) and identical signatures."""
    xa, xb = arrays(a), arrays(b)
    assert sorted(xa) == sorted(xb)
    for name in xa:
        va, vb = xa[name], xb[name]
        assert va.dtype == vb.dtype and va.shape == vb.shape, name
        if va.dtype.kind == "f":
            assert np.array_equal(va.view(f"u{va.itemsize}"), vb.view(f"u{vb.itemsize}")), name
        else:
            assert np.array_equal(va, vb), name
    sa = zarr.open_group(a, mode="r").attrs["signature"]
    sb = zarr.open_group(b, mode="r").attrs["signature"]
    assert sa == sb


def metadata(reader, skip_bad=False, **kw):
    """The metadata pass over everything ``reader`` scans: ``(meta, skipped)``."""
    meta, report = metadata_report(reader, skip_bad, **kw)
    return meta, report["skipped"]


def metadata_report(reader, skip_bad=False, **kw):
    """The metadata pass over everything ``reader`` scans: ``(meta, report)``."""
    scan = reader.scan()
    return collect_metadata(
        reader,
        scan.records,
        scan_bad=scan.bad,
        skip_bad=skip_bad,
        val_fraction=0.0,
        seed=0,
        workers=2,
        **{"preset": PRESETS["vit_tiny"], **kw},
    )


def write_pair(root, stem, image, mask, mask_ext=".png"):
    """``root/images/<stem>.png`` and its mask ``root/masks/<stem><mask_ext>``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    if mask_ext == ".tif":
        tifffile.imwrite(root / "masks" / f"{stem}.tif", mask)
    else:
        Image.fromarray(mask).save(root / "masks" / f"{stem}{mask_ext}")


def coco_reader(tmp_path, annotations, images=None, categories=None):
    """A COCO JSON over one 30x40 image ``imgs/a.png``; ``categories`` defaults to the annotations' ids."""
    (tmp_path / "imgs").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    images = images or [{"id": 5, "file_name": "imgs/a.png", "height": 30, "width": 40}]
    if categories is None:
        used = sorted({a["category_id"] for a in annotations if "category_id" in a})
        categories = [{"id": c, "name": f"c{c}"} for c in used]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return CocoReader(tmp_path, path)


def read_png(path: Path) -> np.ndarray:
    """A PNG as an array, with the file closed (filterwarnings=error turns a leak into a failure)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im)
