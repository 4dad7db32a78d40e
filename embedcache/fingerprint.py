"""The dataset fingerprint: sha256 over every input file's relative path and content."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from embedcache.models import file_sha256


def dataset_fingerprint(root: Path, files: list[Path], *, workers: int = 4) -> str:
    """sha256 over ``"<path relative to root, or name>\\0<file sha256>\\n"`` for the files, in sorted order.

    Any added, removed, renamed or edited file changes it; moving the whole dataset folder does not.
    """
    root = Path(root).resolve()

    def rel(p: Path) -> str:
        p = Path(p).resolve()
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name

    files = sorted(files, key=rel)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(file_sha256, files))
    h = hashlib.sha256()
    for p, d in zip(files, digests):
        h.update(f"{rel(p)}\0{d}\n".encode("utf-8", "surrogateescape"))  # non-UTF-8 names too
    return h.hexdigest()
