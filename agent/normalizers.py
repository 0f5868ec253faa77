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
        self._previous: tuple[torch.Tensor, ...] | None = None  # the statistics before update

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one sample (no batch axis). The statistics are rebound to new tensors rather
        than changed in place (the same arithmetic), so `undo` can put the previous ones
        back for free when the update that observed the sample is refused."""
        x = x.to(torch.float64)
        buffers = self._buffers
        self._previous = (buffers["count"], buffers["mean"], buffers["m2"],
                          buffers["mean32"], buffers["inv_std32"])
        count = buffers["count"] + 1
        diff = x - buffers["mean"]
        mean = buffers["mean"] + diff / count
        buffers["m2"] = buffers["m2"] + diff * (x - mean)
        buffers["count"], buffers["mean"] = count, mean
        self._refresh()

    @torch.no_grad()
    def undo(self) -> None:
        """Forget the last `update` (one level: only the newest sample can be taken back)."""
        if self._previous is not None:
            names = ("count", "mean", "m2", "mean32", "inv_std32")
            self._buffers.update(zip(names, self._previous, strict=True))
            self._previous = None

    @torch.no_grad()
    def _refresh(self) -> None:
        buffers = self._buffers
        n = int(buffers["count"])
        var = buffers["m2"] / (n - 1) if n >= 2 else torch.ones_like(buffers["m2"])
        buffers["mean32"] = buffers["mean"].to(torch.float32)
        buffers["inv_std32"] = torch.rsqrt(var + self.eps).to(torch.float32)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._previous = None
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
        scaled, statistics = self.propose(reward, done)
        self.commit(statistics)
        return scaled

    def propose(self, reward: float, done: bool) -> tuple[float, tuple[float, int, float, float]]:
        """The scaled reward and the statistics after it, without changing any: an update
        that is refused later leaves the scaler as it was. Raises NonFiniteError."""
        trace = self.trace * self.gamma + reward
        count = self.count + 1
        diff = trace - self.mean
        mean = self.mean + diff / count
        m2 = self.m2 + diff * (trace - mean)
        if not math.isfinite(m2):
            # One absurd reward would make every later reward scale to 0: refuse it.
            raise NonFiniteError(f"reward {reward!r} overflows the reward statistics")
        var = m2 / (count - 1) if count >= 2 else 1.0
        return reward / (var + self.eps) ** 0.5, (0.0 if done else trace, count, mean, m2)

    def commit(self, statistics: tuple[float, int, float, float]) -> None:
        self.trace, self.count, self.mean, self.m2 = statistics

    def state_dict(self) -> dict[str, float | int]:
        return {"trace": self.trace, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.trace = float(state["trace"])
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
