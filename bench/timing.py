"""How every bench times and sizes things: repeated samples after warm-up, summarised as median and spread.

On CUDA a sample is the time between two CUDA events around one call (or ``triton.testing.do_bench`` for
single kernels, which also flushes L2 between calls). On CPU it is wall clock (``time.perf_counter``) around
one call, after the same warm-up. Peak memory is the most bytes allocated during one call above what was
allocated before it: the CUDA caching allocator's counters on GPU, and a dispatch-mode tally of live tensor
storage on CPU.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True, kw_only=True)
class Stat:
    """A figure measured several times: median and spread of the samples, in ``unit``."""

    median: float
    q25: float
    """Lower quartile (linear interpolation between samples)."""
    q75: float
    """Upper quartile."""
    min: float
    max: float
    n: int
    """Number of samples after warm-up."""
    unit: str

    @classmethod
    def of(cls, samples: list[float], unit: str) -> Stat:
        """Summarise ``samples`` (at least one)."""
        if not samples:
            raise ValueError("no samples")
        xs = sorted(float(s) for s in samples)
        return cls(
            median=statistics.median(xs),
            q25=_quantile(xs, 0.25),
            q75=_quantile(xs, 0.75),
            min=xs[0],
            max=xs[-1],
            n=len(xs),
            unit=unit,
        )

    @classmethod
    def single(cls, value: float, unit: str) -> Stat:
        """A figure computed once (a size on disk, a count): no spread."""
        v = float(value)
        return cls(median=v, q25=v, q75=v, min=v, max=v, n=1, unit=unit)

    def map(self, f: Callable[[float], float], unit: str) -> Stat:
        """The summary under a monotone ``f`` (e.g. time -> rate), swapping the ends if ``f`` decreases."""
        lo, hi = f(self.min), f(self.max)
        q25, q75 = f(self.q25), f(self.q75)
        if lo > hi:
            lo, hi, q25, q75 = hi, lo, q75, q25
        return Stat(median=f(self.median), q25=q25, q75=q75, min=lo, max=hi, n=self.n, unit=unit)

    def as_dict(self) -> dict:
        return {
            "median": self.median,
            "q25": self.q25,
            "q75": self.q75,
            "min": self.min,
            "max": self.max,
            "n": self.n,
            "unit": self.unit,
        }

    def fmt(self) -> str:
        """``median [q25-q75] unit`` with three significant figures."""
        return f"{_sig(self.median)} [{_sig(self.q25)}-{_sig(self.q75)}] {self.unit}"


def _quantile(xs: list[float], q: float) -> float:
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sig(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    CUDA: one pair of events per call, read after a single synchronise at the end, so the host never stalls
    the queue between samples. CPU: ``time.perf_counter`` around each call.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def time_kernel(
    fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int, grad_to_none=None
) -> Stat:
    """Milliseconds per call of a short GPU op via ``triton.testing.do_bench`` (flushes L2 between calls).

    ``warmup``/``repeats`` are counts on CPU; on CUDA do_bench takes them as milliseconds of budget, so they
    are raised to at least 25 ms / 100 ms. The quantiles requested are min, q25, median, q75 and max.
    """
    if device.type != "cuda":
        return Stat.of([s * 1e3 for s in time_call(fn, device=device, warmup=warmup, repeats=repeats)], "ms")
    from triton.testing import do_bench

    qs = do_bench(
        fn,
        warmup=max(25, warmup),
        rep=max(100, repeats),
        grad_to_none=grad_to_none,
        quantiles=[0.0, 0.25, 0.5, 0.75, 1.0],
    )
    lo, q25, med, q75, hi = (float(q) for q in qs)
    # do_bench does not say how many samples it took; it aims its run at `rep` ms of calls.
    n = max(1, int(round(max(100, repeats) / max(med, 1e-6))))
    return Stat(median=med, q25=q25, q75=q75, min=lo, max=hi, n=n, unit="ms")


class _StorageTally(TorchDispatchMode):
    """Counts bytes of tensor storage that ops create while active, and the most that were alive at once.

    Only op outputs are seen, not scratch space inside an op, so this is a lower bound of the true peak.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[object, int]] = {}
        self.current = 0
        self.peak = 0

    def _reap(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._reap()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.live:
                    nbytes = st.nbytes()
                    self.live[key] = (StorageWeakRef(st), nbytes)
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable[[], object], *, device: torch.device) -> Stat:
    """Most bytes allocated during one call of ``fn`` above what was allocated before it, in MiB."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return Stat.single(max(peak, 1) / 2**20, "MiB")
    with _StorageTally() as tally:
        fn()
    return Stat.single(max(tally.peak, 1) / 2**20, "MiB")
