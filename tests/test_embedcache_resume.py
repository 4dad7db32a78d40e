"""Kill a build (test hook and SIGKILL), rerun it, and get the uninterrupted result; two-process builds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr
from test_embedcache_support import (
    REPO,
    assert_same_cache,
    build,
    cli_build,
    cli_build_cmd,
    sigkill_mid_work,
)

from embedcache import CacheError, open_cache
from embedcache.encode import EXIT_AFTER_SHARDS_ENV
from embedcache.verify import shard_file


def test_resume_after_exit_mid_build_is_exact_and_reencodes_nothing_finished(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "c.zarr"
    r = cli_build(data, out, env={EXIT_AFTER_SHARDS_ENV: "1"}, check=False)
    assert r.returncode == 75, r.stderr  # died right after its first shard, as a kill would leave it
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)
    done = np.asarray(zarr.open_group(out, mode="r")["shard_done"][...])
    assert done.tolist() == [1, 0, 0]
    finished = shard_file(out, 0)
    stamp, content = finished.stat().st_mtime_ns, finished.read_bytes()

    report = build(data, out)  # the same build, resumed (in-process: one interpreter start less)
    assert report["runs"][-1]["shards_encoded"] == 2
    c = open_cache(out)
    assert np.asarray(c.group["shard_done"][...]).tolist() == [1, 2, 2]  # shard 0 kept from run 1
    assert finished.stat().st_mtime_ns == stamp and finished.read_bytes() == content
    assert [run["shards_encoded"] for run in c.build_report["runs"]] == [1, 2]
    assert_same_cache(ref, out)


def test_resume_after_sigkill_at_a_random_moment(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "c.zarr"
    cmd = cli_build_cmd(data, out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "shard_done" / "c" / "0"
    # somewhere inside shard 1 (encoding, or writing its file) or shard 2
    sigkill_mid_work(proc, marker.exists, np.random.default_rng(), "shard 0 was done")
    build(data, out)
    c = open_cache(out)
    assert np.asarray(c.group["shard_done"][...])[0] == 1  # finished before the kill: not re-encoded
    assert_same_cache(ref, out)


@pytest.mark.slow  # two accelerate processes, 12 s on 2 cores
def test_two_process_build_splits_by_whole_shards(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "c.zarr"
    # accelerate's CPU path (`--cpu --num_processes 2`) needs mpirun; its torchrun path works on CPU with gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", "0"]
    cmd += ["-m", "embedcache", "build", "--data", str(data), "--out", str(out), "--model", "vit_tiny"]
    cmd += [
        "--images-per-shard",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    g = zarr.open_group(out, mode="r")
    assert np.asarray(g["shard_rank"][...]).tolist() == [0, 1, 0]  # shard k written by rank k % 2 only
    assert g.attrs["build_report"]["runs"][0]["world_size"] == 2
    assert_same_cache(ref, out)
