"""Throughput of the learning loop: the daemon's own loop vs faithful baselines, side by side.

    python tools/bench/throughput.py [--blocks 5] [--block-steps 400] [--threads 1]

Variants, run alternating in blocks on ALE/Breakout-v5 with the same stream (our Atari
preprocessing) so machine noise hits all alike:
  seed-loop     the seed notebook's loop: float32 frames, two full forwards per step,
                backward, clip_grad_norm_, Adam (foreach), shared-conv network
  daemon-seed   runtime.daemon.loop.ActingLoop + A2CLearner with presets/seed.yaml
                (shared-conv net, Adam)
  streamx-loop  the public stream AC(lambda) script's update: V(s), V(s') and pi(s) as separate
                forwards, two backward passes, ObGD with per-parameter Python loops and .item()
  daemon-stream ActingLoop + A2CLearner with config.yaml on the stream net (ObGD)
  daemon-default  the default config.yaml as it is (ObGD over the shared trunk of the network
                `auto` picks for frames, the update compiled)
  daemon-default-eager  the default with agent.compile: false (the same update, eagerly)
  daemon-default-onednn-on, -off  the default with run.onednn: on (oneDNN convolutions) or
                off (torch's own); `auto` picks off for the default's shared-stream network
  *-2threads    the same daemon loops with run.torch_threads: 2 (both cores for the update)
  learner-*     the learner alone on recorded frames, no emulator: the ceiling of any loop
Prints one JSON object: steps/s per variant (median, min, max over blocks) and the ratios
daemon/baseline per network. One learner update per environment step everywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from agent.learner import A2CLearner, Transition
from agent.networks import build_network
from runtime.daemon.config import load_config
from runtime.daemon.lifecycle import configure_torch
from runtime.daemon.loop import ActingLoop, Counters
from runtime.streams import open_stream
from tools import ROOT

Step = Callable[[], None]


def daemon_loop(config_path: Path, overrides: tuple[str, ...] = ()) -> Step:
    """The exact code path the daemon runs per step."""
    config = load_config(config_path, list(overrides))
    stream = open_stream(config.env, config.seed)
    learner = A2CLearner(config.agent, stream.spec.observation_shape, stream.spec.num_actions)
    loop = ActingLoop(learner, stream, Counters())

    def step() -> None:
        configure_torch(config, learner.network_name)  # as the daemon sets it (~1 us)
        loop.step()
    return step


def learner_only(config_path: Path, overrides: tuple[str, ...] = ()) -> Step:
    """act + update on 256 recorded frames: the learner's compute with a free stream."""
    config = load_config(config_path, list(overrides))
    stream = open_stream(config.env, config.seed)
    learner = A2CLearner(config.agent, stream.spec.observation_shape, stream.spec.num_actions)
    frames = [stream.reset()]
    for i in range(256):
        frames.append(stream.step(i % stream.spec.num_actions)[0])
    state = {"i": 0}

    def step() -> None:
        configure_torch(config, learner.network_name)
        i = state["i"] = (state["i"] + 1) % 256
        action = learner.act(frames[i])
        learner.update(Transition(frames[i], action, 0.0, frames[i + 1], False, False))
    return step


def _baseline(step: Step, threads: int) -> Step:
    """Baselines run with torch's defaults (oneDNN on) and --threads, whatever a daemon
    variant set."""
    def run() -> None:
        torch.backends.mkldnn.enabled = True
        torch.set_num_threads(threads)
        step()
    return run


def seed_loop() -> Step:
    """The seed notebook's training step (its compute, with gamma used and V(s') detached)."""
    stream = open_stream(load_config(None).env, 0)
    net = build_network("shared-conv", stream.spec.observation_shape, stream.spec.num_actions,
                        hidden_size=256, sparsity=0.0, normalize=False)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    state = {"s": torch.tensor(stream.reset(), dtype=torch.float32).unsqueeze(0)}

    def step() -> None:
        logits, value = net.heads(state["s"] / 255.0)
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample()
        log_prob, entropy = dist.log_prob(action), dist.entropy()
        obs, reward, done, truncated, _ = stream.step(action.item())
        nxt = torch.tensor(obs, dtype=torch.float32).unsqueeze(0)
        _, next_value = net.heads(nxt / 255.0)
        next_value = next_value * (0.0 if done else 1.0)
        td_error = reward + 0.99 * next_value.detach() - value
        loss = -log_prob * td_error.detach() + 0.5 * td_error.pow(2) - 2e-3 * entropy
        optimizer.zero_grad()
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        optimizer.step()
        state["s"] = nxt if not (done or truncated) else torch.tensor(
            stream.reset(), dtype=torch.float32).unsqueeze(0)
    return step


class _ObGDScript(torch.optim.Optimizer):
    """The public stream-x ObGD: per-parameter traces, Python loops, .item() per tensor."""

    def __init__(self, params, lr: float = 1.0, gamma: float = 0.99, lamda: float = 0.8,
                 kappa: float = 2.0) -> None:
        super().__init__(params, {"lr": lr, "gamma": gamma, "lamda": lamda, "kappa": kappa})

    def step(self, delta: float, reset: bool = False) -> None:  # type: ignore[override]
        z_sum = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    state["eligibility_trace"] = torch.zeros_like(p.data)
                e = state["eligibility_trace"]
                e.mul_(group["gamma"] * group["lamda"]).add_(p.grad, alpha=1.0)
                z_sum += e.abs().sum().item()
        dot = max(abs(delta), 1.0) * z_sum * group["lr"] * group["kappa"]
        step_size = group["lr"] / dot if dot > 1 else group["lr"]
        for group in self.param_groups:
            for p in group["params"]:
                e = self.state[p]["eligibility_trace"]
                p.data.add_(delta * e, alpha=-step_size)
                if reset:
                    e.zero_()


