"""Numerics of the one-step A2C update, ObGD's bound, state round trips, and learning."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import gymnasium as gym
import numpy as np
import pytest
import torch

from agent.config import AgentConfig
from agent.distributions import Categorical
from agent.functional import network_params
from agent.learner import A2CLearner, Transition
from runtime.daemon.config import load_config

PLAIN = AgentConfig(network="mlp", hidden_size=16, normalize_observations=False,
                    reward_transform="none", compile=False)


def _obs(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _values(learner: A2CLearner, *observations: np.ndarray) -> list[float]:
    with torch.no_grad():
        return [float(learner.net.value(torch.from_numpy(o)[None])) for o in observations]


S, S2 = _obs(0.1, -0.2, 0.3), _obs(0.5, 0.4, -0.6)


@pytest.mark.parametrize("optimizer", ["obgd", "adam"])
@pytest.mark.parametrize("gamma", [0.99, 0.5])
def test_td_error_bootstraps_with_gamma_unless_terminated(optimizer: str, gamma: float) -> None:
    # Dense weights: over 3 inputs a 90% sparse first layer starts all zero, and V(s') with
    # it, which would hide whether gamma multiplies it.
    config = dataclasses.replace(PLAIN, optimizer=optimizer, gamma=gamma, sparsity=0.0,
                                 lambda_=0.0 if optimizer == "adam" else 0.8)
    cases = [(False, False, True), (False, True, True), (True, False, False)]
    for terminated, truncated, bootstraps in cases:
        learner = A2CLearner(config, (3,), 2, seed=3)
        v_s, v_next = _values(learner, S, S2)
        metrics = learner.update(Transition(S, 1, 2.0, S2, terminated, truncated))
        expected = 2.0 + (gamma * v_next if bootstraps else 0.0) - v_s
        assert metrics["td_error"] == pytest.approx(expected, abs=1e-6)
    # the discount is really used: a different gamma gives a different delta
    assert abs(v_next) > 1e-3


def _value_gradient(learner: A2CLearner, obs: np.ndarray) -> list[torch.Tensor]:
    net = learner.net
    return list(torch.autograd.grad(net.value(torch.from_numpy(obs)[None])[0],
                                    list(net.value_head.parameters())))


def test_critic_gradient_does_not_reach_the_bootstrap_value() -> None:
    """One unbounded ObGD step with lambda 0 moves the value's weights by lr * delta *
    grad V(s): the semi-gradient, with V(s') a constant."""
    config = dataclasses.replace(PLAIN, lambda_=0.0, lr=1e-3, kappa_value=1e-9,
                                 kappa_policy=1e-9, sparsity=0.0)
    learner = A2CLearner(config, (3,), 2, seed=1)
    semi = _value_gradient(learner, S)
    full = [g - 0.99 * n for g, n in zip(semi, _value_gradient(learner, S2), strict=True)]
    before = [p.clone() for p in learner.net.value_head.parameters()]
    delta = learner.update(Transition(S, 0, 1.0, S2, False, False))["td_error"]
    moved = [p - b for p, b in zip(learner.net.value_head.parameters(), before, strict=True)]
    for step, gradient in zip(moved, semi, strict=True):
        torch.testing.assert_close(step, 1e-3 * delta * gradient)
    assert any(not torch.allclose(s, f) for s, f in zip(semi, full, strict=True))


def test_obgd_never_overshoots_the_td_error_on_the_same_sample() -> None:
    rng = np.random.default_rng(0)
    overshoots = {"obgd": 0, "unbounded": 0}
    for trial in range(40):
        s = rng.normal(size=3).astype(np.float32)
        reward = float(rng.choice([-1, 1]) * rng.uniform(2.0, 50.0))
        for mode, kappa in (("obgd", 2.0), ("unbounded", 1e-9)):
            config = dataclasses.replace(PLAIN, lambda_=0.0, kappa_value=kappa, kappa_policy=kappa)
            learner = A2CLearner(config, (3,), 2, seed=trial)
            delta = learner.update(Transition(s, 0, reward, s, True, False))["td_error"]
            delta_after = reward - _values(learner, s)[0]
            if np.sign(delta_after) != np.sign(delta) or abs(delta_after) > abs(delta):
                overshoots[mode] += 1
    assert overshoots["obgd"] == 0
    assert overshoots["unbounded"] > 0  # the same case with no bound does overshoot


def _objective_gradient(learner: A2CLearner, obs: np.ndarray, action: int) -> torch.Tensor:
    """Flat gradient of log pi(a|s) + 2c V(s), the quantity Adam(lambda) traces, in the
    learner's flat order."""
    net = learner.net
    logits, value = net(torch.from_numpy(obs)[None])
    log_prob = torch.log_softmax(logits[0], -1)[action]
    objective = log_prob + 2 * learner.config.critic_coeff * value[0]
    grads = torch.autograd.grad(objective, net.flat_order())
    return torch.cat([g.reshape(-1) for g in grads])


def test_adam_lambda_steps_along_delta_times_the_decayed_trace() -> None:
    config = dataclasses.replace(PLAIN, optimizer="adam", lambda_=0.5, gamma=0.9,
                                 max_grad_norm=None, entropy_coeff=0.0, lr=1e-3)
    learner = A2CLearner(config, (3,), 2, seed=4)
    g1 = _objective_gradient(learner, S, 0)
    delta1 = learner.update(Transition(S, 0, 1.0, S2, False, False))["td_error"]
    g2 = _objective_gradient(learner, S2, 1)
    delta2 = learner.update(Transition(S2, 1, 0.5, S, False, False))["td_error"]
    # the trace z = gamma*lambda*z + grad, grad that of the loss (-objective) ...
    trace = learner.state.optimizer.trace
    torch.testing.assert_close(trace, -(0.45 * g1 + g2), rtol=1e-4, atol=1e-7)
    # ... and Adam was handed delta * z: its first moment is that, averaged
    expected = 0.1 * 0.9 * delta1 * -g1 + 0.1 * delta2 * trace
    torch.testing.assert_close(learner.state.optimizer.exp_avg, expected, rtol=1e-4, atol=1e-7)
    learner.update(Transition(S, 0, 0.0, S2, True, False))
    assert not learner.state.optimizer.trace.any()  # an episode end clears the trace


def test_td_error_clip_bounds_the_step_like_a_huber_loss() -> None:
    norms = {}
    for clip in (None, 0.1):
        config = dataclasses.replace(PLAIN, optimizer="adam", lambda_=0.0, max_grad_norm=None,
                                     entropy_coeff=0.0, td_error_clip=clip)
        learner = A2CLearner(config, (3,), 2, seed=2)
        metrics = learner.update(Transition(S, 0, 25.0, S2, True, False))
        delta, norms[clip] = metrics["td_error"], metrics["grad_norm"]
    assert delta > 20  # the reported TD error is the real one
    assert norms[0.1] == pytest.approx(norms[None] * 0.1 / delta, rel=1e-5)


def test_actions_are_drawn_with_the_policy_probabilities() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    draws = np.bincount([Categorical.sample(logits, generator) for _ in range(20_000)],
                        minlength=4)
    np.testing.assert_allclose(draws / 20_000, torch.softmax(logits, -1).numpy(), atol=0.015)


def _value_trace(learner: A2CLearner) -> torch.Tensor:
    return learner.state.optimizer.value_trace


@pytest.mark.parametrize("lambda_", [0.0, 0.5])
def test_obgd_traces_decay_by_gamma_lambda_and_reset_at_episode_end(lambda_: float) -> None:
    """z <- gamma*lambda*z + grad(-V) on the value side (the separate value tower of the
    mlp: the whole value_trace); with lambda 0 the trace is exactly this step's gradient."""
    config = dataclasses.replace(PLAIN, gamma=0.5, lambda_=lambda_, sparsity=0.0)
    learner = A2CLearner(config, (3,), 2, seed=0)
    grads = []
    for s, s2 in ((S, S2), (S2, S)):
        grads.append(-torch.cat([g.reshape(-1) for g in _value_gradient(learner, s)]))
        learner.update(Transition(s, 0, 0.0, s2, False, False))
    torch.testing.assert_close(_value_trace(learner), 0.5 * lambda_ * grads[0] + grads[1])
    learner.update(Transition(S, 0, 0.0, S2, True, False))
    assert not _value_trace(learner).any()


def _drive(learner: A2CLearner, env: gym.Env, steps: int, seed: int) -> list[int]:
    obs, _ = env.reset(seed=seed)
    obs = obs.astype(np.float32)
    actions = []
    for _ in range(steps):
        action = learner.act(obs)
        actions.append(action)
        nxt, reward, term, trunc, _ = env.step(action)
        nxt = nxt.astype(np.float32)
        learner.update(Transition(obs, action, float(reward), nxt, term, trunc))
        obs = env.reset()[0].astype(np.float32) if term or trunc else nxt
    return actions


@pytest.mark.parametrize("optimizer,lambda_", [("obgd", 0.8), ("adam", 0.0), ("adam", 0.8)])
def test_state_round_trip_gives_identical_next_updates(optimizer: str, lambda_: float) -> None:
    config = dataclasses.replace(AgentConfig(network="mlp", hidden_size=32), optimizer=optimizer,
                                 lambda_=lambda_, lr=1e-3 if optimizer == "adam" else 1.0)
    original = A2CLearner(config, (4,), 2, seed=0)
    _drive(original, gym.make("CartPole-v1"), 150, seed=0)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = A2CLearner(config, (4,), 2, seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    actions_a = _drive(original, gym.make("CartPole-v1"), 100, seed=5)
    actions_b = _drive(restored, gym.make("CartPole-v1"), 100, seed=5)
    assert actions_a == actions_b
    state_a, state_b = original.state_dict(), restored.state_dict()
    for key, tensor in state_a["network"].items():
        assert torch.equal(tensor, state_b["network"][key]), key
    assert state_a["reward_scaler"] == state_b["reward_scaler"]
    assert torch.equal(state_a["rng"], state_b["rng"])


def test_state_of_another_network_is_refused() -> None:
    small = A2CLearner(dataclasses.replace(PLAIN, hidden_size=8), (3,), 2)
    with pytest.raises(ValueError, match="does not fit"):
        A2CLearner(PLAIN, (3,), 2).load_state_dict(small.state_dict())


def test_it_learns_cartpole_with_the_default_settings() -> None:
    """The default config.yaml's agent settings (mlp chosen by `auto`) learn CartPole-v1.

    Random play scores ~22; docs/results.md has the measured returns (tools/research/cartpole.py).
    Threshold 150 leaves margin for platform numerics.
    """
    torch.set_num_threads(1)
    config = load_config("config.yaml").agent
    learner = A2CLearner(config, (4,), 2, seed=0)
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    obs = obs.astype(np.float32)
    returns, episode_return = [], 0.0
    for _ in range(20_000):
        action = learner.act(obs)
        nxt, reward, term, trunc, _ = env.step(action)
        nxt = nxt.astype(np.float32)
        learner.update(Transition(obs, action, float(reward), nxt, term, trunc))
        episode_return += float(reward)
        if term or trunc:
            returns.append(episode_return)
            episode_return = 0.0
            nxt = env.reset()[0].astype(np.float32)
        obs = nxt
    assert np.mean(returns[-20:]) >= 150, returns[-20:]


def test_adam_state_saved_per_tensor_is_re_laid_into_the_flat_order() -> None:
    """Checkpoints from before Adam ran on one flat buffer still resume."""
    config = dataclasses.replace(PLAIN, optimizer="adam", lambda_=0.0, lr=1e-3)
    learner = A2CLearner(config, (3,), 2, seed=0)
    net = learner.net
    params = list(net.parameters())  # the order torch.optim saw them in
    old = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    old.step()
    state = learner.state_dict()
    state["optimizer"]["adam"] = old.state_dict()
    learner.load_state_dict(state)
    exp_avg = learner.spec.plan.unflatten(learner.state.optimizer.exp_avg)
    for p, flat in zip(net.flat_order(), exp_avg, strict=True):
        torch.testing.assert_close(flat, old.state[p]["exp_avg"])
    assert float(learner.state.optimizer.step) == 1.0


def _hold_policy(learner: A2CLearner, bias: list[float]) -> None:
    """Set the logits layer to a constant output (zero weights, this bias)."""
    net = learner.net
    head = net.policy_head[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(bias))
    learner.state = learner.state._replace(params=network_params(net))


def _gain(learner: A2CLearner) -> float:
    return float(learner.state.entropy_gain)


def test_entropy_floor_raises_beta_only_while_the_entropy_is_below_it() -> None:
    config = dataclasses.replace(PLAIN, entropy_floor=0.5, entropy_floor_rate=0.1)
    learner = A2CLearner(config, (3,), 2, seed=0)
    # a near-deterministic policy (entropy fraction ~0.08): beta grows update by update
    _hold_policy(learner, [4.0, -4.0])
    betas = [learner.update(Transition(S, 0, 0.0, S2, False, False))["entropy_coeff"]
             for _ in range(5)]
    assert betas[0] == pytest.approx(config.entropy_coeff)
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:], strict=False))
    gain = _gain(learner)
    # the gain is part of the learner's state
    fresh = A2CLearner(config, (3,), 2, seed=0)
    fresh.load_state_dict(learner.state_dict())
    assert _gain(fresh) == gain
    # a uniform policy (fraction 1.0 > floor): beta falls back towards, never below, the
    # scheduled value
    _hold_policy(learner, [0.0, 0.0])
    for _ in range(200):
        beta = learner.update(Transition(S, 0, 0.0, S2, False, False))["entropy_coeff"]
    assert beta == pytest.approx(config.entropy_coeff)
    assert _gain(learner) == 0.0


