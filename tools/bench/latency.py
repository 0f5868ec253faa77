"""Decision latency (observation in, action out) and CPU time per step, under learning.

What an embedded agent acting on a clock cares about, under its own learning load.

    python tools/bench/latency.py [--steps 3000] [--env ALE/Breakout-v5] [--set KEY=VALUE ...]

Runs the daemon's own loop (runtime.daemon.loop.ActingLoop + A2CLearner, config.yaml plus
the --set lines, one learner update per step) and times, per step, the decision latency:
from the stream handing over an observation to the action on it, which includes the
update on the transition into it. Prints one JSON object: decision latency and step time
p50/p99/max in microseconds, steps/s, and CPU milliseconds per step (process time, all
threads) beside wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np

from agent.learner import A2CLearner
from runtime.daemon.config import load_config
from runtime.daemon.lifecycle import configure_torch
from runtime.daemon.loop import ActingLoop, Counters
from runtime.streams import open_stream
from tools import ROOT


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    values = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"p50": round(float(np.percentile(values, 50)), 1),
            "p99": round(float(np.percentile(values, 99)), 1),
            "max": round(float(values.max()), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--env", default="ALE/Breakout-v5")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(ROOT / "config.yaml", [f"env.id={args.env}", *args.set])
    stream = open_stream(config.env, config.seed)
    learner = A2CLearner(config.agent, stream.spec.observation_shape, stream.spec.num_actions,
                         seed=config.seed)
    configure_torch(config, learner.network_name)
    loop = ActingLoop(learner, stream, Counters())
    decisions: list[int] = []
    arrived = {"at": 0}  # when the stream last handed over an observation
    stream_step, stream_reset = stream.step, stream.reset

    def timed_step(action: int) -> tuple:
        result = stream_step(action)
        arrived["at"] = time.perf_counter_ns()
        return result

    def timed_reset() -> np.ndarray:
        observation = stream_reset()
        arrived["at"] = time.perf_counter_ns()
        return observation

    def timed(choose: Callable[[np.ndarray], int]) -> Callable[[np.ndarray], int]:
        def decide(observation: np.ndarray) -> int:
            action = choose(observation)
            decisions.append(time.perf_counter_ns() - arrived["at"])
            return action
        return decide

    # The loop looks these up on each call: timing wrappers on the instances.
    stream.step = timed_step  # type: ignore[method-assign]
    stream.reset = timed_reset  # type: ignore[method-assign]
    learner.act = timed(learner.act)  # type: ignore[method-assign]
    for _ in range(args.warmup):
        loop.step()
    decisions.clear()
    steps: list[int] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        start = time.perf_counter_ns()
        loop.step()
        steps.append(time.perf_counter_ns() - start)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    stream.close()
    print(json.dumps({
        "env": args.env, "overrides": args.set, "steps": args.steps,
        "decision_latency_us": percentiles_us(decisions),
        "step_time_us": percentiles_us(steps),
        "steps_per_s": round(args.steps / wall, 1),
        "cpu_ms_per_step": round(1e3 * cpu / args.steps, 3),
        "wall_ms_per_step": round(1e3 * wall / args.steps, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
