"""Hardware ceilings measured on the device in the same run as the figures they bound.

- matmul rate: a square matrix product, bf16 on GPU and fp32 on CPU (the dtype the encoder runs in there);
- copy bandwidth: a device-to-device (or RAM-to-RAM) tensor copy, counting bytes read plus bytes written;
- op latency: the time of a one-element op, i.e. the floor per kernel launch (GPU) or per dispatched op (CPU).
"""

from __future__ import annotations

import torch

from bench.timing import Stat, time_call, time_kernel


def matmul_rate(device: torch.device, *, n: int, warmup: int = 2, repeats: int = 5) -> Stat:
    """TFLOP/s of an ``n x n x n`` matrix product (2 n^3 FLOPs), bf16 on CUDA and fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    ms = time_kernel(lambda: a @ b, device=device, warmup=warmup, repeats=repeats)
    return ms.map(lambda t: 2 * n**3 / (t * 1e-3) / 1e12, "TFLOP/s")


def copy_bandwidth(device: torch.device, *, mib: int, warmup: int = 2, repeats: int = 5) -> Stat:
    """GB/s of ``dst.copy_(src)`` for a ``mib`` MiB buffer, counting the bytes read and the bytes written."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_kernel(lambda: dst.copy_(src), device=device, warmup=warmup, repeats=repeats)
    moved = 2 * src.numel() * 4
    return ms.map(lambda t: moved / (t * 1e-3) / 1e9, "GB/s")


def op_latency(device: torch.device, *, ops: int = 200, repeats: int = 5) -> Stat:
    """Microseconds per one-element ``add_``: the cost of one launch (GPU) or one dispatched op (CPU)."""
    x = torch.zeros(1, device=device)

    def burst() -> None:
        for _ in range(ops):
            x.add_(1.0)

    samples = time_call(burst, device=device, warmup=1, repeats=repeats)
    return Stat.of([s / ops * 1e6 for s in samples], "us")
