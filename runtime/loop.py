"""The acting/learning loop: act, step the stream, one learner update. Nothing else.

It counts steps and whole games and hands back a summary when a game ends; the daemon
decides what to do with time, files and signals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.learner import A2CLearner, Transition
from runtime.streams import Stream

# Metrics averaged over a game for metrics.jsonl.
AVERAGED = ("actor_loss", "critic_loss", "entropy", "td_error", "value")


@dataclass
class GameSummary:
    """One finished game (all its lives), as written to metrics.jsonl."""

    step: int
    game: int
    game_return: float
    length: int
    means: dict[str, float]


@dataclass
class Counters:
    """All-time counters; they live in every checkpoint."""

    steps: int = 0
    episodes: int = 0   # learning episodes (a lost life ends one when configured)
    games: int = 0      # whole games

    def as_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "episodes": self.episodes, "games": self.games}


@dataclass
class _GameTally:
    game_return: float = 0.0
    length: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(AVERAGED, 0.0))


class ActingLoop:
    """Runs the agent's life on a stream that never ends: episodes reset automatically."""

    def __init__(self, learner: A2CLearner, stream: Stream, counters: Counters) -> None:
        self.learner = learner
        self.stream = stream
        self.counters = counters
        self.observation: np.ndarray = stream.reset()
        self._tally = _GameTally()

    def step(self) -> GameSummary | None:
        """One agent step and one update; returns a summary when a whole game ended."""
        obs = self.observation
        action = self.learner.act(obs)
        next_obs, reward, terminated, truncated, info = self.stream.step(action)
        metrics = self.learner.update(
            Transition(obs, action, reward, next_obs, terminated, truncated))
        self.counters.steps += 1
        tally = self._tally
        tally.game_return += reward
        tally.length += 1
        sums = tally.sums
        for key in AVERAGED:
            sums[key] += metrics[key]
        if not (terminated or truncated):
            self.observation = next_obs
            return None
        self.counters.episodes += 1
        self.observation = self.stream.reset()
        if not info.get("game_over", True):
            return None
        self.counters.games += 1
        self._tally = _GameTally()
        return GameSummary(self.counters.steps, self.counters.games, tally.game_return,
                           tally.length, {k: v / tally.length for k, v in sums.items()})
