"""Corruption, full disks, read-only folders, concurrent builds and kills (issue 10, items 9, 10, 12, 14, 15,
17 and "a failed build leaves a store the same command resumes")."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage._local as zarr_local
from test_embedcache_support import (
    REPO,
    assert_same_cache,
    build,
    cli_build,
    cli_build_cmd,
    sigkill_mid_work,
)

from embedcache import CacheError, open_cache
from embedcache.build import CacheLockedError, CacheWriteError
from embedcache.cli import main
from embedcache.lock import lock_path
from embedcache.signature import FORMAT_VERSION
from embedcache.verify import shard_file, verify

EMBED_BYTES = 256 * 64 * 64 * 2  # one float16 image embedding, the raw chunk before its 4-byte crc32c


def _copy(ref: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad.zarr"
    shutil.copytree(ref, bad)
    return bad


def _xor(path: Path, offset: int, n: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        raw[i] ^= value
    path.write_bytes(bytes(raw))


# ---- item 9: altered embedding bytes fail their chunk checksum ----


@pytest.mark.parametrize(
    "offset, n, value",
    [(1000, 16, 0x01), (EMBED_BYTES + 4 + 50_000, 4096, 0xFF)],
    ids=["16B-xor-01-image0", "4KB-xor-ff-image1"],
)
def test_verify_catches_altered_embedding_bytes(reference, tmp_path, offset, n, value):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    _xor(shard_file(bad, 1), offset, n, value)
    problems = verify(bad)
    image = 2 + offset // (EMBED_BYTES + 4)  # shard 1 holds images 2 and 3
    assert len(problems) == 1, problems
    assert (
        str(shard_file(bad, 1)) in problems[0]
        and f"image {image} (ValueError: Stored and computed checksum" in (problems[0])
    )
    assert main(["verify", str(bad)]) == 1


def test_reading_an_altered_embedding_names_the_shard_file(reference, tmp_path):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    _xor(shard_file(bad, 2), 1000, 16, 0x01)
    c = open_cache(bad)
    c.read_embeddings([0, 1, 2, 3])  # other shards still read
    with pytest.raises(CacheError, match=rf"{shard_file(bad, 2)}: embeddings of images 4..4 unreadable"):
        c.read_embeddings([4])


# ---- item 10: a signature edited to another model ----


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"model_type": "vit_b"}, "signature: encoder is"),
        ({"model_type": "lite_medsam_x"}, "unknown model type 'lite_medsam_x'"),
        ({"storage_dtype": "bfloat16"}, "signature: storage_dtype is 'bfloat16'"),
        ({"checkpoint": "my-weights.pth"}, "signature: my-weights.pth: checkpoint file not found"),
    ],
    ids=["model_type", "unknown-model", "storage_dtype", "checkpoint"],
)
def test_verify_catches_an_edited_signature(reference, tmp_path, edit, needle):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    g = zarr.open_group(bad, mode="r+")
    g.attrs.update(signature={**g.attrs["signature"], **edit})
    problems = verify(bad, embeddings=False)
    assert any(needle in p for p in problems), problems


# ---- item 14: corrupt compressed chunks and shard indexes are named ----


@pytest.mark.parametrize(
    "array, chunk", [("objects/area", "c/0"), ("objects/mask_bits", "c/0"), ("image_id", "c/0")]
)
def test_corrupt_compressed_chunk_is_named(reference, tmp_path, array, chunk):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    f = bad / array / chunk
    _xor(f, f.stat().st_size // 2, 1, 0x5A)
    problems = verify(bad)
    assert any(str(bad / array) in p and "unreadable" in p for p in problems), problems


def test_bad_shard_index_is_named(reference, tmp_path):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    f = shard_file(bad, 0)
    _xor(f, f.stat().st_size - 20, 4, 0xFF)  # the index (2 x 16 bytes + crc32c) closes the shard file
    problems = verify(bad)
    assert len(problems) == 1 and problems[0].startswith(f"shard 0 ({f}): unreadable"), problems


def test_deleted_chunk_files_are_named_not_read_as_fill(reference, tmp_path):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    (bad / "objects" / "class_id" / "c" / "0").unlink()
    with pytest.raises(CacheError, match=r"objects/class_id/c/0: chunk file missing"):
        open_cache(bad)
    bad2 = _copy(ref, tmp_path / "2")
    shard_file(bad2, 1).unlink()
    with pytest.raises(CacheError, match=rf"{shard_file(bad2, 1)}: shard file missing"):
        open_cache(bad2)


def test_a_shard_deleted_after_opening_is_not_read_as_nan(reference, tmp_path):
    _, ref = reference
    bad = _copy(ref, tmp_path)
    c = open_cache(bad)
    shard_file(bad, 1).unlink()
    c.read_embeddings([0, 1, 4])
    with pytest.raises(CacheError, match=rf"{shard_file(bad, 1)}: embeddings of images 2..3 missing"):
        c.read_embeddings([2, 3])


def test_a_format_1_cache_is_refused_with_a_rebuild_hint(reference, tmp_path):
    _, ref = reference
    old = _copy(ref, tmp_path)
    g = zarr.open_group(old, mode="r+")
    g.attrs.update(signature={**g.attrs["signature"], "format_version": 1})
    with pytest.raises(
        CacheError,
        match=rf"cache format version 1, but this embedcache reads version {FORMAT_VERSION}.*--overwrite",
    ):
        open_cache(old)


# ---- item 12: --out on a read-only file system ----


@contextlib.contextmanager
def _mounted(folder: Path, *mount_args: str):
    """``mount <mount_args> <folder>`` for the block (skips the test where mounting is not allowed)."""
    r = subprocess.run(["mount", *mount_args, str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {mount_args} here: {r.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` read-only: a read-only bind mount as root (permissions do not stop root), else chmod."""
    if os.geteuid() == 0:
        with _mounted(folder, "--bind", "-o", "ro", str(folder)):
            yield
        return
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(0o755)


