"""The policy's distribution: what the update asks of it, and how the actor samples it.

The update needs only `log_prob(head, action)` and `entropy(head)` from the policy head's
output, so another distribution (a Gaussian head for continuous actions) can take this
one's place without touching the update.
"""

from __future__ import annotations

import math

import torch


class Categorical:
    """A categorical distribution over discrete actions, from the head's logits."""

    def __init__(self, num_actions: int) -> None:
        self.num_actions = num_actions

    @property
    def max_entropy(self) -> float:
        """ln(actions): the entropy of the uniform policy (1 for a single action)."""
        return math.log(self.num_actions) if self.num_actions > 1 else 1.0

    @staticmethod
    def log_prob(logits: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log pi(action); `action` is a 0-d integer tensor (traced, not a Python int)."""
        return torch.log_softmax(logits, dim=-1).gather(0, action.view(1))[0]

    @staticmethod
    def entropy(logits: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        return -(log_probs.exp() * log_probs).sum()

    @staticmethod
    def sample(logits: torch.Tensor, generator: torch.Generator) -> int:
        """One draw by inverse CDF in Python over a handful of probabilities: a fraction
        of torch.multinomial's cost for a single draw."""
        probs = torch.softmax(logits.detach(), dim=-1).tolist()
        u = float(torch.rand((), generator=generator)) * sum(probs)
        cumulative = 0.0
        for action, p in enumerate(probs):
            cumulative += p
            if u < cumulative:
                return action
        return len(probs) - 1  # u landed on the rounding error at the top
