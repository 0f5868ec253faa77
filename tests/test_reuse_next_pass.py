"""agent.reuse_next_pass: the pass on s' made in update t (weights θ_t) keeps its graph and
is update t+1's pass on s. The action on s' is sampled from θ_t's logits, the gradient of
update t+1 is taken at θ_t and its TD error is r + gamma V_θ{t+1}(s'') - V_θt(s'); with
run.overlap_stream the same, the pass on s' made before the update instead of in it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agent.config import AgentConfig
from agent.learner import A2CLearner, Transition
from runtime.daemon.config import load_config
from runtime.daemon.loop import ActingLoop, Counters
from runtime.streams import open_stream
from tests.conftest import ROOT

LAYOUTS = {"shared-conv": ((4, 32, 32), 4), "mlp": ((4,), 2)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _learner(network: str, **settings: object) -> tuple[A2CLearner, np.random.Generator]:
    shape, actions = LAYOUTS[network]
    config = AgentConfig(network=network, hidden_size=16, reuse_next_pass=True,
                         reward_transform="none", **settings)
    return A2CLearner(config, shape, actions, seed=3), np.random.default_rng(5)


def _observation(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 3:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.normal(size=shape).astype(np.float32)


def _step(learner: A2CLearner, rng: np.random.Generator, obs: np.ndarray,
          terminated: bool = False, truncated: bool = False) -> tuple[np.ndarray, dict]:
    nxt = _observation(rng, learner.observation_shape)
    action = learner.act(obs)
    metrics = learner.update(Transition(obs, action, float(rng.normal()), nxt, terminated,
                                        truncated))
    return nxt, metrics


@pytest.mark.parametrize("network", LAYOUTS)
def test_the_next_action_is_sampled_from_the_logits_of_the_weights_before_the_update(
        network: str) -> None:
    learner, rng = _learner(network)
    obs = _observation(rng, learner.observation_shape)
    for _ in range(5):
        obs, _ = _step(learner, rng, obs)
    before = copy.deepcopy(learner.net)  # θ_t
    obs, _ = _step(learner, rng, obs)  # update t makes the pass on s' = obs, then steps
    kept = learner._here
    assert kept.observation is obs and kept.kept
    stale = before.heads(kept.inputs)[0]
    assert torch.equal(kept.logits, stale)
    assert not torch.equal(learner.net.heads(kept.inputs)[0], stale)  # the weights moved
    rng_state = learner.rng.get_state()
    expected = learner._sample(stale)
    learner.rng.set_state(rng_state)
    assert learner.stand_on(obs) is kept.logits  # no forward pass of its own
    learner.rng.set_state(rng_state)
    assert learner.act(obs) == expected


@pytest.mark.parametrize("network", LAYOUTS)
def test_the_gradient_is_taken_at_the_stale_weights_and_the_td_error_mixes_both(
        network: str) -> None:
    # lambda = 0: each trace after an update is exactly that update's gradient.
    learner, rng = _learner(network, lambda_=0.0, entropy_coeff=0.0)
    obs = _observation(rng, learner.observation_shape)
    for _ in range(5):
        obs, _ = _step(learner, rng, obs)
    stale_net = copy.deepcopy(learner.net)  # θ_t
    obs, _ = _step(learner, rng, obs)  # update t: the pass on obs is made on θ_t
    stale_value, stale_inputs = learner._here.value, learner._here.inputs
    action = learner.act(obs)
    nxt = _observation(rng, learner.observation_shape)
    metrics = learner.update(Transition(obs, action, 0.5, nxt, False, False))
    logits, value = stale_net.heads(stale_inputs)
    pi_grad = torch.autograd.grad(-F.log_softmax(logits[0], -1)[action],
                                  stale_net.policy_parameters(), retain_graph=True)
    v_grad = torch.autograd.grad(-value[0], stale_net.value_parameters())
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731
    # (equal up to rounding: the copy's views sit in memory unlike a deep copy's tensors)
    assert torch.allclose(learner.rule.policy.trace, flat(pi_grad), rtol=1e-5, atol=1e-8)
    assert torch.allclose(learner.rule.value.trace, flat(v_grad), rtol=1e-5, atol=1e-8)
    # delta = r + gamma V_θ{t+1}(s'') - V_θt(s'), V(s'') from the pass kept for the next act
    next_value = float(learner._here.value[0].detach())
    expected = float(0.5 + learner.config.gamma * next_value - stale_value[0].detach())
    assert metrics["td_error"] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_episode_ends_keep_no_pass_and_the_reset_gets_a_fresh_one() -> None:
    learner, rng = _learner("mlp")
    obs = _observation(rng, learner.observation_shape)
    obs, _ = _step(learner, rng, obs, truncated=True)  # bootstraps, without a graph
    assert learner._here.observation is obs and learner._here.logits is None
    obs = _observation(rng, learner.observation_shape)  # the reset
    obs, _ = _step(learner, rng, obs)
    assert learner._here.kept
    _step(learner, rng, obs, terminated=True)
    assert learner._here is None
    reset = _observation(rng, learner.observation_shape)
    logits = learner.stand_on(reset)
    assert torch.equal(logits, learner.net.heads(learner._here.inputs)[0])  # current weights
    assert learner._here.on is None and learner._here.updates == learner.updates


def test_a_second_act_on_the_same_observation_makes_a_fresh_pass() -> None:
    """After a refused update the agent acts on s again: the kept pass served once (its
    graph may be spent), the second act computes on the current weights."""
    learner, rng = _learner("mlp")
    obs = _observation(rng, learner.observation_shape)
    obs, _ = _step(learner, rng, obs)
    kept = learner.stand_on(obs)
    again = learner.stand_on(obs)
    assert again is not kept and learner._here.on is None


def test_auto_reuses_on_mlp_only() -> None:
    config = AgentConfig()
    assert config.reuse_next_pass == "auto" and config.reuses_next_pass("mlp")
    assert not any(config.reuses_next_pass(n) for n in ("shared-stream", "shared-conv", "stream"))
    assert not AgentConfig(reuse_next_pass=False).reuses_next_pass("mlp")
    assert AgentConfig(reuse_next_pass=True).reuses_next_pass("shared-stream")
    rng = np.random.default_rng(5)
    learner = A2CLearner(AgentConfig(network="mlp", hidden_size=16), (4,), 2, seed=3)
    _step(learner, rng, _observation(rng, (4,)))
    assert learner._here.kept  # auto on mlp: the pass on s' is kept for the next act


@pytest.mark.parametrize("network", ["mlp", "shared-conv"])
def test_off_the_learner_acts_on_the_current_weights(network: str) -> None:
    config = AgentConfig(network=network, hidden_size=16,
                         reuse_next_pass=False if network == "mlp" else "auto")
    learner = A2CLearner(config, (4,) if network == "mlp" else (4, 84, 84), 2, seed=3)
    rng = np.random.default_rng(5)
    obs = _observation(rng, learner.observation_shape)
    obs, _ = _step(learner, rng, obs)
    assert learner._here.logits is None and not learner._here.kept


def test_resume_makes_the_kept_pass_again_from_the_saved_weights() -> None:
    learner, rng = _learner("shared-conv")
    obs = _observation(rng, learner.observation_shape)
    for _ in range(4):
        obs, _ = _step(learner, rng, obs)
    state = copy.deepcopy(learner.state_dict())
    assert "kept_pass_weights" in state
    twin, _ = _learner("shared-conv")
    twin.load_state_dict(state)
    twin.resume_on(obs, seen=True)
    assert torch.equal(twin._here.logits, learner._here.logits)
    assert twin._here.updates == learner._here.updates == learner.updates - 1
    _, metrics = _step(learner, np.random.default_rng(1), obs)
    _, twin_metrics = _step(twin, np.random.default_rng(1), obs)
    assert metrics == twin_metrics and torch.equal(twin.net.flat, learner.net.flat)


@pytest.mark.parametrize("own_process", [False, True])
def test_the_overlapped_loop_acts_and_learns_exactly_as_the_plain_loop_does(
        own_process: bool) -> None:
    """With the option, act_ahead makes the pass the update keeps: the overlapped loop
    (the stream stepping during the update) takes the same actions and the same updates."""
    def run(overlap: bool) -> tuple[list[int], torch.Tensor]:
        config = load_config(ROOT / "config.yaml", [
            "env.id=CartPole-v1", "agent.reuse_next_pass=true",
            f"run.overlap_stream={str(overlap).lower()}",
            f"run.stream_process={str(own_process and overlap).lower()}"])
        stream = open_stream(config.env, 0, own_process=config.run.stream_process)
        learner = A2CLearner(config.agent, stream.spec.observation_shape,
                             stream.spec.num_actions, seed=0)
        actions: list[int] = []
        learner._sample = _recorded(learner._sample, actions)  # type: ignore[method-assign]
        loop = ActingLoop(learner, stream, Counters(), overlap=overlap)
        for _ in range(600):  # several episodes: ends, resets and fresh passes
            loop.step()
        loop.close()
        stream.close()
        assert loop.counters.episodes > 3
        return actions[:600], learner.net.flat.clone()

    plain, overlapped = run(False), run(True)
    assert plain[0] == overlapped[0]
    assert torch.equal(plain[1], overlapped[1])


def _recorded(sample, actions: list[int]):
    def recording(logits: torch.Tensor) -> int:
        actions.append(sample(logits))
        return actions[-1]
    return recording
