"""The public stream AC(lambda) learner for discrete actions, as a yardstick.

    python tools/research/reference_stream_ac.py --env Acrobot-v1 --steps 50000 --seed 0

An independent re-implementation of the public script's algorithm with its defaults
(Elsayed, Vasan and Mahmood, "Streaming Deep Reinforcement Learning Finally Works", 2024):
separate policy and value MLPs of two hidden layers of 32 units, each followed by a
parameter-free LayerNorm and a LeakyReLU; sparse initialisation (90% of each unit's fan-in
zeroed, rounded up, so a first layer over fewer than 10 inputs starts all zero) and zero
biases; ObGD with lr 1, gamma 0.99, lambda 0.8, kappa 3 (policy) and 2
(value); entropy 0.01 scaled by sign(delta); observations normalised by their running
mean and variance, rewards divided by the running standard deviation of a discounted return
trace; the elapsed fraction of the episode's time limit appended to each observation
(counted after the step that made it; the public script's wrapper counts one step less).

Two choices of the public script are left as options because they change the task rather
than the learner: it raises every episode's time limit to 10,000 steps
(`--max-episode-steps 10000`), and it treats a truncated episode as terminal. By default
this runs Gymnasium's registered time limit and bootstraps through truncation, as the
daemon does, so that the two learners are compared on one task.

It is a benchmark baseline, not part of the runtime: tools/research/control.py compares the
daemon's default settings against it, per task and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _RunningMeanVar:
    """Sample mean and variance over everything seen (Welford), variance 1 until 2 samples."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.count = 0
        self.mean = np.zeros(shape)
        self._m2 = np.zeros(shape)

    def update(self, x: np.ndarray) -> None:
        self.count += 1
        before = x - self.mean
        self.mean = self.mean + before / self.count
        self._m2 = self._m2 + before * (x - self.mean)

    @property
    def var(self) -> np.ndarray:
        return self._m2 / (self.count - 1) if self.count > 1 else np.ones_like(self.mean)


def _sparse_linear(inputs: int, outputs: int, sparsity: float,
                   generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(inputs, outputs)
    bound = math.sqrt(1.0 / inputs)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        zeroed = int(math.ceil(sparsity * inputs))
        for row in layer.weight:
            row[torch.randperm(inputs, generator=generator)[:zeroed]] = 0.0
        layer.bias.zero_()
    return layer


class _Tower(nn.Module):
    def __init__(self, inputs: int, hidden: int, outputs: int, generator: torch.Generator) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_sparse_linear(inputs, hidden, 0.9, generator),
                                     _sparse_linear(hidden, hidden, 0.9, generator),
                                     _sparse_linear(hidden, outputs, 0.9, generator)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.leaky_relu(F.layer_norm(layer(x), (layer.out_features,)))
        return self.layers[-1](x)


class _ObGD:
    """z <- gamma*lambda*z + grad; theta <- theta - alpha_eff * delta * z, where
    alpha_eff = alpha / max(1, alpha * kappa * max(|delta|, 1) * ||z||_1)."""

    def __init__(self, params: list[nn.Parameter], *, lr: float, decay: float,
                 kappa: float) -> None:
        self.params, self.lr, self.decay, self.kappa = params, lr, decay, kappa
        self.traces = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, delta: float, reset: bool) -> None:
        l1 = 0.0
        for p, z in zip(self.params, self.traces, strict=True):
            z.mul_(self.decay).add_(p.grad)
            l1 += float(z.abs().sum())
        bound = self.lr * self.kappa * max(abs(delta), 1.0) * l1
        step = self.lr / bound if bound > 1.0 else self.lr
        for p, z in zip(self.params, self.traces, strict=True):
            p.add_(z, alpha=-step * delta)
            if reset:
                z.zero_()


