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

On an Atari id it learns from this project's own stream, the one the daemon learns from
with the default config.yaml's settings (no sticky actions, up to 30 no-ops, frame skip 4
with max-pool, 84x84 grayscale, 4 frames, a lost life terminal for learning), with the
public Atari script's networks: per tower three convolutions (32 8x8 stride 5, 64 4x4
stride 3, 64 3x3 stride 2) and a 256-unit layer, each followed by a parameter-free
LayerNorm over the whole activation and a LeakyReLU; each frame normalised per pixel by
the running statistics of the frames seen (the public script's wrapper normalises each
frame before stacking). It keeps a run dir as the daemon does, so that
tools/research/sweep.py and plot_metrics.py read it beside the daemon's runs:

    python tools/research/reference_stream_ac.py --env ALE/Pong-v5 --steps 1000000 \\
        --seed 0 --run-dir runs/reference/pong/seed-0

metrics.jsonl (a line per whole game), status.json, config.yaml and a checkpoint every
50,000 steps; the same command after a stop resumes from the checkpoint, exactly, and the
games played after it are played again, not counted twice.

    python tools/research/reference_stream_ac.py --probe 5 --run-dir runs/reference/pong/seed-0

plays five whole games with the actor of a frames run's checkpoint (the run dir's stream,
actions sampled as while learning, the frame statistics held as saved) and prints what
tools/research/policy_probe.py prints for an exported policy: whether the actor's choice
depends on what it sees. It reads the run dir and changes nothing in it.

It is a benchmark baseline, not part of the runtime: tools/research/control.py compares the
daemon's default settings against it, per task and seed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.daemon.config import load_config
from runtime.errors import first_line
from runtime.files import write_atomic
from runtime.streams import Stream, StreamError, is_atari_id, open_stream
from tools import ROOT
from tools.research.policy_probe import Profile, probe
from tools.research.sweep import read_env_id

CHECKPOINT_EVERY = 50_000


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

    def state(self) -> tuple[int, np.ndarray, np.ndarray]:
        return self.count, self.mean, self._m2

    def load(self, state: tuple[int, np.ndarray, np.ndarray]) -> None:
        self.count, self.mean, self._m2 = state


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


