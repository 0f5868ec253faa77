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
from agent.learner import A2CLearner, Transition
from agent.optimizers import ObGD
from runtime.daemon.config import load_config
from tests.conftest import ROOT
from tools import bench_cartpole

PLAIN = AgentConfig(network="mlp", hidden_size=16, normalize_observations=False,
                    reward_transform="none", reuse_next_pass=False)


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


def test_critic_gradient_does_not_reach_the_bootstrap_value() -> None:
    config = dataclasses.replace(PLAIN, optimizer="adam", lambda_=0.0, max_grad_norm=None,
                                 critic_coeff=0.5)
    learner = A2CLearner(config, (3,), 2, seed=1)
    value_params = list(learner.net.value_head.parameters())

    def value_grads(detach: bool) -> list[torch.Tensor]:
        v_s = learner.net.value(torch.from_numpy(S)[None])[0]
        v_next = learner.net.value(torch.from_numpy(S2)[None])[0]
        target = 1.0 + 0.99 * (v_next.detach() if detach else v_next)
        return torch.autograd.grad(0.5 * (target - v_s) ** 2, value_params)

    semi_gradient, full_gradient = value_grads(True), value_grads(False)
    learner.update(Transition(S, 0, 1.0, S2, False, False))
    for param, semi in zip(value_params, semi_gradient, strict=True):
        torch.testing.assert_close(param.grad, semi)
    assert any(not torch.allclose(s, f) for s, f in zip(semi_gradient, full_gradient, strict=True))


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
    """Flat gradient of log pi(a|s) + 2c V(s), the quantity Adam(lambda) traces."""
    logits, value = learner.net(torch.from_numpy(obs)[None])
    log_prob = torch.log_softmax(logits[0], -1)[action]
    objective = log_prob + 2 * learner.config.critic_coeff * value[0]
    grads = torch.autograd.grad(objective, list(learner.net.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def test_adam_lambda_steps_along_delta_times_the_decayed_trace() -> None:
    config = dataclasses.replace(PLAIN, optimizer="adam", lambda_=0.5, gamma=0.9,
                                 max_grad_norm=None, entropy_coeff=0.0, lr=1e-3)
    learner = A2CLearner(config, (3,), 2, seed=4)
    g1 = _objective_gradient(learner, S, 0)
    learner.update(Transition(S, 0, 1.0, S2, False, False))
    g2 = _objective_gradient(learner, S2, 1)
    delta = learner.update(Transition(S2, 1, 0.5, S, False, False))["td_error"]
    # Adam was handed delta * z with z = gamma*lambda*z + grad (grad of the loss: -objective)
    expected = -delta * (0.45 * g1 + g2)
    torch.testing.assert_close(learner.net.flat_grad, expected, rtol=1e-4, atol=1e-7)
    learner.update(Transition(S, 0, 0.0, S2, True, False))
    assert not learner.rule.trace.any()  # an episode end clears the trace


def test_td_error_clip_bounds_the_step_like_a_huber_loss() -> None:
    grads = {}
    for clip in (None, 0.1):
        config = dataclasses.replace(PLAIN, optimizer="adam", lambda_=0.0, max_grad_norm=None,
                                     entropy_coeff=0.0, td_error_clip=clip)
        learner = A2CLearner(config, (3,), 2, seed=2)
        delta = learner.update(Transition(S, 0, 25.0, S2, True, False))["td_error"]
        grads[clip] = learner.net.flat_grad.clone()
    assert delta > 20  # the reported TD error is the real one
    torch.testing.assert_close(grads[0.1], grads[None] * (0.1 / delta))


@pytest.mark.parametrize("optimizer", ["obgd", "adam"])
def test_acting_ahead_leaves_the_update_exactly_as_it_was(optimizer: str) -> None:
    """act_ahead samples a' before the update (the policy lags by one update), but the
    update itself still takes V(s') from the current parameters."""
    config = dataclasses.replace(PLAIN, optimizer=optimizer,
                                 lambda_=0.0 if optimizer == "adam" else 0.8)
    plain, ahead = A2CLearner(config, (3,), 2, seed=6), A2CLearner(config, (3,), 2, seed=6)
    for step in range(3):
        s, s2 = (S, S2) if step % 2 == 0 else (S2, S)
        a = plain.act(s)
        ahead.stand_on(s)
        ahead.act_ahead(s2)
        t = Transition(s, a, 1.0, s2, False, False)
        assert plain.update(t)["td_error"] == ahead.update(t)["td_error"]
    assert torch.equal(plain.net.flat, ahead.net.flat)


def test_actions_are_drawn_with_the_policy_probabilities() -> None:
    learner = A2CLearner(PLAIN, (3,), 4, seed=0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    draws = np.bincount([learner._sample(logits) for _ in range(20_000)], minlength=4)
    np.testing.assert_allclose(draws / 20_000, torch.softmax(logits[0], -1).numpy(), atol=0.015)


def test_obgd_with_lambda_zero_is_exactly_one_step() -> None:
    param = torch.zeros(3)
    opt = ObGD(param, lr=0.1, gamma=0.99, lambda_=0.0, kappa=1e-9)
    opt.step(1.0, torch.tensor([1.0, 0.0, 0.0]), reset=False)
    before = param.clone()
    opt.step(1.0, torch.tensor([0.0, 2.0, 0.0]), reset=False)
    torch.testing.assert_close(param - before, torch.tensor([0.0, -0.2, 0.0]))


def test_obgd_traces_decay_and_reset_at_episode_end() -> None:
    opt = ObGD(torch.zeros(2), lr=0.1, gamma=0.5, lambda_=0.5, kappa=1e-9)
    opt.step(0.0, torch.tensor([1.0, 0.0]), reset=False)
    opt.step(0.0, torch.tensor([0.0, 1.0]), reset=False)
    torch.testing.assert_close(opt.trace, torch.tensor([0.25, 1.0]))
    opt.step(0.0, torch.tensor([0.0, 1.0]), reset=True)
    assert not opt.trace.any()


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

    Measured through the daemon's loop (tools/bench_cartpole.py: 20k agent steps, mean
    return of the last 20 episodes, seeds 0-4): 394.3, 483.1, 500, 456.1, 483.7 (random
    play ~22; 498.6, 500, 480.4, 500, 500 with two passes a step, before
    agent.reuse_next_pass became auto; 310, 399, 270, 227, 358 before the first layer
    started all zero as in stream-x).
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


def test_it_still_learns_cartpole_with_the_stream_overlapped() -> None:
    """run.overlap_stream (the policy lags one update) through the daemon's own loop.
    Measured (tools/bench_cartpole.py --set run.overlap_stream=true): seed 0 reaches 451."""
    assert bench_cartpole.last_20_mean(str(ROOT / "config.yaml"), ["run.overlap_stream=true"],
                                       seed=0, steps=20_000) >= 150


def test_adam_state_saved_per_tensor_is_re_laid_into_the_flat_buffer() -> None:
    """Checkpoints from before Adam ran on the flat buffer still resume."""
    config = dataclasses.replace(PLAIN, optimizer="adam", lambda_=0.0, lr=1e-3)
    learner = A2CLearner(config, (3,), 2, seed=0)
    params = list(learner.net.parameters())
    old = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    old.step()
    state = learner.state_dict()
    state["optimizer"]["adam"] = old.state_dict()
    learner.load_state_dict(state)
    flat_state = learner.rule.adam.state_dict()["state"][0]
    for p in params:
        offset = (p.data_ptr() - learner.net.flat.data_ptr()) // 4
        torch.testing.assert_close(flat_state["exp_avg"][offset:offset + p.numel()],
                                   old.state[p]["exp_avg"].reshape(-1))
    assert float(flat_state["step"]) == 1.0


def test_entropy_floor_raises_beta_only_while_the_entropy_is_below_it() -> None:
    config = dataclasses.replace(PLAIN, entropy_floor=0.5, entropy_floor_rate=0.1)
    learner = A2CLearner(config, (3,), 2, seed=0)
    # a near-deterministic policy (entropy fraction ~0.08): beta grows update by update
    head = learner.net.policy_head[-1]  # the logits layer
    with torch.no_grad():  # in place: the parameters are views of one flat buffer
        head.weight.zero_()
        head.bias.copy_(torch.tensor([4.0, -4.0]))
    betas = [learner.update(Transition(S, 0, 0.0, S2, False, False))["entropy_coeff"]
             for _ in range(5)]
    assert betas[0] == pytest.approx(config.entropy_coeff)
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:], strict=False))
    gain = learner.entropy_gain
    # the gain is part of the learner's state
    fresh = A2CLearner(config, (3,), 2, seed=0)
    fresh.load_state_dict(learner.state_dict())
    assert fresh.entropy_gain == gain
    # a uniform policy (fraction 1.0 > floor): beta falls back towards, never below, the
    # scheduled value
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    for _ in range(200):
        beta = learner.update(Transition(S, 0, 0.0, S2, False, False))["entropy_coeff"]
    assert beta == pytest.approx(config.entropy_coeff)
    assert learner.entropy_gain == 0.0


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
    head = learner.net.policy_head[-1]
    gains = []
    for _ in range(40):
        with torch.no_grad():  # the updates move the head: hold the policy where it is
            head.weight.zero_()
            head.bias.copy_(torch.tensor([1.5, -1.5]))
        learner.update(Transition(S, 0, 0.0, S2, False, False))
        gains.append(learner.entropy_gain)
    assert gains[5] > gains[0] > 0.0
    assert gains[-1] == 0.0


# sha256 prefixes of net.flat for seed 0 with the default agent settings, recorded before
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
    digest = hashlib.sha256(learner.net.flat.detach().numpy().tobytes()).hexdigest()
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
