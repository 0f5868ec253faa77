"""What an operator's monitoring scrapes, for the daemon and for the player alike.

`MetricsServer` serves, on its own thread:
- `/metrics`: the Prometheus text format, through the standard client library
  (prometheus_client: the format, the content negotiation and the metric families are
  its job, not this project's). The families are made at each scrape from the caller's
  state, so the loops pay nothing per step for them.
- `/healthz`: 200 or 503 and one line saying why (for a supervisor or a load balancer).

Only the standard library and prometheus_client: a small device serves it too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

Health = Callable[[], tuple[bool, str]]  # () -> (healthy, one line)


def counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float | None) -> Metric:
    """A gauge; None (nothing to say yet) is exposed as NaN."""
    return GaugeMetricFamily(name, doc, value=float("nan") if value is None else value)


def labelled_counter(name: str, doc: str, label: str,
                     counts: Iterable[tuple[str, float]]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family


class _Collector:
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.collect = collect

    def describe(self) -> list[Metric]:
        return []  # families are known at collect time; nothing to check at registration


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """/metrics from `collect`, /healthz from `health`, at address:port (0: any free port).
    Listens at once, so a port in use is an OSError before anything else starts."""

    def __init__(self, address: str, port: int, collect: Callable[[], Iterator[Metric]],
                 health: Health) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(collect))
        metrics = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                healthy, line = health()
                start_response("200 OK" if healthy else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8")])
                return [line.encode() + b"\n"]
            return metrics(environ, start_response)

        self.server = make_server(address, port, app, ThreadingWSGIServer, _Quiet)
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
