"""``embedcache info``: a cache's signature, counts, size on disk and bytes per image, as text."""

from __future__ import annotations

import json
from pathlib import Path

from embedcache.cache import open_cache
from embedcache.store import TAP_ARRAY


def disk_bytes(path: Path, sub: str | None = None) -> int:
    """Bytes of all files under ``path`` (or ``path/sub``)."""
    root = Path(path) / sub if sub else Path(path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f} MiB"


def info_text(path: str | Path) -> str:
    """The text ``embedcache info`` prints."""
    c = open_cache(path)
    s, r = c.signature, c.build_report
    total = disk_bytes(c.path)
    emb = disk_bytes(c.path, "embeddings")
    obj = disk_bytes(c.path, "objects")
    tap = disk_bytes(c.path, TAP_ARRAY) if c.tap_tokens is not None else 0
    # every view but the identity is one group; the identity's own bytes are its embeddings, tap and masks
    extra = {v: disk_bytes(c.path, f"views/{v}") for v in c.views[1:]}
    view_emb = {c.views[0]: emb} | {v: disk_bytes(c.path, f"views/{v}/embeddings") for v in c.views[1:]}
    n, m = c.num_images, c.num_objects
    ds, pp = s["dataset"], s["preprocessing"]
    lines = [
        f"cache        {c.path}",
        f"format       v{s['format_version']}, embeddings {s['storage_dtype']} (N, 256, 64, 64), "
        f"{c.images_per_shard} images/shard",
        f"model        {s['model_type']}  checkpoint {s['checkpoint']}  compute {s['compute_dtype']}",
        "tap          "
        + (
            f"tokens entering {s['tap']['enters']} (last {s['tap']['blocks']} block(s)), "
            f"{s['tap']['dtype']} (N, {', '.join(map(str, s['tap']['shape']))})"
            if "tap" in s
            else "none (full cache: --tail-blocks 0)"
        ),
        "views        "
        + (
            f"{len(c.views)}: {', '.join(c.views)} (each image encoded once per view; training samples one "
            "per image per epoch, validation reads identity)"
            if extra
            else "identity only (--views none)"
        ),
        f"encoder      {json.dumps(s['encoder'])}",
        f"preprocess   input {pp['image_size']}x{pp['image_size']}, resize {pp['resize']}, "
        f"normalise {pp['normalize']}"
        + (f" (mean {pp['pixel_mean']}, std {pp['pixel_std']})" if pp["normalize"] == "mean_std" else "")
        + f", {pp['padding']}",
        f"dataset      {ds['reader']} ({ds['mask_kind']}"
        + (f", ignore {ds['ignore_index']}" if ds.get("ignore_index") is not None else "")
        + f"), {ds['num_files']} files, fingerprint {ds['fingerprint'][:16]}...",
        f"split        {ds['split']['method']} val_fraction={ds['split']['val_fraction']} "
        f"seed={ds['split']['seed']}: train {len(c.image_indices('train'))}, "
        f"val {len(c.image_indices('val'))}",
        f"images       {n}",
        f"objects      {m} ({m / max(n, 1):.1f} per image)",
        f"skipped      {r.get('num_skipped', 0)}",
    ]
    lines += [f"  - {b['path']}: {b['reason']}" for b in r.get("skipped", [])[:20]]
    lines += [
        f"size         {_mib(total)} on disk: embeddings {_mib(emb)}, tap tokens {_mib(tap)}, "
        f"objects {_mib(obj)}, "
        + (f"other views {_mib(sum(extra.values()))}, " if extra else "")
        + f"other {_mib(total - emb - tap - obj - sum(extra.values()))}",
        f"per image    {total / max(n, 1) / 1024:.1f} KiB total, {emb / max(n, 1) / 1024:.1f} KiB embedding, "
        f"{tap / max(n, 1) / 1024:.1f} KiB tap tokens",
    ]
    lines += [
        f"view {v:<14}{_mib(b)} ({_mib(view_emb[v])} embeddings, {b / max(n, 1) / 1024:.1f} KiB per image)"
        for v, b in ((c.views[0], emb + tap + obj), *extra.items())
        if extra
    ]
    lines += [
        f"per object   {obj / max(m, 1):.1f} bytes (box, class, areas, masks in original + input frame)",
        f"build        {r.get('prepare_seconds')} s prepare, {r.get('encode_seconds_sum')} s encode "
        f"({r.get('images_per_second')} images/s), {len(r.get('runs', []))} run(s), "
        f"finished {r.get('finished')}",
    ]
    return "\n".join(lines)
