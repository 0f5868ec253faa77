"""Benchmark a sensor stream with uniformly random actions; prints one JSON line.

Usage: python tools/bench/stream.py [--env ALE/Breakout-v5] [--steps 5000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from runtime.streams import Stream, make_stream


def play(stream: Stream, actions: np.ndarray) -> tuple[float, int, int]:
    """Step through `actions` (resetting at every end); seconds, learning episodes, games."""
    resets = games = 0
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, info = stream.step(int(action))
        if terminated or truncated:
            games += int(info["game_over"])
            resets += 1
            stream.reset()
    return time.perf_counter() - start, resets, games


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="ALE/Breakout-v5")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    stream = make_stream(args.env, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    actions = rng.integers(0, stream.spec.num_actions, size=args.steps)
    stream.reset()
    elapsed, resets, games = play(stream, actions)
    stream.close()
    print(json.dumps({
        "env": args.env, "steps": args.steps, "seconds": round(elapsed, 3),
        "steps_per_s": round(args.steps / elapsed, 1),
        "frames_per_s": round(args.steps * stream.spec.frame_skip / elapsed, 1),
        "learning_episodes": resets, "games": games}))


if __name__ == "__main__":
    main()
