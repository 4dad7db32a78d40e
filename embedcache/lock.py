"""One writer per cache: an OS file lock (``flock``) on a hidden file beside the store.

The lock file is ``.<name>.lock`` next to ``<name>`` (not inside it: a build may replace the store folder
itself). The kernel releases an ``flock`` when its holder exits, however it exits, so a SIGKILLed build never
leaves a stale lock; the next build simply takes it. The file keeps the holder's pid, host and start time so a
refused build can say who holds it. The file itself is never deleted: unlinking it could let two processes
hold locks on two different files of the same name.

``flock`` is advisory and local: two builds on different machines writing one NFS folder are not kept apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path


class CacheLockedError(RuntimeError):
    """Another process holds the build lock of this cache; the message names it."""


def lock_path(out: Path) -> Path:
    """``X.zarr`` -> ``.X.zarr.lock`` in the same folder."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive build lock of ``out`` for the ``with`` block, or raise ``CacheLockedError`` at once.

    Raises ``OSError`` when the lock file cannot be created (e.g. a read-only folder).
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            raise CacheLockedError(
                f"{out}: another embedcache build is writing this cache ({holder}; lock {path}); wait for it "
                "to finish or stop it, then rerun (a killed build releases the lock at once)"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
