"""Report rows, sections and files: what every bench prints and keeps.

A report is one pair of files per device and UTC day, ``<device>_<yyyymmdd>.json`` and ``.md``, in the output
folder. The JSON holds one *section* per bench (``embed``, ``train``, ``kernels``, ``io``). Running a bench
replaces its own section whole and leaves the others as they were, so ``bench kernels`` then ``bench io`` on
the same day gives one report with both, and re-running ``bench kernels`` replaces only the kernels figures:
the rows of one section always come from one run, because a ratio is only meaningful between figures measured
together. The Markdown is regenerated from the JSON each time.

Every row carries the environment it was measured in (device, versions, git sha), the bench's config, and its
figures as :class:`~bench.timing.Stat` (median and spread).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.timing import Stat

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # triton is absent off Linux; any import failure just means "not there"
        return "absent"
    return str(getattr(mod, "__version__", "unknown"))


@dataclass(frozen=True, kw_only=True)
class Env:
    """Where a row was measured."""

    device: str
    """Short name used in file names: ``cpu`` or the GPU's name, slugged (``nvidia-h100-80gb-hbm3``)."""
    device_name: str
    """Full name: the GPU's name, or the CPU model and the threads torch uses."""
    torch: str
    triton: str
    cuda: str
    """The CUDA runtime torch runs on, or ``none (cpu run)``."""
    python: str
    git_sha: str
    """HEAD of the checkout the bench ran from, with ``-dirty`` when tracked files differ from it."""

    @classmethod
    def detect(cls, device: torch.device) -> Env:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            cuda = str(torch.version.cuda)
        else:
            name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
            cuda = "none (cpu run)"
        sha = os.environ.get("SAMTUNE_GIT_SHA") or _git("rev-parse", "--short=12", "HEAD") or "unknown"
        if sha != "unknown" and "SAMTUNE_GIT_SHA" not in os.environ:
            dirty = _git("status", "--porcelain", "--untracked-files=no")
            if dirty:
                sha += "-dirty"
        return cls(
            device="cpu" if device.type == "cpu" else _slug(name),
            device_name=name,
            torch=torch.__version__,
            triton=_version("triton"),
            cuda=cuda,
            python=platform.python_version(),
            git_sha=sha,
        )

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(kw_only=True)
class Row:
    """One provider measured on one configuration."""

    case: str
    """What is timed, e.g. ``mask_losses fwd+bwd``."""
    provider: str
    """Who does it: ``fused``/``reference``, ``batched``/``set_image loop``, a residency mode, ..."""
    config: dict
    """The knobs of this measurement (shapes, batch size, model type, ...)."""
    metrics: dict[str, Stat] = field(default_factory=dict)
    status: str = "ok"
    """``ok``, or ``unavailable`` with the reason in ``note`` (then ``metrics`` is empty)."""
    note: str = ""

    def as_dict(self, env: Env) -> dict:
        return {
            "case": self.case,
            "provider": self.provider,
            "config": self.config,
            "status": self.status,
            "note": self.note,
            "metrics": {k: v.as_dict() for k, v in self.metrics.items()},
            "env": env.as_dict(),
        }


@dataclass(kw_only=True)
class Ratio:
    """A comparison of two rows measured in the same run: ``value = numerator / denominator`` of medians."""

    name: str
    value: float
    config: dict
    goal: float | None = None
    """The issue's target for this ratio on an H100/H200, if it sets one."""

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "config": self.config, "goal": self.goal}


@dataclass(kw_only=True)
class Section:
    """Everything one bench found in one run."""

    bench: str
    size: str
    config: dict
    """The bench's resolved size preset and options."""
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    limits: dict[str, Stat] = field(default_factory=dict)
    """Hardware ceilings measured in the same run (matmul rate, copy bandwidth, raw disk read)."""
    notes: list[str] = field(default_factory=list)
    """How things were measured, and what bounds a figure that misses its goal."""
    plots: list[str] = field(default_factory=list)
    """PNG file names, relative to the report's folder."""
    seconds: float = 0.0
    """Wall time of the whole bench."""

    def as_dict(self, env: Env) -> dict:
        return {
            "bench": self.bench,
            "size": self.size,
            "config": self.config,
            "env": env.as_dict(),
            "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seconds": self.seconds,
            "limits": {k: v.as_dict() for k, v in self.limits.items()},
            "rows": [r.as_dict(env) for r in self.rows],
            "ratios": [r.as_dict() for r in self.ratios],
            "notes": self.notes,
            "plots": self.plots,
        }


def report_stem(env: Env, day: dt.date | None = None) -> str:
    """``<device>_<yyyymmdd>``: one report per device and UTC day."""
    day = day or dt.datetime.now(dt.UTC).date()
    return f"{env.device}_{day:%Y%m%d}"