def _sparse_conv(channels: int, outputs: int, size: int, stride: int, sparsity: float,
                 generator: torch.Generator) -> nn.Conv2d:
    layer = nn.Conv2d(channels, outputs, size, stride=stride)
    fan_in = channels * size * size
    bound = math.sqrt(1.0 / fan_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        rows = layer.weight.view(outputs, fan_in)
        zeroed = int(math.ceil(sparsity * fan_in))
        for row in rows:
            row[torch.randperm(fan_in, generator=generator)[:zeroed]] = 0.0
        layer.bias.zero_()
    return layer


class _ConvTower(nn.Module):
    """The public Atari script's tower over a (frames, 84, 84) stack, batch of one."""

    def __init__(self, channels: int, frame: tuple[int, int], hidden: int, outputs: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.convs = nn.ModuleList([_sparse_conv(channels, 32, 8, 5, 0.9, generator),
                                    _sparse_conv(32, 64, 4, 3, 0.9, generator),
                                    _sparse_conv(64, 64, 3, 2, 0.9, generator)])
        with torch.no_grad():
            flat = self._features(torch.zeros(1, channels, *frame)).shape[1]
        self.linears = nn.ModuleList([_sparse_linear(flat, hidden, 0.9, generator),
                                      _sparse_linear(hidden, outputs, 0.9, generator)])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
            x = F.leaky_relu(F.layer_norm(x, x.shape[1:]))
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linears[0](self._features(x.unsqueeze(0)))
        return self.linears[1](F.leaky_relu(F.layer_norm(x, x.shape[1:]))).squeeze(0)


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


class _ActorCritic:
    """The two towers with their ObGD optimisers and the reward scaling: one transition
    in, one update made."""

    def __init__(self, policy: nn.Module, value: nn.Module, gamma: float = 0.99,
                 entropy_coeff: float = 0.01) -> None:
        self.policy, self.value, self.gamma, self.entropy_coeff = \
            policy, value, gamma, entropy_coeff
        self.policy_opt = _ObGD(list(policy.parameters()), lr=1.0, decay=gamma * 0.8,
                                kappa=3.0)
        self.value_opt = _ObGD(list(value.parameters()), lr=1.0, decay=gamma * 0.8, kappa=2.0)
        self.trace_stats = _RunningMeanVar(())
        self.reward_trace = 0.0

    def act(self, s: torch.Tensor, generator: torch.Generator) -> tuple[int, torch.Tensor]:
        probs = F.softmax(self.policy(s), dim=-1)
        return int(torch.multinomial(probs.detach(), 1, generator=generator)), probs

    def learn(self, s: torch.Tensor, probs: torch.Tensor, a: int, reward: float,
              s_next: torch.Tensor, cut: bool, ended: bool) -> None:
        """`cut`: no bootstrap from s_next; `ended`: the learning episode ended (traces
        and the discounted return trace restart)."""
        self.reward_trace = self.reward_trace * self.gamma * (1.0 - float(ended)) + reward
        self.trace_stats.update(np.asarray(self.reward_trace))
        scaled = reward / math.sqrt(float(self.trace_stats.var) + 1e-8)
        v = self.value(s)
        with torch.no_grad():
            v_next = 0.0 if cut else float(self.value(s_next))
        delta = scaled + self.gamma * v_next - float(v.detach())
        log_prob = torch.log(probs[a])
        entropy = -(probs * torch.log(probs)).sum()
        self.policy.zero_grad()
        self.value.zero_grad()
        (-v).sum().backward()
        (-log_prob - self.entropy_coeff * entropy * math.copysign(1.0, delta)).backward()
        self.policy_opt.step(delta, reset=ended)
        self.value_opt.step(delta, reset=ended)

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "value": self.value.state_dict(),
                "policy_traces": self.policy_opt.traces, "value_traces": self.value_opt.traces,
                "reward_trace": self.reward_trace,
                "trace_stats": self.trace_stats.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.value.load_state_dict(state["value"])
        for mine, saved in ((self.policy_opt.traces, state["policy_traces"]),
                            (self.value_opt.traces, state["value_traces"])):
            for trace, value in zip(mine, saved, strict=True):
                trace.copy_(value)
        self.reward_trace = state["reward_trace"]
        self.trace_stats.load(state["trace_stats"])


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
    learner = _ActorCritic(_Tower(n_obs + 1, hidden, n_actions, generator),
                           _Tower(n_obs + 1, hidden, 1, generator), gamma, entropy_coeff)
    obs_stats = _RunningMeanVar((n_obs,))

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
        a, probs = learner.act(s, generator)
        raw, reward, terminated, truncated, _ = env.step(a)
        elapsed += 1
        game_return += float(reward)
        ended = terminated or truncated
        s_next = observe(raw, elapsed)
        learner.learn(s, probs, a, float(reward), s_next,
                      cut=terminated or (truncated and truncation_is_terminal), ended=ended)
        if ended:
            finished.append((t, game_return))
            raw, _ = env.reset()
            elapsed, game_return = 0, 0.0
            s = observe(raw, elapsed)
        else:
            s = s_next
    env.close()
    return finished


class _FrameNormaliser:
    """Each frame of a stack normalised per pixel by the running mean and variance of the
    newest frames seen so far, updated with every observation's newest frame."""

    def __init__(self, frame: tuple[int, int]) -> None:
        self.stats = _RunningMeanVar(frame)

    def __call__(self, stack: np.ndarray) -> torch.Tensor:
        self.stats.update(stack[-1].astype(np.float64))
        return self.held(stack)

    def held(self, stack: np.ndarray) -> torch.Tensor:
        """The stack normalised by the statistics as they are, without adding to them."""
        normed = (stack - self.stats.mean) / np.sqrt(self.stats.var + 1e-8)
        return torch.as_tensor(normed, dtype=torch.float32)


# What a checkpoint holds besides tensors and plain containers: the frame and return
# statistics' numpy arrays and scalars, pickled through the functions their own reduce
# names. Only these globals may be unpickled, so a forged file cannot run code.
_NUMPY_ARRAYS = [np.ndarray, np.dtype, type(np.dtype(np.float64)),
                 np.zeros(0).__reduce__()[0], np.float64(0).__reduce__()[0]]


def _unpickle(path: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals(_NUMPY_ARRAYS):
        return torch.load(path, weights_only=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint this tool wrote; SystemExit with one line when it is not one."""
    try:
        return _unpickle(path)
    except Exception as exc:  # a truncated file, another tool's, a forged pickle
        raise SystemExit(f"error: {path} is not a checkpoint of this tool: "
                         f"{first_line(exc, 200, typed=True)}") from None


class _RunDir:
    """What a frames run leaves: metrics.jsonl, status.json, config.yaml, checkpoint.pt."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def write_config(self, env_id: str, seed: int) -> None:
        text = (f"# tools/research/reference_stream_ac.py: the public stream AC(lambda)\n"
                f"seed: {seed}\nenv:\n  id: {env_id}\n")
        write_atomic(self.path / "config.yaml", text.encode())

    def write_status(self, step: int, games: int, state: str) -> None:
        status = {"step": step, "games": games, "state": state}
        write_atomic(self.path / "status.json", json.dumps(status).encode())

    def load(self) -> dict[str, Any] | None:
        """The checkpoint, with metrics.jsonl cut back to the games it had counted (none
        when a run was killed before its first checkpoint: it starts again from step 0)."""
        path = self.path / "checkpoint.pt"
        state = load_checkpoint(path) if path.exists() else None
        counted = state["step"] if state is not None else 0
        metrics = self.path / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        kept = [line for line in lines if line.strip()
                and json.loads(line)["step"] <= counted]
        write_atomic(metrics, "".join(f"{line}\n" for line in kept).encode())
        return state

    def save(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.path / "checkpoint.pt", buffer.getvalue())

    def add_game(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def open_frames(env_id: str, seed: int) -> Stream:
    """The daemon's stream for `env_id` under the default config.yaml's env settings."""
    config = load_config(ROOT / "config.yaml", [f"env.id={env_id}", f"seed={seed}"])
    return open_stream(config.env, seed)


def run_frames(env_id: str, steps: int, seed: int, run_dir: Path) -> int:
    """Learn from the Atari stream until step `steps`, resuming from run_dir's checkpoint;
    returns the step it stopped at (short of `steps` when interrupted)."""
    generator = torch.Generator().manual_seed(seed)
    try:
        stream = open_frames(env_id, seed)
    except StreamError as exc:
        raise SystemExit(f"error: {env_id}: {exc}") from None
    shape = stream.spec.observation_shape
    channels, frame = shape[0], (shape[1], shape[2])
    learner = _ActorCritic(_ConvTower(channels, frame, 256, stream.spec.num_actions, generator),
                           _ConvTower(channels, frame, 256, 1, generator))
    normalise = _FrameNormaliser(frame)
    out = _RunDir(run_dir)
    out.write_config(env_id, seed)
    saved = out.load()
    if saved is None:
        step, games, game_return = 0, 0, 0.0
        s = normalise(stream.reset())
    else:
        learner.load_state_dict(saved["learner"])
        normalise.stats.load(saved["frame_stats"])
        generator.set_state(saved["generator"])
        stream.load_state_dict(saved["stream"])
        step, games, game_return, s = (saved["step"], saved["games"], saved["game_return"],
                                       saved["s"])

    def checkpoint() -> None:
        out.save({"step": step, "games": games, "game_return": game_return, "s": s,
                  "learner": learner.state_dict(), "generator": generator.get_state(),
                  "frame_stats": normalise.stats.state(),
                  "stream": stream.state_dict()})

    started, start_step = time.monotonic(), step
    try:
        while step < steps:
            a, probs = learner.act(s, generator)
            raw, reward, terminated, truncated, info = stream.step(a)
            step += 1
            game_return += float(reward)
            ended = terminated or truncated
            s_next = normalise(raw)
            learner.learn(s, probs, a, float(reward), s_next, cut=terminated, ended=ended)
            s = normalise(stream.reset()) if ended else s_next
            if info["game_over"]:
                games += 1
                rate = (step - start_step) / max(time.monotonic() - started, 1e-9)
                out.add_game({"step": step, "return": game_return, "time": time.time(),
                              "steps_per_s": round(rate, 1)})
                game_return = 0.0
            if step % CHECKPOINT_EVERY == 0:
                checkpoint()
                out.write_status(step, games, "running")
    except KeyboardInterrupt:
        pass
    checkpoint()
    out.write_status(step, games, "stopped")
    stream.close()
    return step


class _ProbedActor:
    """A frames run's actor as policy_probe.probe plays a policy: the logits of a raw
    observation, normalised by the frame statistics as the checkpoint saved them."""

    def __init__(self, env_id: str, policy: nn.Module, normalise: _FrameNormaliser,
                 stream: Stream) -> None:
        self.policy, self.normalise = policy, normalise
        self.observation_shape = tuple(stream.spec.observation_shape)
        self.observation_dtype = stream.spec.observation_dtype
        self.num_actions = int(stream.spec.num_actions)
        self.metadata = {"env_id": env_id}

    def logits(self, observations: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.policy(self.normalise.held(observations[0])).numpy()[None]


def probe_run(run_dir: Path, games: int, seed: int = 0,
              max_steps: int | None = None) -> tuple[str, int, Profile]:
    """(stream, step, profile) of the actor in run_dir's checkpoint over `games` whole
    games (or `max_steps` steps) on the run's stream, seeded by `seed`; run_dir is only
    read. Raises SystemExit with one line when it holds no frames run's checkpoint."""
    path = run_dir / "checkpoint.pt"
    env_id = read_env_id(run_dir)
    if env_id is None or not path.exists():
        raise SystemExit(f"error: {run_dir} holds no checkpoint of a frames run")
    try:
        stream = open_frames(env_id, seed)
    except StreamError as exc:
        raise SystemExit(f"error: {env_id}: {exc}") from None
    try:
        shape = stream.spec.observation_shape
        policy = _ConvTower(shape[0], (shape[1], shape[2]), 256, stream.spec.num_actions,
                            torch.Generator().manual_seed(seed))
        normalise = _FrameNormaliser((shape[1], shape[2]))
        try:
            saved = _unpickle(path)
            policy.load_state_dict(saved["learner"]["policy"])
            normalise.stats.load(saved["frame_stats"])
            step = int(saved["step"])
        except Exception as exc:  # a truncated file, another tool's, another game's
            raise SystemExit(f"error: {path} is not a checkpoint of this tool for {env_id}: "
                             f"{first_line(exc, 200, typed=True)}") from None
        actor = _ProbedActor(env_id, policy, normalise, stream)
        return env_id, step, probe(actor, stream, games, max_steps, False,
                                   np.random.default_rng(seed))
    finally:
        stream.close()


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
    parser.add_argument("--run-dir", type=Path, help="Atari: the run dir to write and resume")
    parser.add_argument("--probe", type=int, metavar="GAMES",
                        help="play GAMES whole games with --run-dir's saved actor and print "
                             "what it does (the run dir is only read)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.probe is not None:
        if args.run_dir is None or args.probe < 1:
            parser.error("--probe takes a number of games >= 1 and a --run-dir")
        env_id, step, profile = probe_run(args.run_dir, args.probe, args.seed)
        print(f"{args.run_dir} at step {step} on {env_id}, sampled actions")
        print("\n".join(profile.lines()))
        return 0
    try:
        atari = is_atari_id(args.env)
    except StreamError as exc:
        print(f"reference_stream_ac: error: {exc}", file=sys.stderr)
        return 2
    if atari:
        if args.run_dir is None:
            parser.error(f"{args.env}: an Atari run needs --run-dir")
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop with a checkpoint
        step = run_frames(args.env, args.steps, args.seed, args.run_dir)
        print(json.dumps({"env": args.env, "seed": args.seed, "step": step,
                          "run_dir": str(args.run_dir)}))
        return 0 if step >= args.steps else 130
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
