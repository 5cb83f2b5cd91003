"""Small-sample statistics for comparing training runs, in pure Python.

Sample mean and standard deviation, Student's t distribution (CDF through the
regularized incomplete beta function, evaluated as a continued fraction, and its
quantile by bisection), confidence intervals of a mean and Welch's t-test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_EPS = 1e-15
_TINY = 1e-300


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean of a non-empty sequence."""
    if not xs:
        raise ValueError("mean of an empty sequence")
    return math.fsum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
    """The sample standard deviation (ddof=1); 0.0 for a single value."""
    n = len(xs)
    if n < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction 1 + d1/(1 + d2/(1 + ...)) of I_x(a, b), by Lentz's method."""
    f, c, d = 1.0, 1.0, 0.0
    for j in range(1, 1000):
        m = j // 2
        if j % 2:  # d_{2m+1}
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + coef / c
        c = c if abs(c) > _TINY else _TINY
        f *= c * d
        if abs(c * d - 1.0) < _EPS:
            break
    return f


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / (a * _beta_fraction(a, b, x))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if t == 0:
        return 0.5
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t > 0 else tail


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (computed directly, no 1 - x loss)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) == p, for 0 < p < 1, found by bisection."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """(low, high) of the two-sided ``level`` confidence interval of the mean,
    mean -+ t_{(1+level)/2, n-1} * std / sqrt(n); None for fewer than 2 values."""
    n = len(xs)
    if n < 2:
        return None
    m = mean(xs)
    half = t_quantile(0.5 + level / 2.0, n - 1) * std(xs) / math.sqrt(n)
    return m - half, m + half


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean
    (unequal variances, Welch-Satterthwaite degrees of freedom). None when either group
    has fewer than 2 values; with no variance in both groups 1.0 if the means are equal, else 0.0."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    diff = mean(a) - mean(b)
    if va + vb == 0.0:
        return 1.0 if diff == 0.0 else 0.0
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return min(1.0, t_two_sided_p(t, df))
