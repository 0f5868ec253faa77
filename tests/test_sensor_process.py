"""The stream in its own process (`run.stream_process`): the same stream as in the daemon's
process, its failures reported as stream failures, and a restart still invisible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.contract import StreamError
from runtime.sensor_process import ProcessStream
from runtime.streams import make_stream
from tests.conftest import ROOT, cli, wait_for_status
from tests.test_resume import assert_same_run_state, checkpoint_at, records

PROCESS = ["--set", "run.stream_process=true", "--set", "run.overlap_stream=true"]


def _play(stream, actions: np.ndarray, *, ahead: bool = False) -> list[tuple]:
    """What a stream gives for these actions (reset on every end); `ahead` starts each
    step with `submit` and collects it afterwards, as the overlapped loop does."""
    seen: list[tuple] = []
    for action in actions:
        if ahead:
            pending = stream.submit(int(action))
            obs, reward, terminated, truncated, info = pending.result()
        else:
            obs, reward, terminated, truncated, info = stream.step(int(action))
        seen.append((obs.tobytes(), reward, terminated, truncated, info["game_over"]))
        if terminated or truncated:
            seen.append(("reset", stream.reset().tobytes()))
    return seen


@pytest.mark.parametrize("env_id", ["CartPole-v1", "ALE/Breakout-v5"])
def test_the_process_stream_gives_what_the_stream_gives(env_id: str) -> None:
    actions = np.random.default_rng(0).integers(0, 2, size=300)
    local, remote = make_stream(env_id, seed=7), ProcessStream(env_id, seed=7)
    try:
        assert remote.spec == local.spec and remote.state_unavailable is None
        assert remote.reset().tobytes() == local.reset().tobytes()
        assert _play(remote, actions[:150], ahead=True) == _play(local, actions[:150])
        # Its state restores into a new process, which goes on as the stream would.
        state = remote.state_dict()
        remote.close()
        remote = ProcessStream(env_id, seed=99)
        remote.load_state_dict(state)
        assert _play(remote, actions[150:]) == _play(local, actions[150:])
    finally:
        remote.close()
        local.close()


@pytest.mark.parametrize(("env_id", "kwargs", "key", "words"), [
    ("NoSuchEnv-v0", {}, "id", "unknown environment id 'NoSuchEnv-v0'"),
    ("CartPole-v1", {"no_such_kwarg": 1}, "kwargs", "bad kwargs ['no_such_kwarg']"),
])
def test_a_stream_that_cannot_be_made_is_refused_naming_the_setting(
        env_id: str, kwargs: dict, key: str, words: str) -> None:
    with pytest.raises(StreamError) as refused:
        ProcessStream(env_id, kwargs)
    assert refused.value.key == key and words in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_stream_process_that_cannot_start_is_a_stream_error(monkeypatch) -> None:
    def no_processes_left(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_processes_left)
    with pytest.raises(StreamError, match="cannot start the stream process: .*unavailable"):
        ProcessStream("CartPole-v1")


def test_a_failing_step_is_reported_and_the_stream_goes_on_answering() -> None:
    stream = ProcessStream("tests.faulty_env:FaultyCartPole-v0", {"raise_step_at": [3]})
    try:
        stream.reset()
        stream.step(0)
        stream.step(1)
        with pytest.raises(StreamError, match=r"RuntimeError: sensor read failed at call 3"):
            stream.step(0)
        assert stream.step(1)[0].shape == (4,)
    finally:
        stream.close()


def test_a_dead_stream_process_is_a_stream_error_naming_how_it_died() -> None:
    stream = ProcessStream("CartPole-v1")
    stream.reset()
    stream._process.kill()
    with pytest.raises(StreamError, match=r"the stream process is gone \(killed by SIGKILL\)"):
        stream.step(0)
    stream.close()


def _daemon(run_dir: Path, *args: str) -> subprocess.Popen[str]:
    """A real daemon in its own session, so that a signal can reach its whole process
    group, as Ctrl-C on a terminal or a service manager's stop does."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.daemon", "--config", "config.yaml", "--run-dir",
         str(run_dir), "--set", "env.id=CartPole-v1", "--set", "log.status_every_seconds=0.1",
         *PROCESS, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, start_new_session=True)


def _stream_process_of(daemon: subprocess.Popen[str]) -> int:
    children = subprocess.run(["pgrep", "-P", str(daemon.pid), "-f", "runtime.sensor_process"],
                              capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children
    return int(children[0])


def test_a_killed_stream_process_is_replaced_and_the_daemon_learns_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    daemon = _daemon(run_dir, "--set", "faults.stream_backoff_seconds=0.01")
    try:
        wait_for_status(run_dir, 300)
        os.kill(_stream_process_of(daemon), signal.SIGKILL)
        status = wait_for_status(run_dir, json.loads(
            (run_dir / "status.json").read_text())["step"] + 300)
        assert status["faults"]["stream_failures"] == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, stderr
    assert "the stream process is gone (killed by SIGKILL); recreating it" in stderr


def test_sigterm_to_the_whole_process_group_then_restart_is_bit_identical(
        tmp_path: Path) -> None:
    daemon = _daemon(tmp_path / "run")
    wait_for_status(tmp_path / "run", 600)
    child = _stream_process_of(daemon)
    os.killpg(daemon.pid, signal.SIGTERM)  # the stream process gets it too, and waits
    _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, stderr
    with pytest.raises(ProcessLookupError):  # closed with the daemon, not left behind
        os.kill(child, 0)
    k = json.loads((tmp_path / "run" / "status.json").read_text())["step"]
    steps = k + 700
    sets = ["--config", "config.yaml", "--set", "env.id=CartPole-v1", *PROCESS,
            "--max-steps", str(steps)]
    again = cli("runtime.daemon", *sets, "--run-dir", str(tmp_path / "run"))
    assert again.returncode == 0, again.stderr
    assert "goes on exactly where it stopped" in again.stderr
    reference = cli("runtime.daemon", *sets, "--run-dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    assert_same_run_state(checkpoint_at(tmp_path / "run", steps),
                          checkpoint_at(tmp_path / "reference", steps))
    assert records(tmp_path / "run") == records(tmp_path / "reference")
def test_a_step_says_when_the_child_had_it(capsys: pytest.CaptureFixture[str]) -> None:
    """PendingStep.ready_ns is on this process's perf_counter clock: a reading collected
    late shows how long it waited, which tools/bench_latency.py counts as latency."""
    import time

    from tools import bench_latency

    stream = ProcessStream("CartPole-v1", seed=0)
    try:
        stream.reset()
        sent = time.perf_counter_ns()
        pending = stream.submit(0)
        time.sleep(0.05)
        pending.result()
        assert pending.ready_ns is not None
        assert sent < pending.ready_ns < time.perf_counter_ns() - 40_000_000
    finally:
        stream.close()
    assert bench_latency.main(["--steps", "40", "--warmup", "5",
                               "--set", "run.stream_process=true",
                               "--set", "run.overlap_stream=true"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["stream_process_cpu_ms_per_step"] > 0
    assert 0 < figures["decision_latency_us"]["p50"] <= figures["decision_latency_us"]["max"]
