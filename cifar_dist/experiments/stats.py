"""Small-sample statistics for comparing training runs: a thin layer over scipy.stats.

Each function takes plain sequences of floats and returns plain floats (or None where the
statistic is undefined), so that compare.json holds numbers, not numpy scalars. What this
layer adds to scipy is the answer for the degenerate samples a handful of seeds produce:
fewer than two values, or a group without variance (see each function).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scipy.stats import PermutationMethod

EXACT_MAX_N = 8  # Mann-Whitney: up to this many values per group, the exact p over all splits
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # a fixed seed: compare.md is the same every time it is written


def _scipy_stats():
    """scipy.stats, imported on first use: the import takes about a second, and every cifar-dist
    command imports this module (compare's arguments are part of the command line)."""
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


def _constant(xs: Sequence[float]) -> bool:
    return min(xs) == max(xs)


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """(low, high) of the two-sided ``level`` confidence interval of the mean,
    mean -+ t_{(1+level)/2, n-1} * std / sqrt(n); None for fewer than 2 values.
    Equal values give the interval (mean, mean), where scipy's t.interval gives NaN."""
    n = len(xs)
    if n < 2:
        return None
    m = mean(xs)
    half = float(_scipy_stats().t.ppf(0.5 + level / 2.0, n - 1)) * std(xs) / math.sqrt(n)
    return m - half, m + half


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean
    (scipy.stats.ttest_ind, equal_var=False). None when either group has fewer than 2 values.
    With no variance in both groups the test is undefined (scipy gives NaN for equal means):
    1.0 if the means are equal, else 0.0, the limit as the variances go to 0."""
    if len(a) < 2 or len(b) < 2:
        return None
    if _constant(a) and _constant(b):
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():
        # a group of equal values has no variance, which scipy flags as a loss of precision
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        return float(_scipy_stats().ttest_ind(a, b, equal_var=False).pvalue)


def mannwhitney_method(a: Sequence[float], b: Sequence[float]) -> str | PermutationMethod:
    """How mannwhitney_p_value computes its p: exactly, over all C(n+m, n) ways to split the
    values into two groups of these sizes, when neither group has more than EXACT_MAX_N values
    (correct with ties, unlike scipy's method='exact', and where scipy's default falls back to
    the normal approximation: 0.16 for [1, 2, 2] versus [2, 4, 5], whose exact p is 0.30); the
    normal approximation with tie correction for larger groups."""
    if max(len(a), len(b)) <= EXACT_MAX_N:
        return _scipy_stats().PermutationMethod(n_resamples=np.inf)
    return "asymptotic"


def mannwhitney_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The two-sided p-value of the Mann-Whitney U test (scipy.stats.mannwhitneyu) that values
    of ``a`` are as likely above those of ``b`` as below. None when either group has fewer than
    2 values. Note the floor of small samples: at n = 3 per group no p is below 0.1."""
    if len(a) < 2 or len(b) < 2:
        return None
    return float(_scipy_stats().mannwhitneyu(a, b, alternative="two-sided", method=mannwhitney_method(a, b)).pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the order given. The i-th smallest of the m
    p-values (None entries are not tests and are not counted) is multiplied by m - i + 1,
    made no smaller than the adjusted value before it, and capped at 1. Rejecting where the
    adjusted p < alpha keeps the chance of any false rejection among the m below alpha."""
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
    """(low, high, method) of the bootstrap ``level`` interval of mean(a) - mean(b), each group
    resampled on its own (scipy.stats.bootstrap, BOOTSTRAP_RESAMPLES resamples, a generator
    seeded with ``seed``: the same numbers every time). The method is "BCa" (bias-corrected
    and accelerated), or "percentile" where BCa is undefined (scipy gives NaN: no variance, as
    with groups of equal values). None when either group has fewer than 2 values. With few
    values the interval cannot reach past what resampling them can produce: it is narrow."""
    if len(a) < 2 or len(b) < 2:
        return None
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            # BCa's failure is a warning and NaN; the NaN is checked below
            warnings.simplefilter("ignore")
            ci = (
                _scipy_stats()
                .bootstrap(
                    (a, b),
                    _mean_difference,
                    n_resamples=BOOTSTRAP_RESAMPLES,
                    vectorized=True,
                    confidence_level=level,
                    method=method,
                    rng=np.random.default_rng(seed),
                )
                .confidence_interval
            )
        if not (math.isnan(ci.low) or math.isnan(ci.high)):
            break
    return float(ci.low), float(ci.high), method
