"""Policies published while the daemon learns (runtime.daemon.publish)."""

from __future__ import annotations

import json
import os
import pickle
import queue
import re
import secrets
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import runtime.daemon.export as export_module
import runtime.daemon.publish as publish_module
from agent.learner import A2CLearner
from runtime.daemon.checkpoints import CheckpointStore, read_checkpoint
from runtime.daemon.config import load_config
from runtime.daemon.errors import SetupError
from runtime.daemon.export import ActorBuilder, ActorGraph, VerificationError, stream_spec
from runtime.daemon.lifecycle import Daemon
from runtime.daemon.loop import Counters
from runtime.daemon.publish import PolicyWriter, Publisher, export_key
from runtime.daemon.rollback import rollback
from runtime.daemon.triggers import Every
from runtime.device.keys import TrustedKeys
from runtime.device.manifest import ManifestError, new_run, parse_entry, sha256_file
from runtime.device.policy import Policy
from tests.conftest import CARTPOLE, ROOT, KeyPair, cli


def _cartpole(run_dir: Path, *overrides: str) -> tuple:
    config = load_config(ROOT / "config.yaml", ["env.id=CartPole-v1", f"run.dir={run_dir}",
                                                "export.niceness=0", *overrides])
    spec = stream_spec(config)
    learner = A2CLearner(config.agent, spec.observation_shape, spec.num_actions)
    as_dict = {"network": learner.network_name, "num_actions": spec.num_actions,
               "observation_shape": list(spec.observation_shape),
               "observation_dtype": spec.observation_dtype}
    return config, learner, as_dict


def _job(learner: A2CLearner, step: int) -> dict:
    from runtime.daemon.export import policy_weights

    return {"step": step, "weights": policy_weights(learner.net.policy()),
            "recent_returns": [10.0, 20.0], "created_at": time.time()}


def test_every_is_due_at_multiples_or_by_time_and_stays_due() -> None:
    trigger = Every(1000, None, step=2500, now=0.0)
    assert trigger.enabled
    assert not trigger.due(2999, 1e9) and trigger.due(3000, 0.0) and trigger.due(3700, 0.0)
    trigger.reset(3700, 5.0)
    assert not trigger.due(3999, 0.0) and trigger.due(4000, 0.0)
    timed = Every(None, 30.0, step=0, now=100.0)
    assert not timed.due(10**9, 129.9) and timed.due(0, 130.0)
    assert not Every(None, None, 0, 0.0).enabled and not Every(None, None, 0, 0.0).due(10**9, 1e9)