def streamx_loop() -> Step:
    """The public stream AC(lambda) script's per-step update, on the stream network."""
    config = load_config(ROOT / "config.yaml")
    stream = open_stream(config.env, 0)
    net = build_network("stream", stream.spec.observation_shape, stream.spec.num_actions,
                        hidden_size=256, sparsity=0.9, normalize=True)
    pi, v = net.policy_head, net.value_head
    opt_pi = _ObGDScript(pi.parameters(), kappa=3.0)
    opt_v = _ObGDScript(v.parameters(), kappa=2.0)
    shape = stream.spec.observation_shape
    stats = {"count": 0, "mean": torch.zeros(shape), "m2": torch.zeros(shape)}
    state = {"s": stream.reset()}

    def prep(obs) -> torch.Tensor:  # the script normalises every observation on arrival
        x = torch.tensor(obs, dtype=torch.float32) / 255.0
        stats["count"] += 1
        diff = x - stats["mean"]
        stats["mean"] += diff / stats["count"]
        stats["m2"] += diff * (x - stats["mean"])
        var = stats["m2"] / max(stats["count"] - 1, 1)
        return ((x - stats["mean"]) / torch.sqrt(var + 1e-8)).unsqueeze(0)

    state["x"] = prep(state["s"])

    def step() -> None:
        s = state["x"]
        with torch.no_grad():
            action = torch.multinomial(F.softmax(pi(s), -1), 1).item()
        obs, reward, done, truncated, _ = stream.step(action)
        s_prime = prep(obs)
        v_s, v_prime = v(s), v(s_prime)
        delta = reward + 0.99 * v_prime * (0.0 if done else 1.0) - v_s
        dist = torch.distributions.Categorical(logits=pi(s))
        log_prob = -dist.log_prob(torch.tensor([action])).sum()
        entropy = -0.01 * dist.entropy().sum() * torch.sign(delta).item()
        opt_v.zero_grad()
        opt_pi.zero_grad()
        (-v_s).sum().backward()
        (log_prob + entropy).backward()
        opt_pi.step(delta.item(), reset=done or truncated)
        opt_v.step(delta.item(), reset=done or truncated)
        state["x"] = s_prime if not (done or truncated) else prep(stream.reset())
    return step


def time_block(step: Step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="run these variants only (ratios need both of their variants)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_preset, default = ROOT / "presets" / "seed.yaml", ROOT / "config.yaml"
    threads = ("run.torch_threads=2",)
    stream_net = ("agent.network=stream",)
    makers: dict[str, Callable[[], Step]] = {
        "seed-loop": lambda: _baseline(seed_loop(), args.threads),
        "daemon-seed": lambda: daemon_loop(seed_preset),
        "daemon-seed-2threads": lambda: daemon_loop(seed_preset, threads),
        "learner-seed": lambda: learner_only(seed_preset),
        "streamx-loop": lambda: _baseline(streamx_loop(), args.threads),
        "daemon-stream": lambda: daemon_loop(default, stream_net),
        "daemon-stream-2threads": lambda: daemon_loop(default, stream_net + threads),
        "learner-stream": lambda: learner_only(default, stream_net),
        "daemon-default": lambda: daemon_loop(default),
        "daemon-default-eager": lambda: daemon_loop(default, ("agent.compile=false",)),
        "daemon-default-onednn-on": lambda: daemon_loop(default, ("run.onednn=on",)),
        "daemon-default-onednn-off": lambda: daemon_loop(default, ("run.onednn=off",))}
    unknown = set(args.only or ()) - set(makers)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)} (known: {', '.join(makers)})")
    variants = {name: make() for name, make in makers.items()
                if args.only is None or name in args.only}
    for step in variants.values():
        time_block(step, 50)  # warm-up: allocator, oneDNN primitive caches
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.blocks):
        for name, step in variants.items():
            rates[name].append(time_block(step, args.block_steps))

    def ratio(a: str, b: str) -> float | None:
        if a not in rates or b not in rates:
            return None  # one of the two was left out by --only
        return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)), 2)

    print(json.dumps({
        "torch_threads": args.threads, "blocks": args.blocks, "block_steps": args.block_steps,
        "steps_per_s": {name: {"median": round(statistics.median(r), 1),
                               "min": round(min(r), 1), "max": round(max(r), 1)}
                        for name, r in rates.items()},
        "ratio_daemon_over_seed_loop (shared-conv net)": ratio("daemon-seed", "seed-loop"),
        "ratio_daemon_over_streamx_loop (stream net)": ratio("daemon-stream", "streamx-loop"),
        "ratio_2threads_over_daemon (shared-conv net)": ratio("daemon-seed-2threads",
                                                              "daemon-seed"),
        "ratio_2threads_over_daemon (stream net)": ratio("daemon-stream-2threads",
                                                         "daemon-stream"),
        "ratio_learner_alone_over_seed_loop (shared-conv net)": ratio("learner-seed", "seed-loop"),
        "ratio_compiled_over_eager (default)": ratio("daemon-default", "daemon-default-eager"),
        "ratio_onednn_on_over_off (default)": ratio("daemon-default-onednn-on",
                                                    "daemon-default-onednn-off"),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
