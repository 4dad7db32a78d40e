"""Conv-LoRA (Zhong et al., "Convolution Meets LoRA", ICLR 2024) on a frozen ``nn.Linear``.

LoRA's bottleneck, seen as an ``r``-channel image, passes through one of ``M`` small convolution experts
before the up-projection, which brings back the local, multi-scale prior that a plain ViT lacks::

    z = A x                                     (r channels on the layer's (h, w) token grid)
    y = W x + b + (alpha / r) * B (z + E_e(z))

Expert ``e`` works at scale ``s_e``: bicubic upsampling of ``z`` by ``s_e``, a 3x3 convolution (``r`` to
``r``, bias at zero) and a GELU, then bicubic resizing back to ``(h, w)``. Scales 1..8 and ``r``-channel
experts are the public implementation's defaults (AutoGluon ``conv_lora``, ``conv_lora_expert_num`` 8).

The router picks one expert per input map (top-1 of ``M``) from the map's global average, with noisy gating
in training (Shazeer et al. 2017: noise std ``softplus(mean(z) @ W_noise) + 0.01``) and clean logits in
eval. With one expert chosen, its softmax weight is exactly 1, so, as in the public implementation, the
router learns only from the load-balancing loss ``coef * (cv²(importance) + cv²(load))``, where ``load``
is the smooth probability of each expert being chosen under the noise. ``forward`` keeps that loss in
``balance_loss`` for the trainer to add (``trainer.encoder_tail``).

Unlike LoRA, the result cannot be merged into ``W``: the expert and the convolution depend on the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.normal import Normal

NOISE_EPSILON = 1e-2  # floor of the router noise std (public implementation)


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of ``(M,)`` values; 0 for a single expert."""
    if x.numel() < 2:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


class Router(nn.Module):
    """Noisy top-1 gating over ``M`` experts from the global average of an ``(n, r, h, w)`` map."""

    def __init__(self, rank: int, num_experts: int, balance_coef: float):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(rank, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(rank, num_experts))
        self.balance_coef = balance_coef

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, r, h, w)`` -> ``(n,)`` int64 chosen expert and the scalar balance loss."""
        pooled = z.float().mean(dim=(2, 3))
        clean = pooled @ self.w_gate
        m = clean.shape[1]
        if not self.training or m == 1:
            choice = clean.argmax(1)
            load = F.one_hot(choice, m).float().sum(0)
        else:
            std = F.softplus(pooled @ self.w_noise) + NOISE_EPSILON
            noisy = clean + torch.randn_like(clean) * std
            top2, _ = noisy.topk(2, dim=1)
            choice = noisy.argmax(1)
            # P(expert i stays first under fresh noise): beat the best of the others (Shazeer et al. 2017)
            is_first = noisy >= top2[:, :1]
            threshold = torch.where(is_first, top2[:, 1:2], top2[:, :1])
            normal = Normal(torch.zeros((), device=z.device), torch.ones((), device=z.device))
            load = normal.cdf((clean - threshold) / std).sum(0)
        importance = F.one_hot(choice, m).float().sum(0)
        return choice, self.balance_coef * (_cv_squared(importance) + _cv_squared(load))


class ConvLoRALinear(nn.Module):
    """``base(x)`` plus the Conv-LoRA update (module docstring); B starts at zero, so the layer starts
    unchanged. Takes ``(n, h, w, in)`` token grids (SAM's ViT) or ``(n, h * w, in)`` square sequences
    (TinyViT windows)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        scales: tuple[int, ...],
        balance_coef: float = 1e-2,
    ):
        super().__init__()
        if rank < 1 or not scales or min(scales) < 1:
            raise ValueError(f"Conv-LoRA needs rank >= 1 and scales >= 1, got rank {rank}, scales {scales}")
        self.base = base
        self.scale = alpha / rank
        self.scales = tuple(int(s) for s in scales)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.experts = nn.ModuleList(nn.Conv2d(rank, rank, 3, padding=1) for _ in self.scales)
        for conv in self.experts:
            nn.init.zeros_(conv.bias)
        self.router = Router(rank, len(self.scales), balance_coef)
        self.balance_loss: torch.Tensor | None = None
        """The router's balance loss from the latest ``forward`` (a scalar tensor)."""

    def _expert(self, e: int, z: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on ``(n, r, h, w)``: up by its scale, 3x3 conv + GELU, back to ``(h, w)``."""
        s, size = self.scales[e], z.shape[2:]
        y = F.interpolate(z, scale_factor=s, mode="bicubic") if s != 1 else z
        y = F.gelu(self.experts[e](y))
        return F.interpolate(y, size=size, mode="bicubic") if s != 1 else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, h, w, in)`` or ``(n, L, in)`` with ``L`` a square -> the same with ``out`` features."""
        z = x @ self.lora_a.t()
        if x.dim() == 4:
            grid = z.permute(0, 3, 1, 2)
        else:
            n, length, r = z.shape
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(f"Conv-LoRA needs a square token grid, got {length} tokens")
            grid = z.transpose(1, 2).reshape(n, r, side, side)
        choice, self.balance_loss = self.router(grid)
        mixed = grid.clone()
        for e in range(len(self.scales)):
            rows = torch.nonzero(choice == e).flatten()
            if rows.numel():
                mixed = mixed.index_add(0, rows, self._expert(e, grid.index_select(0, rows)).to(mixed.dtype))
        mixed = mixed.permute(0, 2, 3, 1) if x.dim() == 4 else mixed.flatten(2).transpose(1, 2)
        return self.base(x) + (mixed @ self.lora_b.t()) * self.scale
