"""ObGD: overshooting-bounded gradient descent with eligibility traces (stream-x).

The step size shrinks whenever one update could move the prediction by more than the TD
error itself: alpha_eff = alpha / max(1, alpha * kappa * max(|delta|, 1) * ||z||_1).
Gradients are passed in (not read from .grad), so two instances can own separate traces
over shared parameters (the seed network's trunk feeds both policy and value).
"""

from __future__ import annotations

import torch
from torch import nn


class ObGD:
    """theta <- theta - alpha_eff * delta * z with z <- gamma * lambda * z + grad.

    `grad` is the gradient of -V or of -log pi (the objective whose increase is wanted),
    so a positive delta moves the prediction up.
    """

    def __init__(self, params: list[nn.Parameter], *, lr: float, gamma: float,
                 lambda_: float, kappa: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.decay = gamma * lambda_
        self.kappa = kappa
        self.traces = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, delta: float, grads: list[torch.Tensor], reset: bool) -> float:
        """Apply one update; returns the effective step size. `reset` clears the traces
        after the update (episode boundary)."""
        if self.decay == 0.0:
            # lambda = 0: the trace is exactly this step's gradient (pure one-step update).
            torch._foreach_copy_(self.traces, grads)
        else:
            torch._foreach_mul_(self.traces, self.decay)
            torch._foreach_add_(self.traces, grads)
        trace_l1 = float(torch.stack(torch._foreach_norm(self.traces, 1)).sum())
        bound = self.lr * self.kappa * max(abs(delta), 1.0) * trace_l1
        step_size = self.lr / bound if bound > 1.0 else self.lr
        torch._foreach_add_(self.params, self.traces, alpha=-step_size * delta)
        if reset:
            self.reset()
        return step_size

    def reset(self) -> None:
        for trace in self.traces:
            trace.zero_()

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"traces": [t.clone() for t in self.traces]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        traces = state["traces"]
        if len(traces) != len(self.traces) or any(
                a.shape != b.shape for a, b in zip(traces, self.traces, strict=True)):
            raise ValueError("ObGD traces do not match the network's parameters")
        for mine, saved in zip(self.traces, traces, strict=True):
            mine.copy_(saved)
