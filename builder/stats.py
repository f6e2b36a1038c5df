"""Intervals for metrics averaged over questions: a percentile bootstrap of one system's mean, and the paired
bootstrap of the difference between two systems scored on the same questions (what the gates decide on).

Resampling is over questions, with a fixed seed, so a bundle's reported interval is reproducible.

    python -c "from builder.stats import paired_bootstrap; print(paired_bootstrap([1, 1, 0, 1], [0, 1, 0, 0]))"
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[idx].mean(axis=1)


def bootstrap_ci(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = 0) -> list[float]:
    """[low, high] of the mean of ``values`` at ``level`` (percentile bootstrap); [nan, nan] with no values."""
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return [float("nan"), float("nan")]
    means = _resampled_means(v, resamples, seed)
    tail = (1 - level) / 2 * 100
    return [round(float(np.percentile(means, tail)), 4), round(float(np.percentile(means, 100 - tail)), 4)]


def paired_bootstrap(a: Sequence[float], b: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                     seed: int = 0) -> dict:
    """The mean of a - b over paired questions, its interval, and the share of resamples in which a is ahead."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: {len(a)} against {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not len(d):
        return {"diff": float("nan"), "ci": [float("nan"), float("nan")], "p_ahead": float("nan"), "n": 0}
    means = _resampled_means(d, resamples, seed)
    return {"diff": round(float(d.mean()), 4), "ci": bootstrap_ci(d, level, resamples, seed),
            "p_ahead": round(float((means > 0).mean()), 4), "n": len(d)}