def test_the_entropy_floor_decays_on_its_schedule_and_beta_follows() -> None:
    config = dataclasses.replace(PLAIN, entropy_floor=0.5, entropy_floor_final=0.1,
                                 entropy_floor_decay_start=3, entropy_floor_decay_steps=4)
    assert [config.floor_at(u) for u in (0, 3, 5, 7, 100)] == pytest.approx(
        [0.5, 0.5, 0.3, 0.1, 0.1])
    assert dataclasses.replace(config, entropy_floor=None).floor_at(5) is None
    assert dataclasses.replace(config, entropy_floor_final=None).floor_at(100) == 0.5
    # an entropy fraction of ~0.28 (logits 1.5, -1.5): below the floor until it decays
    # under it, then beta falls back to the scheduled value
    config = dataclasses.replace(config, entropy_floor_rate=0.5)
    learner = A2CLearner(config, (3,), 2, seed=0)
    gains = []
    for _ in range(40):
        _hold_policy(learner, [1.5, -1.5])  # the updates move the head: hold the policy
        learner.update(Transition(S, 0, 0.0, S2, False, False))
        gains.append(_gain(learner))
    assert gains[5] > gains[0] > 0.0
    assert gains[-1] == 0.0


# sha256 prefixes of the flat weights for seed 0 with the default agent settings, recorded before
# the learner stopped reseeding the process: a seeding change must not move them.
# (4,): the first layer starts all zero since 8bf9d00 (stream-x's rounding); shared-conv's
# weights are those of every version before; shared-stream's those of its Breakout runs.
INITIAL_WEIGHTS = {((4, 84, 84), "shared-conv"): "58b4450ee1123607",
                   ((4, 84, 84), "shared-stream"): "a56416522e387837",
                   ((4,), "mlp"): "6a90ac20d4db8eeb"}


