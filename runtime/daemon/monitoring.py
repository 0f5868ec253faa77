"""What an operator's monitoring scrapes: Prometheus metrics and a health check.

Opt-in with `log.metrics_port`. The daemon serves, on its own thread:
- `/metrics`: the Prometheus text format, through the standard client library
  (prometheus_client: the format, the content negotiation and the metric families are
  its job, not this project's). The values are read from the daemon's status at each
  scrape, so the loop pays nothing per step for them.
- `/healthz`: 200 while the loop is learning and made a step within `STALL_SECONDS`,
  else 503; the body is one line saying which (for a supervisor or a load balancer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from runtime.daemon.errors import SetupError
from runtime.daemon.loop import GameSummary

log = logging.getLogger("runtime.daemon")

PREFIX = "stream_agent_"
STALL_SECONDS = 60.0  # a loop without a step for this long is not healthy

Status = Callable[[], dict[str, Any]]


class StatusCollector:
    """Metric families made from one status snapshot (the status.json fields) per scrape."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def describe(self) -> list[Metric]:
        return []  # families are known at collect time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self.status()
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
        faults = CounterMetricFamily(PREFIX + "faults", "Incidents survived, all time, by "
                                     "kind.", labels=["kind"])
        for kind, count in s["faults"].items():
            faults.add_metric([kind], count)
        yield faults
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
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float | None) -> Metric:
    return GaugeMetricFamily(PREFIX + name, doc, value=float("nan") if value is None else value)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Scrapes are not worth a log line each."""


class MetricsEndpoint:
    """The HTTP server behind `log.metrics_port`; a job of the daemon's loop (it notes when
    the last step ended, for /healthz) that stops the server when closed."""

    def __init__(self, address: str, port: int, status: Status) -> None:
        """Listens at once, so a port in use stops the daemon before it learns (SetupError)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatusCollector(status))
        metrics = make_wsgi_app(registry)
        self.status = status
        self.last_step_at: float | None = None

        def app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                healthy, line = self.health()
                start_response("200 OK" if healthy else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8")])
                return [line.encode() + b"\n"]
            return metrics(environ, start_response)

        try:
            self.server = make_server(address, port, app, ThreadingWSGIServer, _Quiet)
        except OSError as exc:
            raise SetupError(f"log.metrics_port: cannot listen on {address}:{port} "
                             f"({exc.strerror or exc})") from None
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()
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
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
