"""A restart is invisible: a run stopped (SIGTERM) or killed (SIGKILL) and started again goes
on bit-identically to one that never stopped — the same actions, rewards and episode ends,
weights, optimiser state and traces, normalisers, RNG, stream state and metrics.jsonl
records (apart from the wall-clock fields)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.networks import resolve_network
from runtime.daemon.checkpoints import CheckpointStore, encode, read_checkpoint
from runtime.daemon.config import load_config
from runtime.daemon.lifecycle import Daemon
from runtime.daemon.loop import ActingLoop
from runtime.daemon.supervision import stream_seed
from runtime.metrics import read_jsonl
from tests.conftest import ROOT, cli, start_daemon, wait_for_status
from tools.research.learning import summarize

WALL_CLOCK = ("time", "steps_per_s")


def run_in_process(run_dir: Path, base: str, sets: list[str], max_steps: int,
                   sigterm_at: int | None = None) -> list[tuple]:
    """The daemon in this process, as `main` runs it, up to `max_steps` all-time steps.
    Returns what the stream saw and gave: ("reset", obs) and (action, reward, terminated,
    truncated, obs) in order. `sigterm_at`: a real SIGTERM during that step of this start."""
    config = load_config(ROOT / base, ["export.on_stop=false", *sets, f"run.dir={run_dir}",
                                       f"run.max_steps={max_steps}"])
    daemon = Daemon(config, fresh=False)
    daemon.prepare()
    seen: list[tuple] = []
    stream = daemon.stream
    step, reset = stream.step, stream.reset

    def recorded_step(action: int) -> tuple:
        result = step(action)
        seen.append((action, result[1], result[2], result[3], result[0].tobytes()))
        if sum(len(s) == 5 for s in seen) == sigterm_at:
            signal.raise_signal(signal.SIGTERM)  # the handler sets the flag; the step ends
        return result

    def recorded_reset() -> np.ndarray:
        obs = reset()
        seen.append(("reset", obs.tobytes()))
        return obs

    stream.step, stream.reset = recorded_step, recorded_reset
    try:
        assert daemon.run() == 0
    finally:
        daemon.release()
    return seen


def mid_game_step(seen: list[tuple], nominal: int) -> int:
    """The first step from `nominal` on such that neither it nor the one before ends an
    episode: the trajectory, though the same on every run here, differs between CPUs (float
    rounding differs by instruction set), so a fixed step can land on an episode's end."""
    ends = {i for i, s in enumerate((s for s in seen if len(s) == 5), start=1) if s[2] or s[3]}
    return next(k for k in range(nominal, len(seen)) if k not in ends and k - 1 not in ends)


def records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines]


def checkpoint_at(run_dir: Path, step: int) -> dict[str, Any]:
    return read_checkpoint(run_dir / "checkpoints" / f"ckpt-{step:012d}.pt")


def assert_same(a: object, b: object, where: str = "checkpoint") -> None:
    """Equal down to the last bit: tensors with torch.equal, bytes and numbers with ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def assert_same_run_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Everything that decides the future: the learner, the counters, the stream position."""
    for key in ("learner", "counters", "loop", "spec"):
        assert_same(a[key], b[key], key)


# (id, config file, --set lines, steps N, SIGTERM during step k)
EXACT_CASES = [
    ("breakout-obgd", "config.yaml", [], 2000, 1100),
    ("breakout-adam", "presets/seed.yaml", [], 2000, 1100),
    ("cartpole-obgd", "config.yaml", ["env.id=CartPole-v1"], 3000, 1337),
    ("cartpole-adam-lambda", "config.yaml",
     ["env.id=CartPole-v1", "agent.optimizer=adam", "agent.lr=0.001"], 3000, 1337),
]


@pytest.mark.parametrize(("base", "sets", "steps", "stop"),
                         [pytest.param(*case[1:], id=case[0]) for case in EXACT_CASES])