def run(env_id: str, steps: int, seed: int, *, max_episode_steps: int | None = None,
        truncation_is_terminal: bool = False, hidden: int = 32,
        time_feature: bool = True) -> list[tuple[int, float]]:
    """Learn for `steps` agent steps; returns (step, game return) per finished episode.
    `time_feature=False` feeds a constant in the time feature's place (same networks, same
    random numbers, no clock): the ablation of what knowing the time limit is worth."""
    gamma, entropy_coeff = 0.99, 0.01
    generator = torch.Generator().manual_seed(seed)
    try:
        env = gym.wrappers.FlattenObservation(gym.make(env_id,
                                                       max_episode_steps=max_episode_steps))
    except gym.error.Error as exc:  # an unknown id, a missing dependency
        raise SystemExit(f"error: {env_id}: {exc}") from None
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise SystemExit(f"error: {env_id} has no discrete actions")
    time_limit = env.spec.max_episode_steps if env.spec and env.spec.max_episode_steps else 1000
    n_obs, n_actions = env.observation_space.shape[0], int(env.action_space.n)
    policy = _Tower(n_obs + 1, hidden, n_actions, generator)
    value = _Tower(n_obs + 1, hidden, 1, generator)
    policy_opt = _ObGD(list(policy.parameters()), lr=1.0, decay=gamma * 0.8, kappa=3.0)
    value_opt = _ObGD(list(value.parameters()), lr=1.0, decay=gamma * 0.8, kappa=2.0)
    obs_stats, trace_stats = _RunningMeanVar((n_obs,)), _RunningMeanVar(())
    reward_trace = 0.0

    def observe(raw: np.ndarray, elapsed: int) -> torch.Tensor:
        obs_stats.update(raw)
        normed = (raw - obs_stats.mean) / np.sqrt(obs_stats.var + 1e-8)
        clock = -0.5 + elapsed / time_limit if time_feature else 0.0
        return torch.as_tensor(np.append(normed, clock), dtype=torch.float32)

    raw, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    elapsed, game_return, finished = 0, 0.0, []
    s = observe(raw, elapsed)
    for t in range(1, steps + 1):
        probs = F.softmax(policy(s), dim=-1)
        a = int(torch.multinomial(probs.detach(), 1, generator=generator))
        raw, reward, terminated, truncated, _ = env.step(a)
        elapsed += 1
        game_return += float(reward)
        ended = terminated or truncated
        reward_trace = reward_trace * gamma * (1.0 - float(ended)) + float(reward)
        trace_stats.update(np.asarray(reward_trace))
        scaled = float(reward) / math.sqrt(float(trace_stats.var) + 1e-8)
        s_next = observe(raw, elapsed)

        cut = terminated or (truncated and truncation_is_terminal)
        v = value(s)
        with torch.no_grad():
            v_next = 0.0 if cut else float(value(s_next))
        delta = scaled + gamma * v_next - float(v.detach())
        log_prob = torch.log(probs[a])
        entropy = -(probs * torch.log(probs)).sum()
        policy.zero_grad()
        value.zero_grad()
        (-v).sum().backward()
        (-log_prob - entropy_coeff * entropy * math.copysign(1.0, delta)).backward()
        policy_opt.step(delta, reset=ended)
        value_opt.step(delta, reset=ended)

        if ended:
            finished.append((t, game_return))
            raw, _ = env.reset()
            elapsed, game_return = 0, 0.0
            s = observe(raw, elapsed)
        else:
            s = s_next
    env.close()
    return finished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-episode-steps", type=int, default=None,
                        help="the public script uses 10000; default: the registered limit")
    parser.add_argument("--truncation-is-terminal", action="store_true",
                        help="as the public script: no bootstrap through a time limit")
    parser.add_argument("--no-time-feature", action="store_true",
                        help="a constant in place of the time feature (an ablation)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    finished = run(args.env, args.steps, args.seed, max_episode_steps=args.max_episode_steps,
                   truncation_is_terminal=args.truncation_is_terminal,
                   time_feature=not args.no_time_feature)
    returns = [r for _, r in finished]
    print(json.dumps({"env": args.env, "seed": args.seed, "steps": args.steps,
                      "episodes": len(returns),
                      "mean_return": round(float(np.mean(returns)), 2) if returns else None,
                      "last_20": round(float(np.mean(returns[-20:])), 2) if returns else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
