"""Learning curves: return per whole game against agent steps, rolling mean over 100 games.

    python tools/research/plot_metrics.py RUN_DIR [RUN_DIR ...] --out curve.png [--window 100]
    python tools/research/plot_metrics.py --group runs/sweep/default --group NAME=DIR1,DIR2 \\
        --out c.png
    python tools/research/plot_metrics.py --panel Pong docs/runs/pong NAME=DIR \\
        --panel Breakout docs/runs/entropy-floor-to-zero --out games.png

One line per run; the legend names each run by its directory (bench-default, bench-seed).
`--group` draws one line per config instead: the mean over its seeds of their rolling
means, on a common grid of steps up to where its shortest run ends, with a band of the
95% percentile bootstrap interval of that mean over the seeds
(tools/research/seed_stats.py). A group is NAME=DIR1,DIR2,... or a directory of run dirs
(a config of tools/research/sweep.py). `--panel TITLE GROUP [GROUP ...]` draws its groups
in a panel of their own, one panel per stream, side by side (two to a row); `--until K`
ends the groups' curves at step K.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # not pyplot: no display, no global backend to set

from runtime.metrics import metrics_path, read_jsonl
from tools.research.seed_stats import bootstrap_ci

GRID_POINTS = 200


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def group_runs(spec: str) -> tuple[str, list[Path]]:
    """NAME=DIR1,DIR2,... or a directory whose subdirectories with a metrics.jsonl are the
    seeds -> (name, run dirs). A directory is read as one even when its name holds "=", as
    the sweep's names of overridden configs do."""
    parent = Path(spec)
    if parent.is_dir():
        return parent.name, sorted(d for d in parent.glob("*") if metrics_path(d).exists())
    name, _, dirs = spec.partition("=")
    return name, [Path(d) for d in dirs.split(",") if d]


def seed_curves(run_dirs: list[Path], window: int,
                until: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each run's rolling mean sampled on a common step grid: (grid, seeds x points). A
    point holds the rolling mean as of the last game that ended by it; the grid spans from
    where every run has a game to where the shortest run ends (or `until`, if sooner)."""
    runs = []
    for run_dir in run_dirs:
        games = read_jsonl(metrics_path(run_dir))
        steps = np.array([g["step"] for g in games])
        runs.append((steps, rolling_mean(np.array([g["return"] for g in games], float),
                                         window)))
    end = min(s[-1] for s, _ in runs)
    grid = np.linspace(max(s[0] for s, _ in runs), min(end, until or end), GRID_POINTS)
    return grid, np.stack([means[np.searchsorted(steps, grid, side="right") - 1]
                           for steps, means in runs])


def plot_group(ax: Axes, spec: str, window: int, until: int | None = None) -> None:
    name, run_dirs = group_runs(spec)
    missing = [str(d) for d in run_dirs if not metrics_path(d).exists()]
    if not run_dirs or missing:
        raise FileNotFoundError(f"--group {spec}: no metrics.jsonl in "
                                f"{', '.join(missing) or 'any run dir'}")
    run_dirs = [d for d in run_dirs if read_jsonl(metrics_path(d))]  # no game yet
    if not run_dirs:
        return
    grid, curves = seed_curves(run_dirs, window, until)
    mean = curves.mean(axis=0)
    low, high = bootstrap_ci(curves)
    line, = ax.plot(grid, mean, label=f"{name} ({len(run_dirs)} seeds, mean and 95% "
                                      f"bootstrap CI; at the end {mean[-1]:.2f})")
    ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def panels_figure(panels: list[list[str]], window: int, until: int | None) -> Figure:
    """One panel per --panel TITLE GROUP...: its groups' bands, titled, two panels a row."""
    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(6.5 * columns, 4.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, *specs) in zip(axes, panels, strict=False):
        for spec in specs:
            plot_group(ax, spec, window, until)
        ax.set_title(title)
        ax.set_xlabel("agent steps")
        ax.set_ylabel(f"return per game, rolling mean of {window}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="*", type=Path)
    parser.add_argument("--group", action="append", default=[], metavar="NAME=DIRS|DIR",
                        help="one line per config: mean over its seeds with a 95%% "
                             "bootstrap band")
    parser.add_argument("--panel", nargs="+", action="append", default=[],
                        metavar=("TITLE", "GROUP"), help="a panel of its own for these groups")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--until", type=int, metavar="K", help="groups: end the curves at "
                        "step K (a 1M figure out of longer runs)")
    args = parser.parse_args(argv)
    if args.panel and (args.run_dirs or args.group):
        parser.error("--panel draws panels of groups; give run dirs and --group without it")
    if any(len(panel) < 2 for panel in args.panel):
        parser.error("--panel needs a title and at least one group")
    if not args.run_dirs and not args.group and not args.panel:
        parser.error("give run dirs, --group or --panel")
    if args.panel:
        try:
            panels_figure(args.panel, args.window, args.until).savefig(args.out, dpi=110)
        except FileNotFoundError as exc:
            print(f"plot_metrics: error: {exc}", file=sys.stderr)
            return 2
        print(args.out)
        return 0
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for spec in args.group:
        try:
            plot_group(ax, spec, args.window, args.until)
        except FileNotFoundError as exc:
            print(f"plot_metrics: error: {exc}", file=sys.stderr)
            return 2
    for run_dir in args.run_dirs:
        path = metrics_path(run_dir)
        if not path.exists():
            print(f"plot_metrics: error: {path} does not exist", file=sys.stderr)
            return 2
        games = read_jsonl(path)
        if not games:
            continue
        steps = np.array([g["step"] for g in games])
        returns = np.array([g["return"] for g in games], dtype=float)
        label = run_dir.name.removeprefix("bench-")
        ax.plot(steps, rolling_mean(returns, args.window),
                label=f"{label} (last {min(len(returns), args.window)}: "
                      f"{returns[-args.window:].mean():.2f})")
    ax.set_xlabel("agent steps")
    ax.set_ylabel(f"return per game, rolling mean of {args.window}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
