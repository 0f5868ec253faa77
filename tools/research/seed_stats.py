"""Statistics over seeds for sweeps and their curves (numpy only, no scipy).

- `last_games_mean`: mean return of the last N whole games, optionally before a step.
- `iqm`: the interquartile mean, the mean of the middle 50% of the values.
- `bootstrap_ci`: a seeded 95% percentile bootstrap interval of a statistic over seeds.

Used by tools/research/sweep.py (the table) and tools/research/plot_metrics.py (bands over seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Statistic = Callable[..., np.ndarray]  # statistic(values, axis=...) -> reduced array


def last_games_mean(games: list[dict[str, Any]], window: int = 100,
                    at_step: int | None = None) -> tuple[float, int]:
    """Mean return of the last `window` games that ended at or before `at_step` (all games
    when None) and how many games that was; NaN and 0 when there are none."""
    if at_step is not None:
        games = [g for g in games if g["step"] <= at_step]
    last = [float(g["return"]) for g in games[-window:]]
    return (float(np.mean(last)) if last else float("nan")), len(last)


def iqm_weights(count: int) -> np.ndarray:
    """Weight of each sorted value in the interquartile mean of `count` values.

    Each value holds 1/count of the probability mass; the IQM is the mean over the mass
    between the 25% and 75% quantiles, so a value straddling a quartile counts by the part
    of it inside. For counts divisible by 4 this is exactly rliable's IQM
    (`scipy.stats.trim_mean(x, 0.25)`); for 3 values it is (x1 + 4 x2 + x3) / 6 instead of
    the plain mean that whole-value trimming would give."""
    edges = np.arange(count + 1) / count
    inside = np.clip(np.minimum(edges[1:], 0.75) - np.maximum(edges[:-1], 0.25), 0.0, None)
    return inside / 0.5


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean along `axis` (see iqm_weights for small counts)."""
    ordered = np.sort(np.moveaxis(np.asarray(values, dtype=float), axis, -1), axis=-1)
    return ordered @ iqm_weights(ordered.shape[-1])


def bootstrap_ci(values: np.ndarray, statistic: Statistic = np.mean, resamples: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of `statistic` over the first axis (the seeds).

    `values` is (seeds,) or (seeds, points): every point is resampled with the same seed
    draws. Seeded, so the same figures give the same interval. With one seed the interval
    is that value; with few seeds it is narrower than the truth (it cannot see further
    than the spread of the seeds at hand)."""
    values = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    stats = statistic(values[draws], axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stats, [tail, 100 - tail], axis=0)
    return low, high
