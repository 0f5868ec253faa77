"""What an operator's monitoring scrapes from the daemon: Prometheus metrics and a health
check (runtime.monitoring serves them).

Opt-in with `log.metrics_port`. The daemon serves, on its own thread:
- `/metrics`: the families below, read from the daemon's status at each scrape, so the
  loop pays nothing per step for them.
- `/healthz`: 200 while the loop is learning and made a step within `STALL_SECONDS`,
  else 503; the body is one line saying which (for a supervisor or a load balancer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import Metric

from runtime.daemon.errors import SetupError
from runtime.daemon.loop import GameSummary
from runtime.monitoring import MetricsServer, counter, gauge, labelled_counter

log = logging.getLogger("runtime.daemon")

PREFIX = "stream_agent_"
STALL_SECONDS = 60.0  # a loop without a step for this long is not healthy

Status = Callable[[], dict[str, Any]]


def status_metrics(status: Status) -> Iterator[Metric]:
    """Metric families made from one status snapshot (the status.json fields)."""
    s = status()
    yield _counter("steps", "Agent steps taken, all time (each one learner update).",
                   s["step"])
    yield _counter("games", "Whole games finished, all time.", s["games"])
    yield _counter("episodes", "Learning episodes finished, all time (a lost life "
                   "ends one where env.terminal_on_life_loss is true).", s["episodes"])
    yield _gauge("steps_per_second", "Agent steps per second, recently.",
                 s["steps_per_s"])
    recent = s["recent_games"]
    yield _gauge("recent_games", "How many of the last whole games the recent mean "
                 "return covers (at most 100).", recent["games"])
    yield _gauge("recent_mean_return", "Mean return of the recent whole games "
                 "(stream_agent_recent_games of them); NaN before the first.",
                 recent["mean_return"])
    yield _gauge("last_game_entropy", "Mean policy entropy over the last finished game.",
                 s["last_game"].get("entropy"))
    yield labelled_counter(PREFIX + "faults", "Incidents survived, all time, by kind.",
                           "kind", s["faults"].items())
    publishing = s["publishing"]
    yield _counter("policies_published", "Policies published, all time.",
                   publishing["published"])
    yield _gauge("last_published_step", "Training step of the newest published policy; "
                 "NaN before the first.", publishing["last_step"])
    yield _gauge("last_export_seconds", "Wall time of the last successful export, from "
                 "the snapshot to the signed entry; NaN before the first.",
                 publishing["last_export_seconds"])
    yield _gauge("last_checkpoint_step", "All-time step of the newest checkpoint written; "
                 "NaN before the first.", s["last_checkpoint_step"])
    yield _gauge("rss_megabytes", "Resident memory of the daemon process.", s["rss_mb"])


def _counter(name: str, doc: str, value: float) -> Metric:
    return counter(PREFIX + name, doc, value)


def _gauge(name: str, doc: str, value: float | None) -> Metric:
    return gauge(PREFIX + name, doc, value)


class MetricsEndpoint:
    """The HTTP server behind `log.metrics_port`; a job of the daemon's loop (it notes when
    the last step ended, for /healthz) that stops the server when closed."""

    def __init__(self, address: str, port: int, status: Status) -> None:
        """Listens at once, so a port in use stops the daemon before it learns (SetupError)."""
        self.status = status
        self.last_step_at: float | None = None
        try:
            self.server = MetricsServer(address, port, lambda: status_metrics(status),
                                        self.health)
        except OSError as exc:
            raise SetupError(f"log.metrics_port: cannot listen on {address}:{port} "
                             f"({exc.strerror or exc})") from None
        self.port = self.server.port
        log.info("metrics at http://%s:%d/metrics, health at /healthz", address, self.port)

    def health(self) -> tuple[bool, str]:
        state = self.status()["state"]
        if state != "running":
            return False, f"not learning: {state}"
        if self.last_step_at is None:
            return False, "not learning yet: no step taken"
        idle = time.monotonic() - self.last_step_at
        if idle > STALL_SECONDS:
            return False, f"stalled: no step for {idle:.0f} s"
        return True, f"learning: last step {idle:.1f} s ago"

    def after_step(self, step: int, now: float, game: GameSummary | None) -> None:
        self.last_step_at = now

    def close(self) -> None:
        self.server.close()
