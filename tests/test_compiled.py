"""The compiled update: the same numbers as the eager one on every network, the same
refusals, an exact resume, old checkpoints going on, and a clear word where it cannot
compile. These are the only tests that compile (tests/conftest.py turns compiling off
for the rest); they share inductor's on-disk cache."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from agent import compiled
from agent.config import AgentConfig
from agent.errors import NonFiniteError
from agent.learner import A2CLearner, Transition
from runtime.daemon.checkpoints import read_checkpoint
from runtime.daemon.config import ConfigError, from_dict, load_config
from tests.conftest import ROOT
from tests.test_resume import assert_same_run_state, checkpoint_at, run_in_process


@pytest.fixture
def compiling(one_torch_thread: object) -> Iterator[None]:
    import torch._dynamo

    with torch._dynamo.config.patch(disable=False):
        yield


# network -> (observation shape, actions): the smallest frames each network's
# convolutions take, and a narrow width, so that compiling and running stay quick.
NETWORKS = {"mlp": ((4,), 2), "shared-conv": ((2, 29, 29), 3),
            "shared-stream": ((2, 53, 53), 4), "stream": ((2, 53, 53), 4)}


def _observations(shape: tuple[int, ...], count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if len(shape) == 3:
        return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
    return [rng.normal(size=shape).astype(np.float32) for _ in range(count)]


def _drive(learner: A2CLearner, observations: list[np.ndarray], steps: int
           ) -> list[dict[str, float]]:
    """Act and update along a fixed sequence, an episode end every 7 steps."""
    metrics, obs = [], observations[0]
    for i in range(steps):
        action = learner.act(obs)
        nxt = observations[(i + 1) % len(observations)]
        end = i % 7 == 6
        metrics.append(learner.update(Transition(obs, action, float(i % 3 - 1), nxt, end,
                                                 False)))
        obs = observations[(i + 2) % len(observations)] if end else nxt
    return metrics


@pytest.mark.usefixtures("compiling")
@pytest.mark.parametrize(("network", "optimizer"), [
    *[(network, "obgd") for network in NETWORKS], ("mlp", "adam")])
def test_compiled_and_eager_updates_agree(network: str, optimizer: str) -> None:
    shape, actions = NETWORKS[network]
    config = AgentConfig(network=network, hidden_size=32, optimizer=optimizer,
                         lr=1.0 if optimizer == "obgd" else 1e-3)
    learners = [A2CLearner(dataclasses.replace(config, compile=mode), shape, actions, seed=1)
                for mode in (True, False)]
    assert [learner.compiled for learner in learners] == [True, False]
    observations = _observations(shape, 5)
    runs = [_drive(learner, observations, 20) for learner in learners]
    for compiled_metrics, eager_metrics in zip(*runs, strict=True):
        assert compiled_metrics.keys() == eager_metrics.keys()
        for key, value in compiled_metrics.items():
            assert value == pytest.approx(eager_metrics[key], rel=1e-3, abs=1e-5), key
    torch.testing.assert_close(learners[0].state.params, learners[1].state.params,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("compiling")
def test_a_refused_compiled_update_leaves_the_state_as_it_was() -> None:
    config = AgentConfig(network="mlp", hidden_size=32, reward_transform="none", compile=True)
    learner = A2CLearner(config, (4,), 2, seed=0)
    observations = _observations((4,), 5)
    _drive(learner, observations, 10)
    obs = observations[0]
    learner.act(obs)
    before = learner.state_dict(), learner.state
    with pytest.raises(NonFiniteError, match="TD error is not finite"):
        learner.update(Transition(obs, 0, 1e300, observations[1], False, False))
    huge = learner.state.optimizer._replace(
        policy_trace=torch.full_like(learner.state.optimizer.policy_trace, 1e37))
    learner.state = learner.state._replace(optimizer=huge)
    with pytest.raises(NonFiniteError, match="eligibility trace is not finite"):
        learner.update(Transition(obs, 0, 1.0, observations[1], False, False))
    assert learner.state.optimizer is huge  # not a tensor replaced
    learner.state = learner.state._replace(optimizer=before[1].optimizer)
    for a, b in zip(learner.state, before[1], strict=True):
        assert a is b
    after = learner.state_dict()
    for key in ("optimizer", "reward_scaler", "updates"):
        assert str(after[key]) == str(before[0][key])


@pytest.mark.usefixtures("compiling")
def test_resume_on_the_compiled_path_is_exact(tmp_path: Path) -> None:
    sets = ["env.id=CartPole-v1", "agent.compile=true"]
    reference = run_in_process(tmp_path / "reference", "config.yaml", sets, 600)
    first = run_in_process(tmp_path / "run", "config.yaml", sets, 600, sigterm_at=311)
    second = run_in_process(tmp_path / "run", "config.yaml", sets, 600)
    assert first + second == reference
    assert_same_run_state(checkpoint_at(tmp_path / "run", 600),
                          checkpoint_at(tmp_path / "reference", 600))


@pytest.mark.usefixtures("compiling")
def test_a_two_million_step_checkpoint_of_the_former_learner_goes_on() -> None:
    """The default's archived 2M-step checkpoint (written by the learner before its
    update was one function) loads, acts and learns."""
    payload = read_checkpoint(ROOT / "docs/runs/entropy-floor-to-zero/seed-0/checkpoints"
                              / "ckpt-000002000000.pt")
    spec = payload["spec"]
    config = from_dict(payload["config"]).on_network(spec["network"])
    learner = A2CLearner(dataclasses.replace(config.agent, compile=True),
                         tuple(spec["observation_shape"]), int(spec["num_actions"]))
    learner.load_state_dict(payload["learner"])
    assert learner.updates >= 2_000_000
    weights = payload["learner"]["network"]
    for name, tensor in learner.net.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
    metrics = _drive(learner, _observations(tuple(spec["observation_shape"]), 4), 5)
    assert all(np.isfinite(list(m.values())).all() for m in metrics)
    assert learner.compiled


@pytest.mark.usefixtures("compiling")
def test_without_a_compiler_the_learner_runs_eagerly_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(compiled, "c_compiler", lambda: None)
    with caplog.at_level(logging.INFO, logger="agent.compiled"):
        learner = A2CLearner(AgentConfig(network="mlp", hidden_size=8, compile=True), (4,), 2)
    assert not learner.compiled
    assert "no C++ compiler" in caplog.text
    _drive(learner, _observations((4,), 3), 3)


def test_the_removed_reuse_next_pass_is_refused_and_dropped_from_old_checkpoints() -> None:
    with pytest.raises(ConfigError, match="agent.reuse_next_pass: removed"):
        load_config(ROOT / "config.yaml", ["agent.reuse_next_pass=true"])
    stored = {"agent": {"reuse_next_pass": "auto"}}
    assert from_dict(stored).agent.compile == "auto"


def test_inductor_caches_under_the_users_cache_directory(tmp_path: Path) -> None:
    """Not /tmp, which a reboot may clear: a restarted daemon loads its compiled graphs."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    script = ("import os, agent.learner, runtime.daemon.command, torch._inductor.config\n"
              "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
              "print(cache_dir())")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert Path(out) == tmp_path / "stream-agent-runtime" / "torchinductor"


@pytest.mark.usefixtures("compiling")
def test_a_failed_compile_names_its_root_cause_and_runs_eagerly(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Dynamo wraps a compile worker's death in an error whose first line says nothing."""
    def add_one(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    monkeypatch.setattr(compiled, "c_compiler", lambda: "c++")  # nothing is compiled here
    wrapped = compiled.Compiled(add_one, "test fn", enabled=True)

    def broken(*args: object) -> None:
        try:
            raise RuntimeError("A process in the process pool was terminated abruptly")
        except RuntimeError as cause:
            raise RuntimeError("backend='inductor' raised:\n") from cause

    monkeypatch.setattr(wrapped, "_compiled", broken)
    with caplog.at_level(logging.WARNING, logger="agent.compiled"):
        assert float(wrapped(torch.tensor(1.0))) == 2.0
        assert float(wrapped(torch.tensor(2.0))) == 3.0
    assert not wrapped.enabled
    assert "test fn: compiling failed (RuntimeError: A process in the process pool was " \
           "terminated abruptly): running eagerly" in caplog.text
