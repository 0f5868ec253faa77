"""Streaming normalisers: running observation statistics and reward scaling.

Both use Welford's algorithm in float64 so that weeks of samples do not drift, and both
keep their whole state in tensors so a checkpoint restores them bit-exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from agent.optimizers import NonFiniteError


class RunningNorm(nn.Module):
    """Per-element (x - mean) / sqrt(var + eps), with statistics updated by `update`.

    It is a module so that the frozen statistics travel inside the network: the ONNX
    export of the actor then normalises exactly as training did.
    """

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(shape, dtype=torch.float64))
        # float32 copies used by forward, derived from the float64 state after each change.
        self.register_buffer("mean32", torch.zeros(shape), persistent=False)
        self.register_buffer("inv_std32", torch.ones(shape), persistent=False)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one sample (no batch axis)."""
        x = x.to(torch.float64)
        self.count += 1
        diff = x - self.mean
        self.mean += diff / self.count
        self.m2 += diff * (x - self.mean)
        self._refresh()

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


class RewardScaler:
    """Divides rewards by the running std of a discounted return trace (stream-x ScaleReward).

    The trace u <- gamma * u * (1 - done) + r estimates the scale of returns, so the TD
    error stays O(1) whatever the reward units of the stream are.
    """

    def __init__(self, gamma: float, eps: float = 1e-8) -> None:
        self.gamma = gamma
        self.eps = eps
        self.trace = 0.0
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def __call__(self, reward: float, done: bool) -> float:
        trace = self.trace * self.gamma + reward
        count = self.count + 1
        diff = trace - self.mean
        mean = self.mean + diff / count
        m2 = self.m2 + diff * (trace - mean)
        if not math.isfinite(m2):
            # One absurd reward would make every later reward scale to 0: refuse it and
            # keep the statistics as they were.
            raise NonFiniteError(f"reward {reward!r} overflows the reward statistics")
        self.trace = 0.0 if done else trace
        self.count, self.mean, self.m2 = count, mean, m2
        var = m2 / (count - 1) if count >= 2 else 1.0
        return reward / (var + self.eps) ** 0.5

    def state_dict(self) -> dict[str, float | int]:
        return {"trace": self.trace, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.trace = float(state["trace"])
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
