"""How a run reports itself: one record per game, status.json, the live terminal line and
periodic summary lines. It reads the counters it is given and writes; it decides nothing."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runtime.daemon.loop import Counters, GameSummary
from runtime.daemon.process import memory_mb
from runtime.daemon.triggers import Every
from runtime.metrics import write_status
from runtime.sdnotify import Notifier

log = logging.getLogger("runtime.daemon")

RECENT_GAMES = 100  # the "return(last N)" of the progress line and of published policies


class Progress:
    """Game records, status.json (every `status_seconds`), the live line on a terminal, or
    a summary log line every `summary_seconds` when stderr is not one."""

    def __init__(self, counters: Counters, status_path: Path, notifier: Notifier, *,
                 status_seconds: float, summary_seconds: float,
                 extra_status: Callable[[], dict[str, Any]], live: bool,
                 recent_returns: Sequence[float] = ()) -> None:
        """`extra_status`: what other pieces add to status.json (the last checkpoint,
        publishing), asked for at each write. `recent_returns`: the returns of the games
        the run had finished before this start, oldest first (a restart goes on with them)."""
        self.counters = counters
        self.status_path = status_path
        self.notifier = notifier
        self.extra_status = extra_status
        self.live = live
        self.restart_note: str | None = None  # said in the next game record
        self.started = time.time()
        now = time.monotonic()
        self.last_time = now
        self.last_steps = counters.steps
        self.steps_per_s = 0.0
        self.status_due = Every(None, status_seconds, counters.steps, now - status_seconds)  # now
        self.summary_due = Every(None, summary_seconds, counters.steps, now)
        self.recent_returns: list[float] = list(recent_returns)[-RECENT_GAMES:]
        self.last_game: dict[str, float] = {}  # the last finished game's metric means
        self.state = "starting"  # running, stopping, stopped or failed after that

    def game_record(self, summary: GameSummary) -> dict[str, Any]:
        """The metrics.jsonl line of a finished game."""
        self.recent_returns = (self.recent_returns + [summary.game_return])[-RECENT_GAMES:]
        self.last_game = dict(summary.means)
        record = {"step": summary.step, "game": summary.game, "return": summary.game_return,
                  "length": summary.length, "time": round(time.time(), 3),
                  "steps_per_s": round(self.steps_per_s, 1),
                  **{k: round(v, 6) for k, v in summary.means.items()}}
        if self.restart_note is not None:
            record["restarted"], self.restart_note = self.restart_note, None
        return record

    def tick(self, now: float, state: str, force: bool = False) -> None:
        self.state = state
        steps = self.counters.steps
        if now > self.last_time + 0.5:
            self.steps_per_s = (steps - self.last_steps) / (now - self.last_time)
            self.last_time, self.last_steps = now, steps
        if force or self.status_due.due(steps, now):
            self.write_status(state)
            self.status_due.reset(steps, now)
        self.notifier.alive(self.line())
        if self.live:
            sys.stderr.write(f"\r{self.line()}  ")
            sys.stderr.flush()
        elif self.summary_due.due(steps, now):
            log.info(self.line())
            self.summary_due.reset(steps, now)

    def recent_mean_return(self) -> float | None:
        """Mean return of the last (up to RECENT_GAMES) whole games; None before the first."""
        recent = self.recent_returns
        return sum(recent) / len(recent) if recent else None

    def line(self) -> str:
        c = self.counters
        mean = self.recent_mean_return()
        mean = float("nan") if mean is None else mean
        return (f"step {c.steps}  games {c.games}  return(last {len(self.recent_returns)}) "
                f"{mean:.2f}  {self.steps_per_s:.0f} steps/s")

    def write_status(self, state: str) -> None:
        self.state = state
        write_status(self.status_path, self.status())

    def status(self) -> dict[str, Any]:
        """What status.json says, and the metrics endpoint serves."""
        c = self.counters
        return {
            "step": c.steps, "episodes": c.episodes, "games": c.games,
            "recent_games": {"games": len(self.recent_returns),
                             "mean_return": self.recent_mean_return()},
            "last_game": self.last_game,
            **self.extra_status(),
            "steps_per_s": round(self.steps_per_s, 1), "pid": os.getpid(),
            "state": self.state, "faults": asdict(c.faults), **memory_mb(),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
        }
