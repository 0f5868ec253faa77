"""Periodic side effects as small objects, not branches in the loop."""

from __future__ import annotations

import math


class Every:
    """Due at each multiple of `steps` agent steps or after `seconds`, whichever comes
    first; stays due until `reset` (a side effect that could not run now runs later).
    With both None it is never due."""

    def __init__(self, steps: int | None, seconds: float | None, step: int,
                 now: float) -> None:
        self.steps = steps
        self.seconds = seconds
        self.reset(step, now)

    @property
    def enabled(self) -> bool:
        return bool(self.steps or self.seconds)

    def due(self, step: int, now: float) -> bool:
        return step >= self.next_step or now >= self.next_time

    def reset(self, step: int, now: float) -> None:
        """The side effect ran at `step`, `now`: the next is one interval on."""
        self.next_step = (step // self.steps + 1) * self.steps if self.steps else math.inf
        self.next_time = now + self.seconds if self.seconds else math.inf
