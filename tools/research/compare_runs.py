"""Two run groups side by side, seed by seed, every K steps, and their difference.

The figure is the mean of the last 100 games (or another per-game field), to read where
(and on which seeds) one config pulls ahead of another.

    python tools/research/compare_runs.py docs/runs/shared-stream-kappa-half \\
        docs/runs/entropy-floor-decay --from 1000000 --to 2000000 --every 100000 \\
        [--field entropy] [--window 100]

A group is a directory of seed-<n>/ run dirs, live or archived (metrics.jsonl or
metrics.jsonl.gz, with status.json); the seeds both groups have are paired. Each cell is
"A B B-A" for one seed; a step a run has not reached (its status.json step) is "-". The
last columns average the seeds that reached that step in both groups, and name how many.
`--field` averages another per-game figure over the same games (entropy, entropy_coeff).
Runs a branch shares with its parent up to the branch point (restored from the parent's
checkpoint) show a difference of 0 there.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import OneLineParser, UsageError, positive_int
from runtime.metrics import metrics_path, read_jsonl

Games = list[dict[str, Any]]


def seed_dirs(group: Path) -> dict[int, Path]:
    """seed -> run dir for every GROUP/seed-<n> that holds a status.json."""
    found = {}
    for run_dir in group.glob("seed-*"):
        seed = run_dir.name.removeprefix("seed-")
        if seed.isdigit() and (run_dir / "status.json").exists():
            found[int(seed)] = run_dir
    if not found:
        raise UsageError(f"{group}: no run dirs (seed-<n>/status.json)")
    return found


def load_run(run_dir: Path) -> tuple[Games, int]:
    """A run's games and the step it has reached."""
    reached = json.loads((run_dir / "status.json").read_text())["step"]
    return read_jsonl(metrics_path(run_dir)), int(reached)


def window_mean(games: Games, reached: int, step: int, field: str, window: int) -> float:
    """Mean of `field` over the last `window` games ended by `step`; NaN before the run got
    there or where no game has ended."""
    if reached < step:
        return math.nan
    values = [float(g[field]) for g in games if g["step"] <= step][-window:]
    return float(np.mean(values)) if values else math.nan


def compare(first: Path, second: Path, steps: Sequence[int], field: str,
            window: int) -> tuple[list[int], list[list[tuple[float, float]]]]:
    """The paired seeds and, per step, per seed, (first group's figure, second's)."""
    dirs_a, dirs_b = seed_dirs(first), seed_dirs(second)
    seeds = sorted(dirs_a.keys() & dirs_b.keys())
    if not seeds:
        raise UsageError(f"{first} and {second} have no seed in common")
    runs = [(load_run(dirs_a[seed]), load_run(dirs_b[seed])) for seed in seeds]
    for games, _ in (run for pair in runs for run in pair):
        if games and field not in games[0]:
            raise UsageError(f"the games have no field {field!r} (return, entropy, ...)")
    table = [[(window_mean(*a, step, field, window), window_mean(*b, step, field, window))
              for a, b in runs] for step in steps]
    return seeds, table


def format_table(seeds: list[int], steps: Sequence[int],
                 table: list[list[tuple[float, float]]], digits: int = 2) -> str:
    def cell(a: float, b: float) -> str:
        if math.isnan(a) or math.isnan(b):
            return f"{'-':>22}"
        return f"{a:7.{digits}f} {b:7.{digits}f} {b - a:+6.{digits}f}"

    header = [f"{'step':>9}"] + [f"{'seed ' + str(s) + ': A B B-A':>22}" for s in seeds]
    lines = ["  ".join(header + [f"{'mean: A B B-A':>22}  seeds"])]
    for step, row in zip(steps, table, strict=True):
        both = [(a, b) for a, b in row if not (math.isnan(a) or math.isnan(b))]
        mean = (float(np.mean([a for a, _ in both])), float(np.mean([b for _, b in both]))) \
            if both else (math.nan, math.nan)
        cells = [cell(a, b) for a, b in row] + [cell(*mean), f"{len(both):>5}"]
        lines.append("  ".join([f"{step:>9}"] + cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="compare_runs", description=__doc__.split("\n")[0])
    parser.add_argument("first", type=Path, help="group A: a directory of seed-<n>/ runs")
    parser.add_argument("second", type=Path, help="group B")
    parser.add_argument("--from", dest="start", type=positive_int, default=100_000)
    parser.add_argument("--to", dest="stop", type=positive_int, default=1_000_000)
    parser.add_argument("--every", type=positive_int, default=100_000)
    parser.add_argument("--field", default="return", help="per-game figure (return, entropy)")
    parser.add_argument("--window", type=positive_int, default=100, help="games per figure")
    try:
        args = parser.parse_args(argv)
        steps = list(range(args.start, args.stop + 1, args.every))
        if not steps:
            raise UsageError(f"--from {args.start} is past --to {args.stop}")
        seeds, table = compare(args.first, args.second, steps, args.field, args.window)
    except UsageError as exc:
        print(f"compare_runs: error: {exc}", file=sys.stderr)
        return 2
    print(f"A = {args.first}, B = {args.second}; {args.field}, mean of the last "
          f"{args.window} games by each step")
    # returns are read to 0.01 points; entropies (nats) and coefficients need a digit more
    print(format_table(seeds, steps, table, digits=2 if args.field == "return" else 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
