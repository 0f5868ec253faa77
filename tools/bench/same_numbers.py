"""Does the learner compute what it did at another commit? The same transitions, both trees.

    python tools/bench/same_numbers.py --base REV [--steps 300] [--shape 4 84 84] [--actions 4]
        [--set KEY=VALUE ...] [--base-set KEY=VALUE ...]

REV is checked out into a temporary git worktree. In each tree a fresh process builds the
learner from that tree's config.yaml (plus the --set lines, and for REV also the
--base-set lines, e.g. a setting since removed), eagerly, and drives it through the same
fixed sequence of observations (seeded random frames or vectors), rewards and episode
ends, acting with its own sampler. Prints one JSON
object: how many actions agree, the first step where they differ, and the largest and
median relative differences of the TD error, value and entropy while they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tools import ROOT
from tools.bench.versions import worktree

_PROBE = """
import json, os, sys
import numpy as np, torch
sys.path.insert(0, os.getcwd())
torch.set_num_threads(1)
from agent.learner import A2CLearner, Transition
from runtime.daemon.config import load_config
steps, actions = int(sys.argv[1]), int(sys.argv[2])
shape, sets = json.loads(sys.argv[3]), sys.argv[4:]
config = load_config("config.yaml", sets).agent
learner = A2CLearner(config, tuple(shape), actions, seed=0)
rng = np.random.default_rng(0)
make = (lambda: rng.integers(0, 256, shape, dtype=np.uint8)) if len(shape) == 3 \\
    else (lambda: rng.normal(size=shape).astype(np.float32))
frames = [make() for _ in range(64)]
out, obs = [], frames[0]
for i in range(steps):
    action = learner.act(obs)
    nxt = frames[(i + 1) % 64]
    end = i % 50 == 49
    m = learner.update(Transition(obs, action, float(i % 5 - 2), nxt, end, False))
    out.append([action, m["td_error"], m["value"], m["entropy"]])
    obs = frames[(i + 7) % 64] if end else nxt
print(json.dumps(out))
"""


def trajectory(tree: Path, steps: int, actions: int, shape: list[int],
               overrides: list[str]) -> np.ndarray:
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(steps), str(actions),
                           json.dumps(shape), *overrides], cwd=tree, capture_output=True,
                          text=True, check=True, env=env)
    return np.array(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 84, 84])
    parser.add_argument("--actions", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--base-set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, \
            worktree(args.base, Path(scratch) / "base", "same_numbers") as base:
        if base is None:
            return 2
        a = trajectory(base, args.steps, args.actions, args.shape, args.set + args.base_set)
        b = trajectory(ROOT, args.steps, args.actions, args.shape, args.set)
    differ = np.flatnonzero(a[:, 0] != b[:, 0])
    agree = int(differ[0]) if differ.size else len(a)
    relative = np.abs(a[:agree, 1:] - b[:agree, 1:]) / (np.abs(a[:agree, 1:]) + 1e-6)
    print(json.dumps({
        "base": args.base, "steps": args.steps, "shape": args.shape, "overrides": args.set,
        "base_overrides": args.base_set,
        "actions_agree": float((a[:, 0] == b[:, 0]).mean()),
        "first_differing_action": None if not differ.size else agree,
        "max_relative_difference_while_agreeing": float(relative.max()) if agree else None,
        "median_relative_difference": float(np.median(relative)) if agree else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
