"""Streaming normalisers: running observation statistics and reward scaling.

Both use Welford's algorithm in float64 so that weeks of samples do not drift, and both
keep their whole state in tensors so a checkpoint restores them bit-exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from agent.errors import NonFiniteError


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
        # The statistics before the last update: `update` writes the new ones into these
        # spare tensors and swaps them in (the same arithmetic as in place, no copies), so
        # `undo` takes a refused update's sample back by swapping again.
        self._spare = {name: buffer.clone() for name, buffer in self._buffers.items()}
        self._can_undo = False
        # Scratch for the float64 arithmetic: fresh temporaries of a frame stack's size
        # (225 kB each) cost page faults on every step (half of an update's time).
        self._x = torch.zeros(shape, dtype=torch.float64)
        self._diff = torch.zeros(shape, dtype=torch.float64)
        self._scratch = torch.zeros(shape, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one sample (no batch axis)."""
        x = self._x.copy_(x)
        old, new = self._buffers, self._spare
        torch.add(old["count"], 1, out=new["count"])
        diff = torch.sub(x, old["mean"], out=self._diff)
        step = torch.div(diff, new["count"], out=self._scratch)
        torch.add(old["mean"], step, out=new["mean"])
        spread = torch.sub(x, new["mean"], out=self._scratch).mul_(diff)
        torch.add(old["m2"], spread, out=new["m2"])
        self._refresh(new)
        self._swap()
        self._can_undo = True

    @torch.no_grad()
    def undo(self) -> None:
        """Forget the last `update` (one level: only the newest sample can be taken back)."""
        if self._can_undo:
            self._swap()
            self._can_undo = False

    def _swap(self) -> None:
        for name, spare in self._spare.items():
            self._spare[name], self._buffers[name] = self._buffers[name], spare

    @torch.no_grad()
    def _refresh(self, stats: dict[str, torch.Tensor]) -> None:
        n = int(stats["count"])
        var = self._scratch
        if n >= 2:
            torch.div(stats["m2"], n - 1, out=var)
        else:
            var.fill_(1.0)
        stats["mean32"].copy_(stats["mean"])
        stats["inv_std32"].copy_(torch.rsqrt_(var.add_(self.eps)))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._can_undo = False
        self._refresh(self._buffers)

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
