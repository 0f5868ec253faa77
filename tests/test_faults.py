"""Faults injected through the stream interface, the disk and the checkpoint files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.daemon.checkpoints import (
    CHECKPOINT_FORMAT_VERSION,
    MAGIC,
    CheckpointError,
    CheckpointStore,
    decode,
    encode,
    read_checkpoint,
)
from runtime.daemon.config import load_config
from runtime.daemon.lifecycle import Daemon
from tests.conftest import NO_FINAL_POLICY, ROOT, cli, start_daemon, wait_for_status

FAULTY = "env.id=tests.faulty_env:FaultyCartPole-v0"


def _run(run_dir: Path, *sets: str, steps: int = 400) -> subprocess.CompletedProcess[str]:
    args = ["--config", "config.yaml", "--run-dir", str(run_dir), "--max-steps", str(steps),
            "--set", FAULTY, "--set", "checkpoint.every_steps=50",
            "--set", "faults.stream_backoff_seconds=0.01"]
    for assignment in sets:
        args += ["--set", assignment]
    return cli("runtime.daemon", *args)


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.mark.parametrize(("kwargs", "counter"), [
    ("{nan_obs_at: [30, 31, 200]}", "nonfinite_inputs"),
    ("{inf_reward_at: [45]}", "nonfinite_inputs"),
    ("{huge_reward_at: [120]}", "nonfinite_updates"),
    ("{huge_reward_at: [120]}\n  --set agent.reward_transform=none", "nonfinite_updates"),
])
def test_nonfinite_inputs_and_updates_are_skipped(run_dir: Path, kwargs: str,
                                                  counter: str) -> None:
    kwargs, _, extra = kwargs.partition("\n  --set ")
    done = _run(run_dir, f"env.kwargs={kwargs}", *([extra] if extra else []))
    assert done.returncode == 0, done.stderr
    status = _status(run_dir)
    assert status["step"] == 400 and status["faults"][counter] >= 1
    newest = read_checkpoint(CheckpointStore(run_dir / "checkpoints", 3).paths()[0])
    assert all(torch.isfinite(t).all() for t in newest["learner"]["network"].values()
               if t.is_floating_point())


def test_nonfinite_update_can_roll_back(run_dir: Path) -> None:
    done = _run(run_dir, "env.kwargs={huge_reward_at: [120]}", "faults.on_nonfinite=rollback")
    assert done.returncode == 0, done.stderr
    assert _status(run_dir)["faults"]["rollbacks"] == 1
    assert "rolled back the learner to ckpt-000000000100.pt" in done.stderr


def test_nonfinite_parameters_are_rolled_back_not_saved(run_dir: Path) -> None:
    config = load_config(ROOT / "config.yaml", ["env.id=CartPole-v1", f"run.dir={run_dir}"])
    daemon = Daemon(config, fresh=False)
    daemon.prepare()
    assert daemon.checkpoint()
    good = daemon.learner.state.params
    broken = good.clone()
    broken[5] = float("nan")
    daemon.learner.state = daemon.learner.state._replace(params=broken)
    assert not daemon.checkpoint()
    assert torch.equal(daemon.learner.state.params, good)
    assert daemon.counters.faults.rollbacks == 1
    assert len(daemon.store.paths()) == 1


def test_stream_that_raises_is_recreated(run_dir: Path) -> None:
    done = _run(run_dir, "env.kwargs={raise_step_at: [100, 250]}")
    assert done.returncode == 0, done.stderr
    assert _status(run_dir)["faults"]["stream_failures"] == 2
    assert "recreating it in" in done.stderr


def test_stream_that_keeps_failing_ends_the_daemon_after_a_checkpoint(run_dir: Path) -> None:
    done = _run(run_dir, "env.kwargs={raise_step_from: 130, raise_reset_from: 130}",
                "faults.stream_max_failures=4", steps=1000)
    assert done.returncode == 3, done.stderr
    status = _status(run_dir)
    assert status["state"] == "failed" and status["faults"]["stream_failures"] == 4
    assert status["last_checkpoint_step"] == status["step"] >= 129
    assert "giving up" in done.stderr


def test_checkpoint_write_failure_keeps_learning_and_the_old_checkpoint(run_dir: Path) -> None:
    assert _run(run_dir, steps=100).returncode == 0
    before = (run_dir / "checkpoints" / "ckpt-000000000100.pt").read_bytes()

    def small_files_only() -> None:  # a disk that refuses big writes (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run(
        [sys.executable, "-m", "runtime.daemon", "--config", "config.yaml", "--run-dir",
         str(run_dir), "--max-steps", "300", "--set", "env.id=CartPole-v1",
         "--set", "checkpoint.every_steps=50"], cwd=ROOT, text=True, capture_output=True,
        preexec_fn=small_files_only, timeout=120)
    assert proc.returncode == 1  # the final checkpoint could not be written either
    status = _status(run_dir)
    # resumed at 100: the writes at 150, 200, 250, 300 and the final one all failed
    assert status["step"] == 300 and status["faults"]["checkpoint_failures"] == 5
    assert "retrying at the next interval" in proc.stderr
    assert (run_dir / "checkpoints" / "ckpt-000000000100.pt").read_bytes() == before
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))


def test_failed_publish_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save({"x": torch.ones(3)}, 10)

    def no_space(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        store.save({"x": torch.zeros(3)}, 20)
    assert [p.name for p in store.paths()] == ["ckpt-000000000010.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000000010.pt"]


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _corruptions(good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    newer = _torch_bytes({"format_version": CHECKPOINT_FORMAT_VERSION + 1})
    return {
        "truncated": good[: len(good) // 3],
        "bit-flipped": bytes(flipped),
        "zero-length": b"",
        "foreign format": good.replace(MAGIC, b"OTHERFORMAT-CKPT-1 "),
        "plain torch file": _torch_bytes({"format_version": CHECKPOINT_FORMAT_VERSION}),
        "random bytes": os.urandom(4096),
        "wrong version": MAGIC + hashlib.sha256(newer).hexdigest().encode() + b"\n" + newer,
    }


def test_every_kind_of_corruption_is_detected_and_skipped(tmp_path: Path, caplog) -> None:
    good = encode({"step": torch.tensor(1)})
    for kind, data in _corruptions(good).items():
        with pytest.raises(CheckpointError) as error:
            decode(data, f"ckpt-{kind}")
        assert f"ckpt-{kind}" in str(error.value), kind
        store = CheckpointStore(tmp_path / kind.replace(" ", "-"), keep=3)
        store.save({"step": torch.tensor(1)}, 1)
        (store.directory / "ckpt-000000000002.pt").write_bytes(data)
        payload, path = store.load_latest()
        assert path.name == "ckpt-000000000001.pt", kind
        assert "ckpt-000000000002.pt" in caplog.text


def test_no_good_checkpoint_is_a_clear_error(run_dir: Path) -> None:
    store = CheckpointStore(run_dir / "checkpoints", keep=3)
    store.directory.mkdir(parents=True)
    (store.directory / "ckpt-000000000050.pt").write_bytes(b"garbage")
    done = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
               "--set", "env.id=CartPole-v1", "--max-steps", "10")
    assert done.returncode == 2
    assert "no usable checkpoint" in done.stderr and "--fresh" in done.stderr
    fresh = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
                "--set", "env.id=CartPole-v1", "--max-steps", "10", "--fresh")
    assert fresh.returncode == 0, fresh.stderr


def test_one_daemon_per_run_dir(run_dir: Path) -> None:
    first = start_daemon("--config", "config.yaml", "--run-dir", str(run_dir),
                         "--set", "env.id=CartPole-v1")
    try:
        wait_for_status(run_dir, 10)
        second = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
                     "--set", "env.id=CartPole-v1", "--max-steps", "10")
        assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)


def test_sd_notify_ready_status_watchdog_stopping(run_dir: Path, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="2000000",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.daemon", "--config", "config.yaml", "--run-dir",
         str(run_dir), "--set", "env.id=CartPole-v1", *NO_FINAL_POLICY], cwd=ROOT, env=env,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    messages: list[str] = []
    try:
        while sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
    finally:
        proc.communicate(timeout=60)
        sock.close()
    assert proc.returncode == 0
    assert messages[0].startswith("READY=1")
    assert any("STATUS=step" in m and "steps/s" in m for m in messages)
