"""The daemon as users run it: subprocesses, real signals, real files."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from runtime.daemon.checkpoints import CheckpointStore, read_checkpoint
from runtime.daemon.config import load_config
from runtime.daemon.lifecycle import Daemon, StopFlag
from tests.conftest import CARTPOLE, ROOT, cli, start_daemon, wait_for_status


def _daemon(run_dir: Path, *args: str) -> list[str]:
    return ["--config", "config.yaml", "--run-dir", str(run_dir), "--set",
            "log.status_every_seconds=0.1", *args]


def test_cartpole_run_writes_metrics_status_and_checkpoints(run_dir: Path) -> None:
    done = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "600", *CARTPOLE,
                                          "--set", "checkpoint.every_steps=200"))
    assert done.returncode == 0, done.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["step"] == 600 and status["state"] == "stopped"
    assert status["last_checkpoint_step"] == 600
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and {"step", "game", "return", "length", "time", "steps_per_s",
                        "entropy", "critic_loss"} <= records[0].keys()
    assert [p.name for p in CheckpointStore(run_dir / "checkpoints", 3).paths()] == [
        "ckpt-000000000600.pt", "ckpt-000000000400.pt", "ckpt-000000000200.pt"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["env"]["id"] == "CartPole-v1" and saved["run"]["max_steps"] == 600


def test_breakout_run_learns_from_frames(run_dir: Path) -> None:
    done = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "300"))
    assert done.returncode == 0, done.stderr
    payload = read_checkpoint(CheckpointStore(run_dir / "checkpoints", 3).paths()[0])
    assert payload["spec"]["observation_shape"] == [4, 84, 84]
    assert payload["spec"]["network"] == "shared-stream" and payload["counters"]["steps"] == 300


def test_a_checkpoint_with_former_names_resumes_and_exports(run_dir: Path) -> None:
    """Checkpoints written before the renames (network 'seed', log.video_every_episodes)
    keep loading: the daemon resumes from one (with `network: auto`, which picked that
    network then) and the exporter reads its config."""
    assert cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "40", "--set",
                                          "agent.network=shared-conv")).returncode == 0
    store = CheckpointStore(run_dir / "checkpoints", 3)
    payload = read_checkpoint(store.paths()[0])
    payload["spec"]["network"] = payload["config"]["agent"]["network"] = "seed"
    payload["config"]["log"]["video_every_episodes"] = payload["config"]["log"].pop(
        "video_every_games")
    for path in store.paths():
        path.unlink()
    store.save(payload, 40)
    exported = cli("tools.export_onnx", "--run-dir", str(run_dir),
                   "--out", str(run_dir / "policy.onnx"))
    assert exported.returncode == 0, exported.stderr
    resumed = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "60"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and json.loads(
        (run_dir / "status.json").read_text())["step"] == 60


def test_every_nth_game_is_filmed(run_dir: Path) -> None:
    done = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "700",
                                          "--set", "log.video_every_games=2"))
    assert done.returncode == 0, done.stderr
    videos = sorted((run_dir / "videos").glob("game-*.mp4"))
    assert videos and all(v.stat().st_size > 1000 for v in videos)
    assert all(int(v.name.split("-")[1]) % 2 == 1 for v in videos)  # games 3, 5, ...


def test_tensorboard_scalars_are_written_when_asked(run_dir: Path) -> None:
    done = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "300", *CARTPOLE,
                                          "--set", "log.tensorboard=true"))
    assert done.returncode == 0, done.stderr
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_keep_is_honoured(run_dir: Path) -> None:
    done = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "500", *CARTPOLE,
                                          "--set", "checkpoint.every_steps=50",
                                          "--set", "checkpoint.keep=2"))
    assert done.returncode == 0, done.stderr
    names = [p.name for p in CheckpointStore(run_dir / "checkpoints", 2).paths()]
    assert names == ["ckpt-000000000500.pt", "ckpt-000000000450.pt"]


def test_sigterm_checkpoints_and_restart_resumes_identically(run_dir: Path) -> None:
    proc = start_daemon(*_daemon(run_dir, *CARTPOLE, "--set", "checkpoint.every_steps=100000"))
    wait_for_status(run_dir, 300)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    status = json.loads((run_dir / "status.json").read_text())
    newest = CheckpointStore(run_dir / "checkpoints", 3).paths()[0]
    payload = read_checkpoint(newest)
    assert payload["counters"]["steps"] == status["step"] >= 300

    config = load_config(ROOT / "config.yaml", ["env.id=CartPole-v1", f"run.dir={run_dir}"])
    daemon = Daemon(config, fresh=False)
    daemon.prepare()
    assert daemon.counters.steps == status["step"]
    restored = daemon.learner.state_dict()
    for key, tensor in payload["learner"]["network"].items():
        assert torch.equal(restored["network"][key], tensor), key
    assert torch.equal(restored["rng"], payload["learner"]["rng"])
    assert "resumed from" in (run_dir / "daemon.log").read_text()


def test_first_signal_only_sets_the_flag_second_sigint_exits_at_once(monkeypatch) -> None:
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    flag = StopFlag()
    flag._handle(signal.SIGINT, None)
    assert flag.reason == "SIGINT" and exits == []
    flag._handle(signal.SIGINT, None)
    assert exits == [130]


def test_a_real_second_sigint_exits_130_without_a_checkpoint(run_dir: Path) -> None:
    """A sensor that takes 5 s per reading: the first Ctrl-C waits for the step to end, the
    second one does not."""
    proc = start_daemon(*_daemon(run_dir, "--set", "env.id=tests.faulty_env:FaultyCartPole-v0",
                                 "--set", "env.kwargs={step_seconds: 5.0}"))
    wait_for_status(run_dir, 1, timeout=120)
    # status.json is written between steps: a signal sent at once can land before the next
    # step begins (seen on a loaded machine), and then the first Ctrl-C alone stops the run
    time.sleep(1.0)  # inside the next slow step now
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "second interrupt: exiting without a final checkpoint" in stderr
    assert "stopping (SIGINT)" not in stderr
    assert CheckpointStore(run_dir / "checkpoints", 3).paths() == []
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"


def test_sigint_stops_cleanly_with_a_final_checkpoint(run_dir: Path) -> None:
    proc = start_daemon(*_daemon(run_dir, *CARTPOLE, "--set", "checkpoint.every_steps=100000"))
    wait_for_status(run_dir, 50)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopping (SIGINT)" in stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"


def test_truncated_newest_checkpoint_is_skipped(run_dir: Path) -> None:
    first = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "400", *CARTPOLE,
                                           "--set", "checkpoint.every_steps=200"))
    assert first.returncode == 0, first.stderr
    newest = run_dir / "checkpoints" / "ckpt-000000000400.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    again = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "450", *CARTPOLE))
    assert again.returncode == 0, again.stderr
    assert "ckpt-000000000400.pt: checksum mismatch" in again.stderr
    assert "resumed from" in again.stderr and "at step 200" in again.stderr


def test_fresh_moves_old_checkpoints_aside(run_dir: Path) -> None:
    assert cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "100", *CARTPOLE)).returncode == 0
    again = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "50", "--fresh", *CARTPOLE))
    assert again.returncode == 0, again.stderr
    aside = list(run_dir.glob("checkpoints.old-*"))
    assert len(aside) == 1 and (aside[0] / "ckpt-000000000100.pt").exists()


def test_checkpoint_of_another_network_is_refused(run_dir: Path) -> None:
    assert cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "50", *CARTPOLE)).returncode == 0
    other = cli("runtime.daemon", *_daemon(run_dir, "--max-steps", "60", *CARTPOLE,
                                           "--set", "agent.optimizer=adam",
                                           "--set", "agent.lambda=0"))
    assert other.returncode == 2
    assert "does not match this config: optimizer" in other.stderr


@pytest.mark.parametrize(("override", "named"), [
    ("agent.nonsense=1", "agent.nonsense: unknown key"),
    ("agent.gamma=high", "agent.gamma: must be float"),
    ("checkpoint.every_seconds=-5", "checkpoint.every_seconds: must be >= 1"),
    ("env.id=NoSuchEnv-v0", "env.id: unknown environment id 'NoSuchEnv-v0'"),
])
def test_bad_config_exits_2_naming_the_key(run_dir: Path, override: str, named: str) -> None:
    done = cli("runtime.daemon", *_daemon(run_dir, "--set", override))
    assert done.returncode == 2
    assert named in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
