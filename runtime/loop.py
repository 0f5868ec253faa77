"""The acting/learning loop: act, step the stream, one learner update. Nothing else.

It counts steps, whole games and faults, and hands back a summary when a game ends; the
daemon decides what to do with time, files, signals and failures.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from agent.learner import A2CLearner, Transition
from agent.optimizers import NonFiniteError
from runtime.streams import Stream
from runtime.video import GameRecorder, VideoError

log = logging.getLogger(__name__)

# Metrics averaged over a game for metrics.jsonl.
AVERAGED = ("actor_loss", "critic_loss", "entropy", "td_error", "value")


class StreamFault(Exception):
    """The stream raised during reset or step; the learner was not touched."""


class RollbackNeeded(Exception):
    """A non-finite update under `faults.on_nonfinite: rollback`."""


@dataclass
class GameSummary:
    """One finished game (all its lives), as written to metrics.jsonl."""

    step: int
    game: int
    game_return: float
    length: int
    means: dict[str, float]


@dataclass
class FaultCounts:
    """Incidents survived; reported in status.json and kept across restarts."""

    nonfinite_inputs: int = 0      # NaN/Inf observation or reward from the stream
    nonfinite_updates: int = 0     # NaN/Inf TD error, gradient or trace: update skipped
    rollbacks: int = 0             # learner restored from the last good checkpoint
    stream_failures: int = 0       # the stream raised and was recreated
    checkpoint_failures: int = 0   # a checkpoint could not be written


@dataclass
class Counters:
    """All-time counters; they live in every checkpoint."""

    steps: int = 0
    episodes: int = 0   # learning episodes (a lost life ends one when configured)
    games: int = 0      # whole games
    faults: FaultCounts = field(default_factory=FaultCounts)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Counters:
        faults = FaultCounts(**data.get("faults", {}))
        return cls(int(data["steps"]), int(data["episodes"]), int(data["games"]), faults)


@dataclass
class _GameTally:
    game_return: float = 0.0
    length: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(AVERAGED, 0.0))


class ActingLoop:
    """Runs the agent's life on a stream that never ends: episodes reset automatically."""

    def __init__(self, learner: A2CLearner, stream: Stream, counters: Counters,
                 rollback_on_nonfinite: bool = False) -> None:
        self.learner = learner
        self.counters = counters
        self.rollback_on_nonfinite = rollback_on_nonfinite
        self._tally = _GameTally()
        self.recorder: GameRecorder | None = None  # set while a game is being filmed
        self.attach(stream)

    def attach(self, stream: Stream) -> None:
        """Start (or restart after a failure) on a stream: a new episode begins."""
        self.stream = stream
        # uint8 frames cannot hold NaN; only float streams need the finiteness check.
        self._float_obs = stream.spec.observation_dtype != "uint8"
        self.observation: np.ndarray = self._reset()

    def _reset(self) -> np.ndarray:
        try:
            return self.stream.reset()
        except Exception as exc:  # noqa: BLE001 - any sensor failure is recoverable
            raise StreamFault(f"reset: {type(exc).__name__}: {exc}") from exc

    def step(self) -> GameSummary | None:
        """One agent step and one update; returns a summary when a whole game ended."""
        obs = self.observation
        action = self.learner.act(obs)
        try:
            next_obs, reward, terminated, truncated, info = self.stream.step(action)
        except Exception as exc:  # noqa: BLE001 - any sensor failure is recoverable
            raise StreamFault(f"step: {type(exc).__name__}: {exc}") from exc
        self.counters.steps += 1
        if self.recorder is not None:
            self._film()
        if not math.isfinite(reward) or (self._float_obs and not np.isfinite(next_obs).all()):
            # A corrupt reading: learn nothing from it, and start a clean episode.
            self.counters.faults.nonfinite_inputs += 1
            self.learner.reset_traces()
            self.observation = self._reset()
            return None
        try:
            metrics = self.learner.update(
                Transition(obs, action, reward, next_obs, terminated, truncated))
        except NonFiniteError:
            self.counters.faults.nonfinite_updates += 1
            if self.rollback_on_nonfinite:
                raise RollbackNeeded from None
            metrics = None
        return self._tally_step(metrics, reward, terminated or truncated, next_obs, info)

    def _film(self) -> None:
        try:
            self.recorder.frame(self.stream.render_rgb)
        except VideoError as exc:  # a video is never worth stopping the agent for
            log.warning("video recording stopped: %s", exc)
            self.recorder.finish()
            self.recorder = None

    def _tally_step(self, metrics: dict[str, float] | None, reward: float, done: bool,
                    next_obs: np.ndarray, info: dict) -> GameSummary | None:
        tally = self._tally
        tally.game_return += reward
        tally.length += 1
        if metrics is not None:
            sums = tally.sums
            for key in AVERAGED:
                sums[key] += metrics[key]
        if not done:
            self.observation = next_obs
            return None
        self.counters.episodes += 1
        self.observation = self._reset()
        if not info.get("game_over", True):
            return None
        self.counters.games += 1
        self._tally = _GameTally()
        return GameSummary(self.counters.steps, self.counters.games, tally.game_return,
                           tally.length, {k: v / tally.length for k, v in tally.sums.items()})