def write_report(out: Path, env: Env, sections: list[Section]) -> tuple[Path, Path]:
    """Merge ``sections`` into today's report for ``env.device`` in ``out``; returns the (json, md) paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(env)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    doc = {"schema": SCHEMA_VERSION, "device": env.device, "date": stem.rsplit("_", 1)[1], "sections": {}}
    if jpath.exists():
        old = json.loads(jpath.read_text())
        if old.get("schema") == SCHEMA_VERSION:
            doc["sections"] = old.get("sections", {})
    for s in sections:
        doc["sections"][s.bench] = s.as_dict(env)
    check_finite(doc)
    jpath.write_text(json.dumps(doc, indent=1) + "\n")
    mpath.write_text(render_markdown(doc))
    return jpath, mpath


def check_finite(doc: dict) -> None:
    """Raise if any figure in a report is not a finite positive number (the report's own sanity check)."""
    for name, sec in doc["sections"].items():
        for key, st in sec["limits"].items():
            _check_stat(f"{name}.limits.{key}", st)
        for i, row in enumerate(sec["rows"]):
            for key, st in row["metrics"].items():
                _check_stat(f"{name}.rows[{i}].{key}", st)
        for r in sec["ratios"]:
            if not (math.isfinite(r["value"]) and r["value"] > 0):
                raise ValueError(f"{name}: ratio {r['name']!r} is {r['value']}")


def _check_stat(where: str, st: dict) -> None:
    for k in ("median", "q25", "q75", "min", "max"):
        v = st[k]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{where}.{k} = {v!r}: every figure must be finite and positive")


ORDER = ("embed", "train", "kernels", "io")


def render_markdown(doc: dict) -> str:
    """The whole report as Markdown: one part per section, rows as a table, then ratios, limits and notes."""
    lines = [f"# samtune bench report: {doc['device']}, {doc['date']}", ""]
    names = [n for n in ORDER if n in doc["sections"]] + [n for n in doc["sections"] if n not in ORDER]
    for name in names:
        sec = doc["sections"][name]
        env = sec["env"]
        lines += [
            f"## {name}",
            "",
            f"`bench {name} --size {sec['size']}` on **{env['device_name']}**, measured {sec['measured_at']} "
            f"in {sec['seconds']:.0f} s. torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
            f"Python {env['python']}, git `{env['git_sha']}`.",
            "",
            "Config: `" + json.dumps(sec["config"], sort_keys=True) + "`",
            "",
        ]
        if sec["limits"]:
            lines += ["Hardware limits measured in the same run:", ""]
            lines += [f"- {k}: {_fmt_stat(v)}" for k, v in sec["limits"].items()]
            lines.append("")
        cases: list[str] = []
        for r in sec["rows"]:
            cases += [r["case"]] if r["case"] not in cases else []
        for case in cases:  # one table per case, so each has only its own columns
            lines += _rows_table([r for r in sec["rows"] if r["case"] == case]) + [""]
        if sec["ratios"]:
            lines += [
                "",
                "| comparison (same run) | config | ratio | goal (H100/H200) |",
                "|---|---|---|---|",
            ]
            for r in sec["ratios"]:
                goal = "" if r["goal"] is None else f"{r['goal']:g}"
                lines.append(f"| {r['name']} | {_fmt_config(r['config'])} | {r['value']:.3g} | {goal} |")
        if sec["notes"]:
            lines += ["", *[f"- {n}" for n in sec["notes"]]]
        for p in sec["plots"]:
            lines += ["", f"![{p}]({p})"]
        lines.append("")
    return "\n".join(lines)


def _rows_table(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["metrics"] if k not in keys]
    head = ["case", "provider", "config", *keys]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["case"], r["provider"], _fmt_config(r["config"])]
        if r["status"] != "ok":
            cells += [f"{r['status']}: {r['note']}"] + [""] * (len(keys) - 1 if keys else 0)
        else:
            cells += [_fmt_stat(r["metrics"][k]) if k in r["metrics"] else "" for k in keys]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return out


def _fmt_config(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def _fmt_stat(st: dict) -> str:
    return Stat(**st).fmt() if st["n"] > 1 else f"{Stat(**st).fmt().split(' [')[0]} {st['unit']}"


def print_section(sec: Section) -> None:
    """The section's rows and ratios as a plain-text table on stdout."""
    print(f"\n== bench {sec.bench} --size {sec.size} ({sec.seconds:.1f} s)")
    for k, v in sec.limits.items():
        print(f"   limit  {k}: {v.fmt()}")
    for r in sec.rows:
        cfg = _fmt_config(r.config)
        if r.status != "ok":
            print(f"   {r.case:<28} {r.provider:<22} {cfg:<40} {r.status}: {r.note}")
            continue
        figs = "  ".join(f"{k}={v.fmt()}" for k, v in r.metrics.items())
        print(f"   {r.case:<28} {r.provider:<22} {cfg:<40} {figs}")
    for r in sec.ratios:
        goal = "" if r.goal is None else f"   (goal on H100/H200: {r.goal:g})"
        print(f"   ratio  {r.name} [{_fmt_config(r.config)}]: {r.value:.3g}{goal}")
