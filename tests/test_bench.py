"""bench: every command runs at tiny size on CPU and writes a well-formed report; the report machinery merges
sections, refuses non-finite figures, and its statistics and counters are right on known inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import cli
from bench.report import Env, Ratio, Row, Section, check_finite, write_report
from bench.timing import Stat, peak_memory

BENCHES = ("embed", "train", "kernels", "io")
ENV_KEYS = {"device", "device_name", "torch", "triton", "cuda", "python", "git_sha"}
STAT_KEYS = {"median", "q25", "q75", "min", "max", "n", "unit"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One scratch folder for the module, so the commands share the synthetic cache they build."""
    return tmp_path_factory.mktemp("bench-work")


def _only_report(out: Path) -> dict:
    reports = sorted(out.glob("cpu_*.json"))
    assert len(reports) == 1, f"expected one report in {out}, found {reports}"
    assert reports[0].with_suffix(".md").is_file()
    return json.loads(reports[0].read_text())


def _check_stat(where: str, st: dict) -> None:
    assert set(st) == STAT_KEYS, f"{where}: keys {sorted(st)}"
    for k in ("median", "q25", "q75", "min", "max"):
        v = st[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{where}.{k} = {v!r}"
    assert st["min"] <= st["q25"] <= st["median"] <= st["q75"] <= st["max"], f"{where}: {st}"
    assert st["n"] >= 1 and st["unit"], where


def check_section(sec: dict, name: str, out: Path) -> None:
    """The schema of one section: environment, rows with config and figures, ratios, plots on disk."""
    assert sec["bench"] == name and sec["size"] == "tiny"
    assert set(sec["env"]) >= ENV_KEYS and sec["env"]["device"] == "cpu"
    for key, st in sec["limits"].items():
        _check_stat(f"{name}.limits.{key}", st)
    assert sec["rows"], f"{name}: no rows"
    ok_rows = 0
    for i, row in enumerate(sec["rows"]):
        where = f"{name}.rows[{i}] ({row.get('provider')})"
        assert {"case", "provider", "config", "status", "note", "metrics", "env"} <= set(row), where
        assert set(row["env"]) >= ENV_KEYS, where
        assert isinstance(row["config"], dict) and row["config"], where
        if row["status"] == "ok":
            ok_rows += 1
            assert row["metrics"], f"{where}: no figures"
            for key, st in row["metrics"].items():
                _check_stat(f"{where}.{key}", st)
        else:
            assert row["status"] == "unavailable" and row["note"] and not row["metrics"], where
    assert ok_rows, f"{name}: every row unavailable"
    for r in sec["ratios"]:
        assert math.isfinite(r["value"]) and r["value"] > 0, f"{name}: ratio {r}"
    assert sec["notes"], f"{name}: no notes on method"
    for p in sec["plots"]:
        assert (out / p).is_file() and (out / p).stat().st_size > 1000, p


@pytest.mark.parametrize("name", BENCHES)
def test_command_tiny(name, work, tmp_path):
    out = tmp_path / "results"
    assert cli.main([name, "--size", "tiny", "--out", str(out), "--work", str(work), "--device", "cpu"]) == 0
    doc = _only_report(out)
    assert doc["schema"] == 1 and doc["device"] == "cpu"
    assert list(doc["sections"]) == [name]
    check_section(doc["sections"][name], name, out)


@pytest.mark.slow  # 25 s on 2 cores; test_command_tiny runs each bench at tiny size in make test
def test_all_tiny(work, tmp_path):
    out = tmp_path / "results"
    assert cli.main(["all", "--size", "tiny", "--out", str(out), "--work", str(work), "--device", "cpu"]) == 0
    doc = _only_report(out)
    assert set(doc["sections"]) == set(BENCHES)
    for name in BENCHES:
        check_section(doc["sections"][name], name, out)
    md = next(out.glob("cpu_*.md")).read_text()
    for name in BENCHES:
        assert f"## {name}" in md


@pytest.mark.slow  # 35 s on 2 cores; test_command_tiny[train] runs the same bench at tiny size by default
def test_train_bench_times_the_trainers_own_step(work, tmp_path, monkeypatch):
    """``bench train`` has no step of its own: every warm-up, timed and profiled step of each trainer
    provider is a call of ``trainer.session.train_step``, and the prompts it reports are that step's."""
    from bench.train import SIZES
    from trainer import session

    real, seen = session.train_step, []

    def spy(s):
        seen.append(real(s))
        return seen[-1]

    monkeypatch.setattr(session, "train_step", spy)
    out = tmp_path / "results"
    assert (
        cli.main(["train", "--size", "tiny", "--out", str(out), "--work", str(work), "--device", "cpu"]) == 0
    )
    rows = [
        r
        for r in _only_report(out)["sections"]["train"]["rows"]
        if r["provider"].startswith("trainer") and r["status"] == "ok"
    ]
    size = SIZES["tiny"]
    per_provider = size.warmup_steps + size.steps + 1  # warm-up, timed, one under the counters
    assert rows and len(seen) == len(rows) * per_provider
    for k, row in enumerate(rows):
        timed = seen[k * per_provider + size.warmup_steps : k * per_provider + size.warmup_steps + size.steps]
        assert (
            row["metrics"]["prompts per step"]["median"] == sorted(t.prompts for t in timed)[size.steps // 2]
        )


def _section(name: str, value: float) -> Section:
    sec = Section(bench=name, size="tiny", config={"x": 1})
    sec.rows.append(
        Row(case="c", provider="p", config={"x": 1}, metrics={"t": Stat.of([value, value * 2], "s")})
    )
    sec.ratios.append(Ratio(name="r", value=2.0, config={}))
    return sec


def test_report_merges_sections_and_replaces_a_rerun(tmp_path):
    env = Env.detect(torch.device("cpu"))
    write_report(tmp_path, env, [_section("kernels", 1.0)])
    write_report(tmp_path, env, [_section("io", 3.0)])
    write_report(tmp_path, env, [_section("kernels", 5.0)])
    doc = _only_report(tmp_path)
    assert set(doc["sections"]) == {"kernels", "io"}
    assert doc["sections"]["kernels"]["rows"][0]["metrics"]["t"]["min"] == 5.0  # the rerun replaced it whole
    assert doc["sections"]["io"]["rows"][0]["metrics"]["t"]["min"] == 3.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_report_refuses_a_figure_that_is_not_finite_and_positive(tmp_path, bad):
    env = Env.detect(torch.device("cpu"))
    with pytest.raises(ValueError, match="finite and positive"):
        write_report(tmp_path, env, [_section("kernels", bad)])
    assert not list(tmp_path.glob("*.json"))  # nothing half-written


def test_check_finite_sees_ratios():
    doc = {"sections": {"k": {"limits": {}, "rows": [], "ratios": [{"name": "r", "value": float("nan")}]}}}
    with pytest.raises(ValueError, match="ratio"):
        check_finite(doc)


def test_stat_quartiles_and_monotone_map():
    s = Stat.of([4.0, 1.0, 3.0, 2.0, 5.0], "s")
    assert (s.min, s.q25, s.median, s.q75, s.max, s.n) == (1.0, 2.0, 3.0, 4.0, 5.0, 5)
    rate = s.map(lambda t: 10 / t, "1/s")  # decreasing: the ends swap
    assert (rate.min, rate.q25, rate.median, rate.q75, rate.max) == (2.0, 2.5, 10 / 3, 5.0, 10.0)


def test_cpu_peak_memory_counts_live_tensors():
    def fn():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 4 MiB more while a lives
        del a
        c = b + 1  # a is gone: still 8 MiB at most
        return c

    assert peak_memory(fn, device=torch.device("cpu")).median == pytest.approx(8.0, rel=1e-3)


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_flop_counter_matches_published(model_type):
    """Counting on the meta device (no arithmetic, no memory) reproduces the issue's 0.97 / 2.99 / 5.96 TFLOP
    per 1024x1024 image, which is what the MFU of vit_tiny, with no published figure, rests on."""
    from bench.flops import PUBLISHED_TFLOP, counted_flops

    assert counted_flops(model_type) / 1e12 == pytest.approx(PUBLISHED_TFLOP[model_type], rel=0.005)


@pytest.mark.gpu
def test_kernels_bench_measures_the_fused_op_on_gpu(tmp_path):
    """On CUDA both providers run and the section compares them (on CPU the fused one is unavailable)."""
    out = tmp_path / "results"
    assert (
        cli.main(
            ["kernels", "--size", "tiny", "--out", str(out), "--work", str(tmp_path), "--device", "cuda"]
        )
        == 0
    )
    (report,) = out.glob("*.json")
    sec = json.loads(report.read_text())["sections"]["kernels"]
    assert {r["provider"] for r in sec["rows"] if r["status"] == "ok"} == {"reference", "fused"}
    assert any(r["name"].startswith("fused speed-up") for r in sec["ratios"])