def test_a_clean_stop_publishes_the_final_policy_once(run_dir: Path) -> None:
    """Publishing on (every 50k steps, never due here): the stop publishes step 300."""
    args = ("--config", "config.yaml", "--run-dir", str(run_dir), "--max-steps", "300",
            *CARTPOLE, "--set", "export.on_stop=true", "--set", "export.niceness=0")
    done = cli("runtime.daemon", *args, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "publishing the final policy, step 300" in done.stderr
    latest = json.loads((run_dir / "policies" / "latest.json").read_text())
    assert latest["step"] == 300 and latest["file"] == "policy-000000000300.onnx"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["publishing"]["last_step"] == 300 and status["publishing"]["published"] == 1
    again = cli("runtime.daemon", *args, timeout=180)  # at 300 already: nothing new to publish
    assert again.returncode == 0, again.stderr
    assert "publishing the final policy" not in again.stderr
    assert len(json.loads((run_dir / "policies" / "manifest.json").read_text())["policies"]) == 1


def test_the_daemon_publishes_signed_verified_policies(run_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(secrets.token_hex(32) + "\n")
    key.chmod(0o600)
    done = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
               "--max-steps", "3000", *CARTPOLE, "--set", "export.every_steps=1000",
               "--set", f"export.key_file={key}", "--set", "export.niceness=0", timeout=180)
    assert done.returncode == 0, done.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["faults"]["export_failures"] == 0
    assert status["publishing"]["published"] >= 1 and status["publishing"]["last_error"] is None
    policies = run_dir / "policies"
    manifest = json.loads((policies / "manifest.json").read_text())["policies"]
    latest = json.loads((policies / "latest.json").read_text())
    assert latest == manifest[-1] and latest["step"] == status["publishing"]["last_step"]
    assert sorted(p.name for p in policies.glob("policy-*.onnx")) == [e["file"] for e in manifest]
    secret = key.read_bytes().strip()
    # Due at each multiple of 1000; one due while the last export still runs goes out later.
    intervals = [e["step"] // 1000 for e in manifest]
    assert intervals[0] >= 1 and intervals == sorted(set(intervals))
    for entry in manifest:
        checked = parse_entry(entry, secret, max_size=10**8)
        assert entry["recent_games"] > 0
        assert sha256_file(policies / checked.file) == checked.sha256
        assert (policies / checked.file).stat().st_size == checked.size
        assert entry["parity"]["max_abs_logit_diff"] <= 1e-4
        assert entry["parity"]["action_agreement"] == 1.0
        model = Policy.load(policies / checked.file)
        assert model.metadata["training_step"] == entry["step"]
        assert model.metadata["env_id"] == "CartPole-v1"
        assert model.metadata["producer"] == "runtime.daemon"
    with pytest.raises(ManifestError, match="signature"):
        parse_entry(latest, b"x" * 64, max_size=10**8)

    # the run identity: made at the fresh start, in every entry and checkpoint
    run = read_checkpoint(CheckpointStore(run_dir / "checkpoints", 3).paths()[0])["run"]
    assert re.fullmatch(r"[0-9a-f]{16}", run["id"]) and run["started"] > 0
    assert [(e["run"], e["run_started"]) for e in manifest] == [(run["id"], run["started"])] \
        * len(manifest)
    assert [e["sequence"] for e in manifest] == list(range(1, len(manifest) + 1))

    # the publishing counters are part of the run: a resumed daemon goes on from them
    again = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
                "--max-steps", "3200", *CARTPOLE, "--set", "export.every_steps=1000",
                "--set", f"export.key_file={key}", "--set", "export.niceness=0", timeout=180)
    assert again.returncode == 0, again.stderr
    resumed = json.loads((run_dir / "status.json").read_text())["publishing"]
    assert (resumed["published"], resumed["last_step"]) == (
        status["publishing"]["published"], status["publishing"]["last_step"])
    assert "published policy-" in (run_dir / "daemon.log").read_text()
    # ... and so does its run identity; --fresh makes a new one
    resumed_run = read_checkpoint(CheckpointStore(run_dir / "checkpoints", 3).paths()[0])["run"]
    assert resumed_run == run and f"run {run['id']} goes on" in again.stderr
    config = load_config(ROOT / "config.yaml", ["env.id=CartPole-v1", f"run.dir={run_dir}",
                                                f"export.key_file={key}"])
    fresh = Daemon(config, fresh=True)
    try:
        fresh.prepare()
    finally:
        fresh.release()
    made = fresh.run_identity
    assert re.fullmatch(r"[0-9a-f]{16}", made["id"]) and made["id"] != run["id"]
    assert made["started"] > run["started"] and fresh.publisher.run == made


def test_a_failed_export_is_counted_and_learning_goes_on(run_dir: Path) -> None:
    run_dir.mkdir()
    (run_dir / "policies").write_text("a file where the policies directory should be")
    done = cli("runtime.daemon", "--config", "config.yaml", "--run-dir", str(run_dir),
               "--max-steps", "2500", *CARTPOLE, "--set", "export.every_steps=500",
               "--set", "export.niceness=0", timeout=180)
    assert done.returncode == 0, done.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["step"] == 2500 and status["state"] == "stopped"
    assert status["faults"]["export_failures"] >= 1
    assert status["publishing"]["published"] == 0
    assert "FileExistsError" in status["publishing"]["last_error"]
    # Each failure names its cause; one collected while learning says it will be retried.
    # On a loaded machine the first export may still be in flight at the stop, and its
    # failure is then collected while stopping, where nothing is retried.
    failures = [line for line in done.stderr.splitlines() if "not published" in line]
    assert failures and all("FileExistsError" in line for line in failures)
    assert all(line.endswith("; retrying at the next interval") for line in failures[:-1])


def test_the_writer_keeps_the_newest_and_never_publishes_a_failed_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, learner, spec = _cartpole(tmp_path / "run")
    policies = tmp_path / "policies"
    writer = PolicyWriter(config, spec, policies, key=None, keep=2)
    for step in (100, 200, 300):
        entry = writer.publish(_job(learner, step))
        assert "signature" not in entry and entry["mean_return"] == 15.0
    files = sorted(p.name for p in policies.glob("policy-*.onnx"))
    assert files == ["policy-000000000200.onnx", "policy-000000000300.onnx"]
    assert json.loads((policies / "latest.json").read_text())["step"] == 300
    monkeypatch.setattr(export_module, "LOGIT_TOLERANCE", -1.0)  # no model can pass
    with pytest.raises(VerificationError, match="parity"):
        writer.publish(_job(learner, 400))
    assert sorted(p.name for p in policies.iterdir()) == ["latest.json", "manifest.json", *files]
    assert json.loads((policies / "latest.json").read_text())["step"] == 300
    monkeypatch.undo()
    # A restarted daemon, now with a run identity and a key: its entries name their run.
    run, key = new_run(), secrets.token_hex(32).encode()
    again = PolicyWriter(config, spec, policies, key=key, keep=2, run=run)
    assert [e["step"] for e in again.entries] == [200, 300]
    entry = again.publish(_job(learner, 500))
    assert (entry["run"], entry["run_started"], entry["sequence"]) == (run["id"],
                                                                       run["started"], 1)
    assert parse_entry(entry, key, max_size=10**8).run == run["id"]
    assert [e["step"] for e in _kept(policies)] == [300, 500]
    # A rollback (the daemon stopped) is the newest entry; the daemon goes on after it.
    assert rollback(tmp_path, 300, key)["sequence"] == 2
    assert [(e["step"], e.get("sequence")) for e in _kept(policies)] == [(300, None), (500, 1),
                                                                     (300, 2)]
    third = PolicyWriter(config, spec, policies, key=key, keep=2, run=run)
    assert third.publish(_job(learner, 600))["sequence"] == 3
    assert [(e["step"], e.get("sequence")) for e in _kept(policies)] == [(300, 2), (600, 3)]
    assert json.loads((policies / "latest.json").read_text())["step"] == 600
    assert sorted(p.name for p in policies.glob("policy-*.onnx")) == [
        "policy-000000000300.onnx", "policy-000000000600.onnx"]


def _full_exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts the exporter's runs (write_onnx) from here on."""
    calls: list[Path] = []
    real = export_module.write_onnx

    def counted(actor, example, out, opset, metadata):  # noqa: ANN001, ANN202
        calls.append(out)
        return real(actor, example, out, opset, metadata)

    monkeypatch.setattr(export_module, "write_onnx", counted)
    return calls


def _perturbed_job(learner: A2CLearner, step: int, seed: int) -> dict:
    """A snapshot with new weights and new normaliser statistics, as learning gives."""
    job = _job(learner, step)
    rng = np.random.default_rng(seed)
    weights = job["weights"]
    for name, value in weights.items():
        if value.dtype == np.float32:
            weights[name] = value + rng.normal(0.0, 0.1, value.shape).astype(np.float32)
    weights["0.norm.count"] = np.array(10 * (seed + 1))
    weights["0.norm.mean"] = rng.normal(size=weights["0.norm.mean"].shape)
    weights["0.norm.m2"] = 9.0 + rng.random(weights["0.norm.m2"].shape)
    return job


def test_after_the_first_export_weights_are_written_into_its_verified_graph(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, learner, spec = _cartpole(tmp_path / "run")
    policies = tmp_path / "policies"
    exports = _full_exports(monkeypatch)
    writer = PolicyWriter(config, spec, policies, key=None, keep=5)
    writer.publish(_job(learner, 100))
    assert len(exports) == 1 and writer.graph is not None
    frames, torch_actor = writer.frames, ActorBuilder(config, (4,), 2)
    before = Policy.load(policies / "policy-000000000100.onnx").logits(frames)
    for step, seed in ((200, 1), (300, 2)):
        job = _perturbed_job(learner, step, seed)
        entry = writer.publish(job)
        policy = Policy.load(policies / entry["file"])
        assert policy.metadata["training_step"] == step
        expected = export_module.torch_logits(torch_actor.load(job["weights"]), frames)
        logits = policy.logits(frames)
        assert np.abs(logits - expected).max() <= export_module.LOGIT_TOLERANCE
        assert np.abs(logits - before).max() > 0.01  # new weights, not the graph's old ones
        before = logits
    assert len(exports) == 1  # no export after the first
    # A written model that fails its checks is never published: a full export replaces it.
    def stale(self: ActorGraph, actor: object, metadata: object, out: Path) -> None:
        out.write_bytes((policies / entry["file"]).read_bytes())  # the weights before

    monkeypatch.setattr(ActorGraph, "write", stale)
    fourth = writer.publish(_perturbed_job(learner, 400, 3))
    assert len(exports) == 2 and fourth["parity"]["max_abs_logit_diff"] <= 1e-4
    assert writer.graph is None  # full exports from here on


def test_a_graph_that_does_not_take_every_weight_by_name_is_not_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, learner, spec = _cartpole(tmp_path / "run")
    actor = learner.net.policy().eval()
    example = np.zeros((2, 4), np.float32)
    real = export_module.write_onnx

    def folding(actor, example, out, opset, metadata):  # noqa: ANN001, ANN202
        real(actor, example, out, opset, metadata)
        model = onnx.load(str(out))
        model.graph.initializer[0].name = "folded_constant"  # as if a weight were folded
        onnx.save(model, str(out))

    monkeypatch.setattr(export_module, "write_onnx", folding)
    assert ActorGraph.export(actor, example, tmp_path / "scratch.onnx") is None
    assert not (tmp_path / "scratch.onnx").exists()
    monkeypatch.undo()
    exports = _full_exports(monkeypatch)
    baseline = PolicyWriter(config, spec, tmp_path / "other", key=None, keep=5,
                            reuse_graph=False)
    baseline.publish(_job(learner, 100))
    assert baseline.graph is None and len(exports) == 1


def test_the_publisher_process_signs_with_the_learners_ed25519_key(
        tmp_path: Path, fleet: KeyPair) -> None:
    """The setup handed to the publisher process (spawn: it must pickle) carries the key
    file's bytes; the process rebuilds the signer from them. Its entries verify with the
    public key alone."""
    config, learner, spec = _cartpole(tmp_path / "run", f"export.key_file={fleet.private}")
    signer = export_key(config)
    assert signer.key_id == fleet.key_id
    publisher = Publisher(config, tmp_path / "run", learner, spec, Counters(), key=signer)
    setup = pickle.loads(pickle.dumps(publisher.setup()))
    entry = PolicyWriter.from_setup(setup).publish(_job(learner, 100))
    assert entry["signature"].startswith(f"ed25519:{fleet.key_id}:")
    trusted = TrustedKeys.from_files([fleet.public])
    assert parse_entry(entry, trusted, max_size=10**8).step == 100
    with pytest.raises(ManifestError, match="signature does not match"):
        parse_entry({**entry, "step": 100, "mean_return": 99.0}, trusted, max_size=10**8)
    # A public key cannot sign: the daemon refuses it before it starts.
    public = load_config(ROOT / "config.yaml", [f"export.key_file={fleet.public}"])
    with pytest.raises(SetupError, match=r"export.key_file: key file .*fleet.pub is a public "
                                         r"key: the learner signs with the private key"):
        export_key(public)


def _kept(policies: Path) -> list[dict]:
    return json.loads((policies / "manifest.json").read_text())["policies"]


def _wait(publisher: Publisher, step: int, until, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        publisher.tick(step, time.monotonic(), [1.0])
        time.sleep(0.05)
    assert until(), publisher.status()


def test_a_dead_publisher_process_is_counted_and_replaced(tmp_path: Path) -> None:
    config, learner, spec = _cartpole(tmp_path / "run", "export.every_steps=10")
    counters = Counters()
    publisher = Publisher(config, tmp_path / "run", learner, spec, counters)
    try:
        publisher.tick(9, time.monotonic(), [1.0])
        assert publisher.status()["in_flight_step"] is None  # not due yet
        publisher.tick(10, time.monotonic(), [1.0])
        assert publisher.status()["in_flight_step"] == 10
        os.kill(publisher._worker.pid, signal.SIGKILL)
        _wait(publisher, 10, lambda: publisher.status()["in_flight_step"] is None)
        assert counters.faults.export_failures == 1
        assert "died" in publisher.status()["last_error"]
        _wait(publisher, 20, lambda: publisher.counts.published == 1)  # retried, in a new process
        assert publisher.status()["last_step"] == 20 and publisher.last_error is None
    finally:
        publisher.close()
    assert publisher._worker is None


class _Unanswered:
    """A publisher process and its queues that take jobs and never answer."""

    pid, exitcode = 0, None

    def is_alive(self) -> bool:
        return True

    def put(self, job: object) -> None:
        pass

    def get_nowait(self) -> object:
        raise queue.Empty

    def join(self, timeout: float | None = None) -> None:
        pass

    terminate = cancel_join_thread = close = lambda self: None


def test_a_stop_waits_for_an_export_once_not_twice(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An export still running at the stop: publish_final and close share one deadline."""
    config, learner, spec = _cartpole(tmp_path / "run", "export.every_steps=10")
    counters = Counters()
    publisher = Publisher(config, tmp_path / "run", learner, spec, counters)
    stub = _Unanswered()

    def start() -> None:
        publisher._worker = publisher._jobs = publisher._results = stub

    monkeypatch.setattr(publisher, "_start_worker", start)
    monkeypatch.setattr(publish_module, "CLOSE_GRACE_SECONDS", 0.2)
    deadlines: list[float] = []
    wait = publisher._wait
    monkeypatch.setattr(publisher, "_wait", lambda d: deadlines.append(d) or wait(d))
    publisher.tick(10, time.monotonic(), [1.0])
    assert publisher.status()["in_flight_step"] == 10
    publisher.publish_final(15, [1.0])
    publisher.close()
    assert len(set(deadlines)) == 1 and len(deadlines) >= 2
    assert counters.faults.export_failures == 1
    assert "the daemon stopped first" in publisher.status()["last_error"]
