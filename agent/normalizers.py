"""Running observation normalisation as the network module carries it.

The learner keeps the statistics in its state and updates them in agent/update.py
(Welford, float64, so weeks of samples do not drift); the module holds a copy so that the
exported actor normalises exactly as training did and a checkpoint names them where the
network's other weights are.
"""

from __future__ import annotations

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Per-element (x - mean) / sqrt(var + eps) with frozen statistics (count, mean, m2)."""

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(shape, dtype=torch.float64))
        # float32 copies used by forward, derived from the float64 state on each load.
        self.register_buffer("mean32", torch.zeros(shape), persistent=False)
        self.register_buffer("inv_std32", torch.ones(shape), persistent=False)

    @torch.no_grad()
    def _refresh(self) -> None:
        n = int(self.count)
        var = self.m2 / (n - 1) if n >= 2 else torch.ones_like(self.m2)
        self.mean32.copy_(self.mean)
        self.inv_std32.copy_(torch.rsqrt(var + self.eps))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean32) * self.inv_std32
