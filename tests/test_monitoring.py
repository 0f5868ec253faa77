"""The daemon's metrics endpoint (log.metrics_port): what a Prometheus scraper and a
supervisor polling /healthz see."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.daemon.errors import SetupError
from runtime.daemon.monitoring import STALL_SECONDS, MetricsEndpoint
from tests.conftest import CARTPOLE, cli, free_port, http_get, start_daemon, wait_for_status


def _status(state: str = "running") -> dict:
    return {"state": state, "step": 7, "games": 1, "episodes": 2, "steps_per_s": 3.5,
            "recent_games": {"games": 1, "mean_return": 12.0}, "last_game": {"entropy": 0.6},
            "faults": {"nonfinite_inputs": 0, "stream_failures": 2},
            "publishing": {"published": 0, "last_step": None, "last_export_seconds": None},
            "last_checkpoint_step": None, "rss_mb": 100.0}


def test_a_learning_daemon_is_scraped_and_healthy(run_dir: Path) -> None:
    port = free_port()
    daemon = start_daemon("--config", "config.yaml", "--run-dir", str(run_dir), *CARTPOLE,
                          "--set", f"log.metrics_port={port}")
    try:
        wait_for_status(run_dir, 50, timeout=120)
        url = f"http://127.0.0.1:{port}"
        code, line = http_get(url + "/healthz")
        assert code == 200 and line.startswith("learning: last step"), line
        code, text = http_get(url + "/metrics")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        steps = families["stream_agent_steps"]
        assert steps.type == "counter" and steps.samples[0].value >= 50
        faults = {s.labels["kind"]: s.value for s in families["stream_agent_faults"].samples
                  if s.name.endswith("_total")}
        assert faults["stream_failures"] == 0 and "export_failures" in faults
        for name in ("stream_agent_recent_mean_return", "stream_agent_last_published_step",
                     "stream_agent_steps_per_second", "stream_agent_last_game_entropy"):
            assert families[name].type == "gauge", name
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, err
    with pytest.raises(OSError):  # the endpoint went with the daemon
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_port_in_use_stops_the_daemon_before_it_learns(run_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
                   *CARTPOLE, "--set", f"log.metrics_port={port}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"daemon: error: log.metrics_port: cannot listen on 127.0.0.1:{port} "
        f"(Address already in use)")
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_health_says_why_not() -> None:
    status = _status("starting")
    endpoint = MetricsEndpoint("127.0.0.1", 0, lambda: status)
    try:
        url = f"http://127.0.0.1:{endpoint.port}/healthz"
        assert http_get(url) == (503, "not learning: starting\n")
        status["state"] = "running"
        assert http_get(url) == (503, "not learning yet: no step taken\n")
        endpoint.after_step(7, time.monotonic(), None)
        assert http_get(url)[0] == 200
        endpoint.after_step(7, time.monotonic() - STALL_SECONDS - 5, None)
        code, line = http_get(url)
        assert code == 503 and line.startswith("stalled: no step for 6")
        status["state"] = "stopped"
        assert http_get(url) == (503, "not learning: stopped\n")
        families = {f.name: f for f in text_string_to_metric_families(
            http_get(f"http://127.0.0.1:{endpoint.port}/metrics")[1])}
        assert families["stream_agent_recent_mean_return"].samples[0].value == 12.0
        assert str(families["stream_agent_last_published_step"].samples[0].value) == "nan"
    finally:
        endpoint.close()
    with pytest.raises(SetupError, match=r"log.metrics_port: cannot listen on 127.0.0.1:"):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            MetricsEndpoint("127.0.0.1", taken.getsockname()[1], lambda: status)
