"""Learning curves: return per whole game against agent steps, rolling mean over 100 games.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out curve.png [--window 100]

One line per run; the legend names each run by its directory (bench-default, bench-seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.metrics import read_jsonl  # noqa: E402


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=100)
    args = parser.parse_args(argv)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run_dir in args.run_dirs:
        path = run_dir / "metrics.jsonl"
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