@pytest.mark.parametrize(("shape", "network"), list(INITIAL_WEIGHTS))
def test_initial_weights_follow_the_seed_and_leave_the_global_rng_alone(
        shape: tuple[int, ...], network: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    learner = A2CLearner(AgentConfig(network=network), shape, 4, seed=0)
    digest = hashlib.sha256(learner.state.params.numpy().tobytes()).hexdigest()
    assert digest[:16] == INITIAL_WEIGHTS[shape, network]
    assert torch.equal(torch.rand(3), expected_next)  # the process's RNG did not move


def test_sparse_init_rounds_the_zeroed_fan_in_up_as_stream_x_does() -> None:
    """90% of a 100-input unit's weights are zero; a 4-input layer starts all zero (the
    LayerNorm after it makes its first steps; see sparse_init_)."""
    from torch import nn

    from agent.networks import sparse_init_
    wide, narrow = nn.Linear(100, 8), nn.Linear(4, 8)
    sparse_init_(wide, 0.9)
    sparse_init_(narrow, 0.9)
    assert ((wide.weight == 0).sum(dim=1) == 90).all()
    assert (wide.weight.abs() <= 0.1).all() and (wide.bias == 0).all()
    assert (narrow.weight == 0).all()
    dense = nn.Linear(4, 8)
    sparse_init_(dense, 0.0)
    assert (dense.weight != 0).all()