def test_sigterm_mid_game_then_restart_is_bit_identical_to_never_stopping(
        tmp_path: Path, base: str, sets: list[str], steps: int, stop: int) -> None:
    reference = run_in_process(tmp_path / "reference", base, sets, steps)
    stop = mid_game_step(reference, stop)
    first = run_in_process(tmp_path / "run", base, sets, steps, sigterm_at=stop)
    stopped_at = read_checkpoint(CheckpointStore(tmp_path / "run" / "checkpoints", 3)
                                 .paths()[0])
    k = stopped_at["counters"]["steps"]
    assert stop - 1 <= k <= stop  # the step in progress finished
    assert stopped_at["loop"]["tally"]["length"] > 0, "the stop should land mid-game"
    assert stopped_at["loop"]["stream"] is not None
    second = run_in_process(tmp_path / "run", base, sets, steps)
    assert first + second == reference  # actions, rewards, ends, observations, resets
    assert sum(len(s) == 5 for s in reference) >= steps
    assert_same_run_state(checkpoint_at(tmp_path / "run", steps),
                          checkpoint_at(tmp_path / "reference", steps))
    resumed = records(tmp_path / "run")
    assert resumed == records(tmp_path / "reference")
    assert any(r["step"] > k for r in resumed) and any(r["step"] <= k for r in resumed)
    log = (tmp_path / "run" / "daemon.log").read_text()
    assert f"step {k}: the episode in progress goes on exactly" in log
    status = [json.loads((tmp_path / d / "status.json").read_text())["recent_games"]
              for d in ("run", "reference")]
    assert status[0] == status[1]  # the games before the stop still count


def test_real_sigterm_to_a_real_daemon_then_restart_is_bit_identical(tmp_path: Path) -> None:
    args = ["--config", "config.yaml", "--set", "env.id=CartPole-v1",
            "--set", "log.status_every_seconds=0.1"]
    proc = start_daemon(*args, "--run-dir", str(tmp_path / "run"))
    wait_for_status(tmp_path / "run", 600)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    k = json.loads((tmp_path / "run" / "status.json").read_text())["step"]
    steps = k + 700
    again = cli("runtime.daemon", *args, "--run-dir", str(tmp_path / "run"), "--max-steps",
                str(steps))
    assert again.returncode == 0, again.stderr
    assert "goes on exactly where it stopped" in again.stderr
    reference = cli("runtime.daemon", *args, "--run-dir", str(tmp_path / "reference"),
                    "--max-steps", str(steps))
    assert reference.returncode == 0, reference.stderr
    assert_same_run_state(checkpoint_at(tmp_path / "run", steps),
                          checkpoint_at(tmp_path / "reference", steps))
    assert records(tmp_path / "run") == records(tmp_path / "reference")


def _strip_stream_position(run_dir: Path, step: int) -> None:
    """Make the checkpoint look like one written before streams were checkpointed."""
    path = run_dir / "checkpoints" / f"ckpt-{step:012d}.pt"
    payload = read_checkpoint(path)
    del payload["loop"], payload["format_version"]
    path.write_bytes(encode(payload))


