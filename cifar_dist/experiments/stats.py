"""Small-sample statistics over scipy.stats for comparing runs: plain floats in and out, None where
undefined, and answers for what a handful of seeds produces (under two values, no variance)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np

EXACT_MAX_N = 8  # Mann-Whitney: up to this many values per group, the exact p over all splits
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # a fixed seed: compare.md is the same every time it is written


def _scipy_stats():
    """scipy.stats, imported on first use: it takes about a second, and every command imports this."""
    from scipy import stats

    return stats


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean of a non-empty sequence."""
    if not xs:
        raise ValueError("mean of an empty sequence")
    return float(np.mean(xs))


def std(xs: Sequence[float]) -> float:
    """The sample standard deviation (ddof=1); 0.0 for a single value."""
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else 0.0


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """(low, high) of the Student's t ``level`` interval of the mean; None for fewer than 2
    values; (mean, mean) for equal values, where scipy's t.interval gives NaN."""
    n = len(xs)
    if n < 2:
        return None
    m = mean(xs)
    half = float(_scipy_stats().t.ppf(0.5 + level / 2.0, n - 1)) * std(xs) / math.sqrt(n)
    return m - half, m + half


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Welch's t-test p-value, None for a group under 2 values; without variance in
    both groups its limit (1.0 for equal means, else 0.0), where scipy gives NaN."""
    if len(a) < 2 or len(b) < 2:
        return None
    if min(a) == max(a) and min(b) == max(b):
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():
        # a group of equal values has no variance, which scipy flags as a loss of precision
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        return float(_scipy_stats().ttest_ind(a, b, equal_var=False).pvalue)


def mannwhitney_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Mann-Whitney U p-value, None for a group under 2 values: exact over every split of
    the values up to EXACT_MAX_N per group (correct with ties, unlike scipy's 'exact': its default
    gives 0.16 for [1, 2, 2] vs [2, 4, 5], exactly 0.30), else normal with tie correction."""
    if len(a) < 2 or len(b) < 2:
        return None
    scipy_stats = _scipy_stats()
    exact = max(len(a), len(b)) <= EXACT_MAX_N
    method = scipy_stats.PermutationMethod(n_resamples=np.inf) if exact else "asymptotic"
    return float(scipy_stats.mannwhitneyu(a, b, alternative="two-sided", method=method).pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values in the order given; None entries are not counted."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(tested)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def bootstrap_diff_ci(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, str] | None:
    """(low, high, method) of the seeded bootstrap interval of mean(a) - mean(b): "BCa", or
    "percentile" where BCa is undefined (no variance); None for a group under 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    bootstrap = functools.partial(
        _scipy_stats().bootstrap, n_resamples=BOOTSTRAP_RESAMPLES, vectorized=True, confidence_level=level
    )
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's failure is a warning and NaN; the NaN is checked below
            ci = bootstrap((a, b), _mean_difference, method=method, rng=np.random.default_rng(seed)).confidence_interval
        if not (math.isnan(ci.low) or math.isnan(ci.high)):
            break
    return float(ci.low), float(ci.high), method
