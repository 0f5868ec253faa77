"""How reliably the default settings learn CartPole-v1: several seeds, a fixed budget.

    python tools/research/cartpole.py [--steps 20000] [--seeds 5] [--config config.yaml]
                                   [--set KEY=VALUE ...]

Uses the daemon's own loop (runtime.daemon.loop.ActingLoop, stream and learner built from the
config with env.id=CartPole-v1) and prints one JSON object: per seed, the mean return of
the last 20 episodes (random play is about 22).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from tools import ROOT
from tools.research.control import daemon_returns


def last_20_mean(config_path: str, overrides: list[str], seed: int, steps: int) -> float:
    returns = daemon_returns(config_path, overrides, "CartPole-v1", seed, steps)
    return round(float(np.mean(returns[-20:])), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {seed: last_20_mean(args.config, args.set, seed, args.steps)
               for seed in range(args.seeds)}
    print(json.dumps({"steps": args.steps, "overrides": args.set,
                      "mean_return_last_20": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