def test_a_step_in_flight_saved_by_the_removed_overlapped_loop_starts_a_new_episode(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sets = ["env.id=CartPole-v1"]
    run_in_process(run_dir, "config.yaml", sets, 240)
    path = run_dir / "checkpoints" / f"ckpt-{240:012d}.pt"
    payload = read_checkpoint(path)
    loop_state = payload["loop"]
    loop_state["in_flight"] = {"action": 1, "observation": loop_state["observation"],
                               "reward": 1.0, "terminated": False, "truncated": False,
                               "game_over": False}
    path.write_bytes(encode(payload))
    config = load_config(ROOT / "config.yaml", [*sets, f"run.dir={run_dir}"])
    daemon = Daemon(config, fresh=False)
    daemon.prepare()
    try:
        loop = ActingLoop(daemon.learner, daemon.stream, daemon.counters,
                          resume=daemon.resume_state)
        assert loop.cut is not None and "run.overlap_stream, since removed" in loop.cut
        assert not daemon.learner.state.optimizer.policy_trace.any()
        loop.step()  # it learns on from the new episode
        assert daemon.counters.steps == 241
    finally:
        daemon.release()


def test_old_checkpoint_without_stream_state_starts_a_new_episode_with_traces_reset(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sets = ["env.id=CartPole-v1"]
    first = run_in_process(run_dir, "config.yaml", sets, 240)
    _strip_stream_position(run_dir, 240)
    config = load_config(ROOT / "config.yaml", [*sets, f"run.dir={run_dir}"])
    daemon = Daemon(config, fresh=False)
    daemon.prepare()
    try:
        traces = daemon.learner.state.optimizer
        assert traces.policy_trace.abs().sum() > 0  # saved mid-episode
        loop = ActingLoop(daemon.learner, daemon.stream, daemon.counters,
                          resume=daemon.resume_state)
        assert "holds no position in the stream" in loop.cut
        traces = daemon.learner.state.optimizer
        assert not traces.policy_trace.any()
        assert not traces.value_trace.any()
    finally:
        daemon.release()
    second = run_in_process(run_dir, "config.yaml", sets, 400)
    # Not the first run's episode starts again: the stream is seeded for this start.
    assert second[0][0] == "reset" and second[0] != first[0]
    assert stream_seed(0, 240) not in (0, stream_seed(0, 241))
    log = (run_dir / "daemon.log").read_text()
    assert "step 240: a new episode, traces reset" in log
    after = [r for r in records(run_dir) if r["step"] > 240]
    assert after[0]["restarted"].startswith("step 240: a new episode after the restart")
    assert all("restarted" not in r for r in after[1:])


def test_a_stream_whose_state_cannot_be_captured_says_so_and_starts_a_new_episode(
        tmp_path: Path) -> None:
    sets = ["env.id=tests.faulty_env:FaultyCartPole-v0"]
    run_in_process(tmp_path / "run", "config.yaml", sets, 200)
    assert checkpoint_at(tmp_path / "run", 200)["loop"]["stream"] is None
    run_in_process(tmp_path / "run", "config.yaml", sets, 400)
    log = (tmp_path / "run" / "daemon.log").read_text()
    assert "step 200: a new episode, traces reset: the stream's state could not be " \
           "restored (tests.faulty_env.FaultyCartPole is not an environment" in log


def _tensorboard_returns(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("game/return")]


def test_sigkill_between_checkpoints_then_restart_counts_every_game_once(
        tmp_path: Path) -> None:
    """Metrics follow the checkpoint: the records written after it are moved aside, and
    the game counter, metrics.jsonl, TensorBoard and tools/research/learning.py's summary end up as
    those of a run that was never killed (and so does the learner)."""
    args = ["--config", "config.yaml", "--set", "env.id=CartPole-v1",
            "--set", "checkpoint.every_steps=500", "--set", "log.status_every_seconds=0.1",
            "--set", "log.tensorboard=true"]
    run = tmp_path / "run"
    proc = start_daemon(*args, "--run-dir", str(run))
    killed_at = wait_for_status(run, 1200, timeout=120)["step"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    newest = read_checkpoint(CheckpointStore(run / "checkpoints", 3).paths()[0])
    resumed_at = newest["counters"]["steps"]
    later = [r for r in read_jsonl(run / "metrics.jsonl") if r["step"] > resumed_at]
    assert resumed_at < killed_at and later, "the kill should land between two checkpoints"
    steps = 3000
    again = cli("runtime.daemon", *args, "--run-dir", str(run), "--max-steps", str(steps))
    assert again.returncode == 0, again.stderr
    assert f"step {resumed_at}: the episode in progress goes on exactly" in again.stderr
    (aside,) = run.glob("metrics.jsonl.orphaned-*")
    assert read_jsonl(aside)[:len(later)] == later  # moved, not deleted
    reference = cli("runtime.daemon", *args, "--run-dir", str(tmp_path / "reference"),
                    "--max-steps", str(steps))
    assert reference.returncode == 0, reference.stderr
    ours, theirs = records(run), records(tmp_path / "reference")
    assert ours == theirs and len(ours) > 20
    assert [r["game"] for r in ours] == list(range(1, len(ours) + 1))
    status = json.loads((run / "status.json").read_text())
    assert status["games"] == len(ours) == \
        json.loads((tmp_path / "reference" / "status.json").read_text())["games"]
    wall = ("run_dir", "wall_s", "steps_per_s")
    summary = {k: v for k, v in summarize(run).items() if k not in wall}
    assert summary == {k: v for k, v in summarize(tmp_path / "reference").items()
                       if k not in wall}
    assert summary["games"] == len(ours) and summary["steps"] == steps
    assert _tensorboard_returns(run) == _tensorboard_returns(tmp_path / "reference")
    assert_same_run_state(checkpoint_at(run, steps), checkpoint_at(tmp_path / "reference",
                                                                   steps))


def test_videos_of_games_begun_after_the_checkpoint_are_moved_aside(tmp_path: Path) -> None:
    sets = ["log.video_every_games=1", "checkpoint.every_steps=300"]
    run_in_process(tmp_path / "reference", "config.yaml", sets, 1000)
    run_in_process(tmp_path / "run", "config.yaml", sets, 800)
    (tmp_path / "run" / "checkpoints" / "ckpt-000000000800.pt").unlink()  # killed after 600
    run_in_process(tmp_path / "run", "config.yaml", sets, 1000)

    def names(directory: Path) -> list[str]:
        return sorted(p.name for p in directory.glob("*.mp4"))

    assert names(tmp_path / "run" / "videos") == names(tmp_path / "reference" / "videos")
    (aside,) = (tmp_path / "run" / "videos").glob("orphaned-*")
    assert names(aside) and all(int(n.split("-")[3][:9]) > 600 for n in names(aside))


def test_network_auto_goes_on_with_the_network_a_run_began_with(tmp_path: Path) -> None:
    """A run begun on the image network `auto` does not pick (as every run begun before
    auto picked shared-stream did) resumes and exports on its own network."""
    run = tmp_path / "run"
    other = "shared-conv" if resolve_network("auto", (4, 84, 84)) != "shared-conv" \
        else "shared-stream"
    args = ["--config", "config.yaml", "--run-dir", str(run)]
    began = cli("runtime.daemon", *args, "--set", f"agent.network={other}", "--max-steps", "30")
    assert began.returncode == 0, began.stderr
    path = run / "checkpoints" / f"ckpt-{30:012d}.pt"
    payload = read_checkpoint(path)
    payload["config"]["agent"]["network"] = "auto"  # as a run begun with `auto` stored it
    path.write_bytes(encode(payload))
    exported = cli("tools.export_onnx", "--run-dir", str(run), "--out", str(tmp_path / "a.onnx"))
    assert exported.returncode == 0, exported.stderr
    resumed = cli("runtime.daemon", *args, "--max-steps", "60")
    assert resumed.returncode == 0, resumed.stderr
    assert f"agent.network: auto goes on with {other}, the network this run began" \
        in resumed.stderr
    assert "goes on exactly where it stopped" in resumed.stderr
    assert checkpoint_at(run, 60)["spec"]["network"] == other


def test_a_config_written_before_the_floor_schedule_goes_on_with_its_floor(
        tmp_path: Path) -> None:
    """The default config.yaml decays the floor, but an older resolved config (every run
    archived before the schedule existed) has no entropy_floor_final key: resumed with it,
    the floor stays where the run had it instead of dropping to 0 by 1.67M."""
    lines = (ROOT / "config.yaml").read_text().splitlines()
    old = "\n".join(line for line in lines if "entropy_floor_final:" not in line)
    assert "entropy_floor_final" not in old
    (tmp_path / "config.yaml").write_text(old)
    assert load_config(tmp_path / "config.yaml").agent.floor_at(2_000_000) == 0.2
    assert load_config(ROOT / "config.yaml").agent.floor_at(2_000_000) == 0.0
