"""The daemon's periodic side effects behind one small interface.

The acting loop only acts and learns. After each of its steps the daemon hands every job
the all-time step, the monotonic clock and the game that ended there (None if none did);
each job decides for itself whether it is due. At the end the daemon closes them, in
order. Jobs: the game records, filming (runtime.daemon.filming), checkpoints, publishing
(the publisher process is runtime.daemon.publish), progress reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from runtime.daemon.loop import GameSummary
from runtime.daemon.progress import Progress
from runtime.daemon.publish import Publisher
from runtime.daemon.triggers import Every


class Job(Protocol):
    def after_step(self, step: int, now: float, game: GameSummary | None) -> None:
        """Called after every agent step; a few comparisons unless something is due."""

    def close(self) -> None:
        """The daemon stops: finish what is in progress."""


class RecordSink(Protocol):
    """Where each game record goes: metrics.jsonl always, TensorBoard when asked."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class GameRecords:
    """Each finished game as one record to every sink (metrics.jsonl, TensorBoard)."""

    def __init__(self, progress: Progress, sinks: Sequence[RecordSink]) -> None:
        self.progress = progress
        self.sinks = sinks

    def after_step(self, step: int, now: float, game: GameSummary | None) -> None:
        if game is not None:
            record = self.progress.game_record(game)
            for sink in self.sinks:
                sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class Checkpointing:
    """A checkpoint every checkpoint.every_steps or every_seconds; a failed one (the
    daemon logs and counts it) is tried again one interval on."""

    def __init__(self, save: Callable[[], bool], due: Every) -> None:
        self.save = save
        self.due = due

    def after_step(self, step: int, now: float, game: GameSummary | None) -> None:
        if self.due.due(step, now):
            self.save()
            self.due.reset(step, now)

    def close(self) -> None:
        """The final checkpoint is the daemon's shutdown, not a periodic one."""


class Publishing:
    """Hands the publisher each step, with the returns of the recent games that a
    published policy reports."""

    def __init__(self, publisher: Publisher, progress: Progress) -> None:
        self.publisher = publisher
        self.progress = progress

    def after_step(self, step: int, now: float, game: GameSummary | None) -> None:
        self.publisher.tick(step, now, self.progress.recent_returns)

    def close(self) -> None:
        self.publisher.close()


class Reporting:
    """status.json, the live line or summary lines, and the watchdog's ping, at most as
    often as `due` allows."""

    def __init__(self, progress: Progress, due: Every) -> None:
        self.progress = progress
        self.due = due

    def after_step(self, step: int, now: float, game: GameSummary | None) -> None:
        if self.due.due(step, now):
            self.progress.tick(now, "running")
            self.due.reset(step, now)

    def close(self) -> None:
        """The daemon writes the final status itself, after its final checkpoint."""
