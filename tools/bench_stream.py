"""Benchmark a sensor stream with uniformly random actions; prints one JSON line.

Usage: python tools/bench_stream.py [--env ALE/Breakout-v5] [--steps 5000] [--process]

With --process the same stream also runs in its own process (runtime.sensor_process, as
`run.stream_process` has it), in alternating blocks with the in-process one, and the line
adds its steps/s, the ratio and the hand-over cost per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from runtime.sensor_process import ProcessStream
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
    parser.add_argument("--process", action="store_true",
                        help="compare with the stream in its own process")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks (--process)")
    args = parser.parse_args(argv)

    stream = make_stream(args.env, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    actions = rng.integers(0, stream.spec.num_actions, size=args.steps)
    stream.reset()
    if not args.process:
        elapsed, resets, games = play(stream, actions)
        stream.close()
        print(json.dumps({
            "env": args.env, "steps": args.steps, "seconds": round(elapsed, 3),
            "steps_per_s": round(args.steps / elapsed, 1),
            "frames_per_s": round(args.steps * stream.spec.frame_skip / elapsed, 1),
            "learning_episodes": resets, "games": games}))
        return
    remote = ProcessStream(args.env, seed=args.seed)
    remote.reset()
    block = np.array_split(actions, args.blocks)
    local_s, remote_s = [], []
    for part in block:
        local_s.append(play(stream, part)[0] / len(part))
        remote_s.append(play(remote, part)[0] / len(part))
    stream.close()
    remote.close()
    print(json.dumps({
        "env": args.env, "steps": args.steps, "blocks": args.blocks,
        "steps_per_s": round(1 / statistics.median(local_s), 1),
        "steps_per_s_own_process": round(1 / statistics.median(remote_s), 1),
        "ratio_own_process_over_in_process": round(statistics.median(
            a / b for a, b in zip(local_s, remote_s, strict=True)), 2),
        "hand_over_us_per_step": round(1e6 * statistics.median(
            b - a for a, b in zip(local_s, remote_s, strict=True)), 1)}))


if __name__ == "__main__":
    main()
