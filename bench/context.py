"""What every bench gets: its size preset, the device, the scratch and report folders, and shared ceilings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import hardware
from bench.report import Env
from bench.timing import Stat

SIZES = ("tiny", "small", "full")
"""``tiny``: seconds on CPU, the smoke test. ``small``: a minute or two on CPU, for CPU ratios that are not
all overhead. ``full``: the issue's sizes, meant for an H100/H200."""


@dataclass(kw_only=True)
class Context:
    """Shared by the benches of one ``bench`` invocation."""

    size: str
    """One of ``SIZES``."""
    device: torch.device
    work: Path
    """Scratch folder for datasets and caches; on the disk whose read speed the io bench reports."""
    out: Path
    """Report folder: ``<device>_<yyyymmdd>.{json,md}`` and PNG plots go here."""
    env: Env
    _limits: dict[str, Stat] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def limit(self, name: str) -> Stat:
        """A hardware ceiling, measured on first use and reused by later benches of the same invocation.

        ``matmul`` (TFLOP/s; bf16 on GPU, fp32 on CPU), ``copy`` (GB/s, read + write), ``op_latency`` (us).
        """
        if name not in self._limits:
            if name == "matmul":
                n = 8192 if self.cuda else (2048 if self.size == "full" else 1024)
                self._limits[name] = hardware.matmul_rate(self.device, n=n)
            elif name == "copy":
                mib = 1024 if self.cuda else (256 if self.size == "full" else 64)
                self._limits[name] = hardware.copy_bandwidth(self.device, mib=mib)
            elif name == "op_latency":
                self._limits[name] = hardware.op_latency(self.device)
            else:
                raise KeyError(name)
        return self._limits[name]

    def limit_name(self, name: str) -> str:
        """How a ceiling is labelled in a report."""
        dtype = "bf16" if self.cuda else "fp32"
        return {
            "matmul": f"{dtype} matmul rate",
            "copy": "copy bandwidth (read + write)",
            "op_latency": "one-element op latency",
        }[name]
