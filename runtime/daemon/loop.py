"""The acting/learning loop: act, step the stream, one learner update. Nothing else.

It counts steps, whole games and faults, and hands back a summary when a game ends; the
daemon decides what to do with time, files, signals and failures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from agent.errors import NonFiniteError
from agent.learner import A2CLearner, Transition
from runtime.streams import Stream, StreamError
from runtime.video import GameRecorder, VideoError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Metrics averaged over a game for metrics.jsonl.
AVERAGED = ("actor_loss", "critic_loss", "entropy", "entropy_coeff", "td_error", "value")


class StreamFault(Exception):
    """The stream raised during reset or step; the learner was not touched."""


class RollbackNeeded(Exception):
    """A non-finite update under `faults.on_nonfinite: rollback`. The step itself was
    counted; `summary` is its game summary, if it ended a game."""

    def __init__(self, summary: GameSummary | None) -> None:
        super().__init__("a non-finite update")
        self.summary = summary


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
    export_failures: int = 0       # a policy could not be exported, verified or published


@dataclass
class PublishCounts:
    """Policies published so far (runtime.daemon.publish); kept across restarts."""

    published: int = 0
    last_step: int | None = None   # the training step of the newest published policy


@dataclass
class Counters:
    """All-time counters; they live in every checkpoint."""

    steps: int = 0
    episodes: int = 0   # learning episodes (a lost life ends one when configured)
    games: int = 0      # whole games
    faults: FaultCounts = field(default_factory=FaultCounts)
    publishing: PublishCounts = field(default_factory=PublishCounts)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Counters:
        faults = FaultCounts(**data.get("faults", {}))
        publishing = PublishCounts(**data.get("publishing", {}))  # absent in older ones
        return cls(int(data["steps"]), int(data["episodes"]), int(data["games"]), faults,
                   publishing)


@dataclass
class _GameTally:
    game_return: float = 0.0
    length: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(AVERAGED, 0.0))


def _sensor(what: str, call: Callable[..., T], *args: object) -> T:
    """Call the stream; any failure of the sensor becomes a recoverable StreamFault
    naming what failed."""
    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001 - any sensor failure is recoverable
        raise StreamFault(f"{what}: {type(exc).__name__}: {exc}") from exc


class ActingLoop:
    """Runs the agent's life on a stream that never ends: episodes reset automatically."""

    def __init__(self, learner: A2CLearner, stream: Stream, counters: Counters,
                 rollback_on_nonfinite: bool = False, resume: dict[str, Any] | None = None) -> None:
        self.learner = learner
        self.counters = counters
        self.rollback_on_nonfinite = rollback_on_nonfinite
        self._tally = _GameTally()
        self.recorder: GameRecorder | None = None  # set while a game is being filmed
        # Why a resumed run could not go on with the episode it was in (None: it did).
        self.cut: str | None = None
        if resume is None:
            self.attach(stream)
            return
        try:
            self.load_state_dict(stream, resume)
        except (StreamError, KeyError, ValueError, TypeError) as exc:
            self.cut = str(exc) or type(exc).__name__
            self._tally = _GameTally()
            self.learner.reset_traces()  # a new episode: no credit across the cut
            self.attach(stream)

    def attach(self, stream: Stream) -> None:
        """Start (or restart after a failure) on a stream: a new episode begins."""
        self._use(stream)
        self.observation: np.ndarray = self._reset()

    def _use(self, stream: Stream) -> None:
        self.stream = stream
        # uint8 frames cannot hold NaN; only float streams need the finiteness check.
        self._float_obs = stream.spec.observation_dtype != "uint8"

    # -- state (checkpoints) -------------------------------------------------------------

    def state_dict(self, stream_usable: bool = True) -> dict[str, Any]:
        """Where the agent stands, between two steps: the observation and whether the
        learner has seen it, the running game's tally, and the stream's own state, or why
        it is missing."""
        why = self.stream.state_unavailable if stream_usable else "the stream had failed"
        stream_state = None
        if why is None:
            try:
                stream_state = self.stream.state_dict()
            except StreamError as exc:
                why = f"the stream's state could not be read: {exc}"
        tally = self._tally
        return {"observation": torch.from_numpy(self.observation.copy()),
                "seen": self.learner.has_seen(self.observation),
                "tally": {"return": tally.game_return, "length": tally.length,
                          "sums": dict(tally.sums)},
                "filming": self.recorder is not None,
                "stream": stream_state,
                "stream_unavailable": why}

    def load_state_dict(self, stream: Stream, state: dict[str, Any]) -> None:
        """Go on exactly where `state_dict` was taken, on a new stream of the same kind;
        raises StreamError (or KeyError) when that cannot be done."""
        if state.get("stream") is None:
            raise StreamError(state.get("stream_unavailable") or "no stream state was saved")
        if state.get("in_flight") is not None:
            raise StreamError("saved with a stream step in flight (run.overlap_stream, "
                              "since removed)")
        stream.load_state_dict(state["stream"])
        self._use(stream)
        self.observation = state["observation"].numpy()
        self.learner.resume_on(self.observation, bool(state["seen"]))
        tally = state["tally"]
        self._tally = _GameTally(float(tally["return"]), int(tally["length"]),
                                 {k: float(tally["sums"][k]) for k in AVERAGED})

    def _reset(self) -> np.ndarray:
        return _sensor("reset", self.stream.reset)

    def step(self) -> GameSummary | None:
        """One agent step and one update; returns a summary when a whole game ended."""
        obs = self.observation
        try:
            action = self.learner.act(obs)
        except NonFiniteError:  # a reset gave a NaN/Inf reading
            return self._drop_reading()
        next_obs, reward, terminated, truncated, info = _sensor("step", self.stream.step, action)
        self.counters.steps += 1
        if self.recorder is not None:
            self._film()
        if not math.isfinite(reward) or (self._float_obs and not np.isfinite(next_obs).all()):
            return self._drop_reading()
        try:
            metrics = self.learner.update(
                Transition(obs, action, reward, next_obs, terminated, truncated))
        except NonFiniteError:
            self.counters.faults.nonfinite_updates += 1
            metrics = None
        summary = self._tally_step(metrics, reward, terminated or truncated, next_obs, info)
        if metrics is None and self.rollback_on_nonfinite:
            raise RollbackNeeded(summary)  # after the step is counted: the stream moved on
        return summary

    def _drop_reading(self) -> None:
        """A corrupt reading: learn nothing from it, and start a clean episode."""
        self.counters.faults.nonfinite_inputs += 1
        self.learner.reset_traces()
        self.observation = self._reset()

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
