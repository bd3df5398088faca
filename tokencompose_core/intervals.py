"""Paired bootstrap intervals: is a difference between two runs larger than its noise?

Two runs sampled with the same prompts and seeds are paired: each prompt (or
held-out image, for attention mIoU) has a value in both, and the difference of
the runs' means is the mean of the per-unit differences. Resampling units with
replacement gives that mean's sampling distribution; its 2.5/97.5 percentiles
are the 95% interval (percentile bootstrap). One index matrix of shape
(resamples, units) resamples every metric at once, so 10,000 resamples cost
milliseconds.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

# Per-unit values a scores folder keeps (per_unit.parquet): one row per unit x metric.
PER_UNIT_COLUMNS = ["unit", "metric", "value"]


def bootstrap_mean_differences(differences: np.ndarray, resamples: int, seed: int,
                               level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile intervals of the mean of each column of ``differences``
    (units x metrics), resampling rows with replacement; NaN cells (a metric a unit
    lacks) are left out of that metric's means."""
    units = differences.shape[0]
    if units == 0:
        raise ValueError("no paired units: the runs share no prompt or image")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, units, size=(resamples, units))
    with warnings.catch_warnings():
        # A resample may draw only units a metric lacks: that mean is NaN and left out below.
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(differences[index], axis=1)  # (resamples, metrics)
    tail = (1.0 - level) / 2 * 100
    return np.nanpercentile(means, tail, axis=0), np.nanpercentile(means, 100 - tail, axis=0)


def paired_intervals(baseline: pd.DataFrame, treated: pd.DataFrame, resamples: int, seed: int,
                     level: float = 0.95) -> list[dict[str, Any]]:
    """Treated minus baseline for every metric both per-unit tables hold, on the units
    both hold: {"metric", "difference", "low", "high", "units"} (difference = mean of
    the paired differences, in the metric's own unit)."""
    joined = baseline.merge(treated, on=["unit", "metric"], suffixes=("_baseline", "_treated"))
    if joined.empty:
        return []
    joined["difference"] = joined["value_treated"] - joined["value_baseline"]
    table = joined.pivot(index="unit", columns="metric", values="difference")
    values = table.to_numpy(dtype=float)
    low, high = bootstrap_mean_differences(values, resamples, seed, level)
    return [{"metric": metric, "difference": float(np.nanmean(values[:, i])), "low": float(low[i]),
             "high": float(high[i]), "units": int(np.isfinite(values[:, i]).sum())}
            for i, metric in enumerate(table.columns)]