def test_out_on_a_read_only_folder_is_a_clear_error(reference, tmp_path, capsys):
    data, _ = reference
    ro = tmp_path / "ro"
    ro.mkdir()
    with _read_only(ro):
        argv = ["build", "--data", str(data), "--out", str(ro / "c.zarr"), "--model", "vit_tiny"]
        assert main([*argv, "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"embedcache build: error: {ro}/.c.zarr.lock: " in err, err
    assert "choose a writable --out" in err and "Traceback" not in err


# ---- item 15: a full disk ----


def _fail_on_write(monkeypatch, key: str, err: int = errno.ENOSPC):
    """Make zarr's LocalStore fail writing any file whose path contains ``key``, as the OS would."""
    real = zarr_local._put

    def put(path, value, exclusive=False):
        if key in str(path):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, value, exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)


def test_disk_full_mid_build_names_the_file_and_the_same_command_resumes(reference, tmp_path, monkeypatch):
    data, ref = reference
    out = tmp_path / "c.zarr"
    _fail_on_write(monkeypatch, "embeddings/c/1/")
    with pytest.raises(
        CacheWriteError, match=r"embeddings/c/1/0/0/0: No space left on device \(the disk is full"
    ):
        build(data, out)
    monkeypatch.undo()  # space freed
    report = build(data, out)
    assert [r["shards_encoded"] for r in report["runs"]] == [1, 2]  # shard 0 kept, 1 and 2 encoded now
    assert_same_cache(ref, out)


def test_really_full_disk_is_named_and_resumes_after_freeing_space(reference, tmp_path):
    data, ref = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    with _mounted(disk, "-t", "tmpfs", "-o", "size=5m", "tmpfs"):  # 3 shards of 4 MiB do not fit
        r = cli_build(data, disk / "c.zarr", check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert (
            f"{disk}/c.zarr/embeddings/c/" in r.stderr
            and "No space left on device (the disk is full" in r.stderr
        )
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        cli_build(data, disk / "c.zarr")
        assert_same_cache(ref, disk / "c.zarr")


# ---- item 17: one writer at a time, and a lock that a kill releases ----

_HOLD = """
import sys, time
from pathlib import Path
from embedcache.lock import build_lock
with build_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_writer_is_refused_naming_the_holder_until_it_is_killed(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "c.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheLockedError, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            build(data, out)
        assert not out.exists()  # refused before touching anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    build(data, out)  # the kernel released the dead holder's lock
    assert_same_cache(ref, out)
    assert lock_path(out).is_file()


@pytest.mark.slow  # 20 s on 2 cores; the lock's refusal and release are tested fast above
def test_two_builds_at_once_one_writes_the_other_is_refused_cleanly(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "c.zarr"
    cmd = cli_build_cmd(data, out, "--workers", "1")
    procs = [subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    for rc, err in results:
        assert "Traceback" not in err, err
        assert rc == 0 or (rc == 2 and "another embedcache build is writing this cache (pid" in err), err
    assert any(rc == 0 for rc, _ in results)
    cli_build(data, out)  # whatever happened, the same command finishes (or confirms) it
    assert_same_cache(ref, out)


# ---- a failed build leaves a store that the same command resumes, or --overwrite restarts ----


def test_a_build_failing_while_preparing_leaves_nothing_in_the_way(reference, tmp_path, monkeypatch):
    data, ref = reference
    out = tmp_path / "c.zarr"
    _fail_on_write(monkeypatch, "objects/mask_bits", errno.EIO)
    with pytest.raises(CacheWriteError, match=r"mask_bits.*Input/output error"):
        build(data, out)
    assert not out.exists() and not out.with_name(".c.zarr.preparing").exists()
    monkeypatch.undo()
    build(data, out)
    assert_same_cache(ref, out)


def test_overwrite_that_fails_keeps_the_old_cache_and_a_rerun_restarts(reference, tmp_path, monkeypatch):
    data, ref = reference
    out = tmp_path / "c.zarr"
    shutil.copytree(ref, out)
    _fail_on_write(monkeypatch, "objects/mask_bits", errno.EIO)
    with pytest.raises(CacheWriteError):
        build(data, out, overwrite=True)
    assert verify(out) == []  # the old cache is untouched until the new one is prepared
    monkeypatch.undo()
    _fail_on_write(monkeypatch, "embeddings/c/2/")
    with pytest.raises(CacheWriteError):
        build(data, out, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)
    build(data, out, overwrite=True)  # restarts cleanly
    assert_same_cache(ref, out)


def test_zarr_local_store_writes_by_rename(tmp_path, monkeypatch):
    """The library guarantee the crash story relies on: a LocalStore file appears whole or not at all."""
    seen = []
    real = Path.replace

    def replace(self, target):
        seen.append((self.name, Path(target).name))
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    arr = zarr.create_array(zarr.storage.LocalStore(tmp_path / "a.zarr"), shape=(4,), dtype="i4", chunks=(4,))
    arr[:] = np.arange(4)
    chunk = [(src, dst) for src, dst in seen if dst == "0"]
    assert chunk and chunk[0][0].startswith("0.") and chunk[0][0].endswith(".partial"), seen
    assert not list((tmp_path / "a.zarr").rglob("*.partial"))


# ---- kill and resume: a SIGKILL at a random moment of the whole build, then the same command ----


def _kill_at_random_and_resume(data: Path, ref: Path, out: Path, rng: np.random.Generator) -> None:
    """SIGKILL a CLI build while it prepares, or after its shard 0 or 1 is written (3 shards), a random
    0-0.2 s later; check the kill ended it; resume it and compare."""
    cmd = cli_build_cmd(data, out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    phase = int(rng.integers(0, 3))
    if phase == 0:
        sigkill_mid_work(proc, lock_path(out).exists, rng, "it took its lock")
    else:
        sigkill_mid_work(proc, shard_file(out, phase - 1).exists, rng, f"shard {phase - 1} was written")
    build(data, out)
    assert_same_cache(ref, out)
    assert verify(out) == []


@pytest.mark.parametrize("trial", range(1))
def test_sigkill_at_a_random_moment_then_resume(reference, tmp_path, trial, seed):
    data, ref = reference
    _kill_at_random_and_resume(data, ref, tmp_path / "c.zarr", np.random.default_rng(seed))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_at_random_moments_then_resume_many(reference, tmp_path, trial, seed):
    data, ref = reference
    _kill_at_random_and_resume(data, ref, tmp_path / "c.zarr", np.random.default_rng(seed))
