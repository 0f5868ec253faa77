"""The default settings against the public stream AC(lambda) on small control tasks.

    python tools/research/control.py [--envs CartPole-v1 Acrobot-v1 MountainCar-v0]
                                  [--steps 50000] [--seeds 3] [--set KEY=VALUE ...]

For each task and seed it learns twice from the same budget of agent steps: once with the
daemon's own loop and config (env.id set to the task, everything else as configured), once
with tools/research/reference_stream_ac.py (the public script's algorithm and defaults). It prints a
JSON line per task with, for both: the mean return of all episodes finished within the
budget (how fast it learns: the area under the curve) and of the last 20 (where it got),
per seed and averaged over seeds. Both learners see the task's registered time limit, or
both the one given by --max-episode-steps (the public script runs 10,000).

    python tools/research/control.py --summarize docs/runs/control/*.jsonl

prints the table of kept outputs (the figures in docs/results.md): per task and time limit,
each file's mean over seeds of the mean return within the budget, and its seed count.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from agent.learner import A2CLearner
from runtime.daemon.config import load_config
from runtime.daemon.loop import ActingLoop, Counters
from runtime.streams import open_stream
from tools import ROOT
from tools.research import reference_stream_ac


def daemon_returns(config_path: str, overrides: list[str], env_id: str, seed: int,
                   steps: int, max_episode_steps: int | None = None) -> list[float]:
    """Game returns finished within `steps` agent steps of the daemon's loop."""
    limit = [] if max_episode_steps is None else [
        f"env.kwargs={{max_episode_steps: {max_episode_steps}}}"]
    config = load_config(config_path, [f"env.id={env_id}", f"seed={seed}", *limit, *overrides])
    stream = open_stream(config.env, seed)
    learner = A2CLearner(config.agent, stream.spec.observation_shape, stream.spec.num_actions,
                         seed=seed)
    loop = ActingLoop(learner, stream, Counters())
    returns = []
    for _ in range(steps):
        game = loop.step()
        if game is not None:
            returns.append(game.game_return)
    stream.close()
    return returns


def _figures(per_seed: list[list[float]]) -> dict[str, object]:
    all_mean = [round(float(np.mean(r)), 1) if r else None for r in per_seed]
    last_20 = [round(float(np.mean(r[-20:])), 1) if r else None for r in per_seed]
    return {"mean_all": all_mean, "last_20": last_20,
            "mean_all_over_seeds": round(float(np.mean([m for m in all_mean if m is not None])), 1),
            "last_20_over_seeds": round(float(np.mean([m for m in last_20 if m is not None])), 1)}


def summarize(paths: list[str]) -> str:
    """A markdown table of kept bench_control outputs: one row per task and time limit,
    one column per file and learner."""
    cells: dict[tuple[str, object], dict[str, str]] = {}
    columns: list[str] = []
    for path in paths:
        with open(path) as lines:
            for line in lines:
                record = json.loads(line)
                row = cells.setdefault((record["env"], record.get("max_episode_steps")), {})
                for learner in ("daemon", "reference"):
                    if learner not in record:
                        continue
                    column = f"{path.rsplit('/', 1)[-1]} ({learner})"
                    if column not in columns:
                        columns.append(column)
                    figures = record[learner]
                    row[column] = (f"{figures['mean_all_over_seeds']} "
                                   f"({len(figures['mean_all'])} seeds)")
    table = ["| task | time limit | " + " | ".join(columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for (env, limit), row in cells.items():
        table.append(f"| {env} | {limit or 'registered'} | "
                     + " | ".join(row.get(c, "") for c in columns) + " |")
    return "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Acrobot-v1",
                                                      "MountainCar-v0"])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-episode-steps", type=int, default=None,
                        help="time limit for both learners (default: the registered one)")
    parser.add_argument("--only", choices=["daemon", "reference"], default=None,
                        help="run one of the two learners (to split the work over processes)")
    parser.add_argument("--summarize", nargs="+", metavar="FILE",
                        help="print the table of kept outputs instead of running")
    args = parser.parse_args(argv)
    if args.summarize:
        try:
            print(summarize(args.summarize))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a missing or foreign file
            parser.exit(2, f"bench_control: error: cannot summarize: "
                           f"{type(exc).__name__}: {exc}\n")
        return 0
    torch.set_num_threads(1)
    for env_id in args.envs:
        line: dict[str, object] = {"env": env_id, "steps": args.steps, "overrides": args.set,
                                   "max_episode_steps": args.max_episode_steps}
        if args.only != "reference":
            line["daemon"] = _figures([daemon_returns(args.config, args.set, env_id, seed,
                                                      args.steps, args.max_episode_steps)
                                       for seed in range(args.seeds)])
        if args.only != "daemon":
            line["reference"] = _figures([[r for _, r in reference_stream_ac.run(
                env_id, args.steps, seed, max_episode_steps=args.max_episode_steps)]
                for seed in range(args.seeds)])
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
