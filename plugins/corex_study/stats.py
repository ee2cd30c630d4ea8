"""The statistics of a comparison, as small pure numpy functions.

* :func:`paired_t` -- differences paired by seed: mean difference with a Student-t interval.
* :func:`cluster_weights` and :func:`paired_bootstrap` -- differences paired by test study: both
  arms are scored on the *same* resamples of the test studies (a patient's studies drawn
  together), so the variation that the two arms share cancels.
* :func:`holm` -- Holm's step-down adjustment of p-values for the number of comparisons made.

The metrics themselves are recomputed under weightings (a bootstrap resample is a weighting: how
often each study was drawn) by the plugin that declares them (``Metric.recompute``, corex.metrics).

No scipy at run time: the t distribution comes from the regularised incomplete beta function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


# -- the t distribution -----------------------------------------------------------------------


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    low, high = -1e3, 1e3
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


# -- differences paired by seed -----------------------------------------------------------------


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for fewer than two values)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


def paired_t(differences: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of paired differences with its Student-t interval and two-sided p-value (H0: mean 0).

    With a single pair there is no interval (``nan``); with identical differences (sd 0) the
    interval is the point and p is 0 unless the mean is 0 (then 1).
    """
    d = np.asarray(differences, dtype=float)
    n = d.size
    mean = float(d.mean()) if n else math.nan
    out = {"mean": mean, "low": math.nan, "high": math.nan, "p": math.nan, "n": float(n)}
    if n < 2:
        return out
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        return out | {"low": mean, "high": mean, "p": 1.0 if mean == 0.0 else 0.0}
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    p = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
    return out | {"low": mean - half, "high": mean + half, "p": min(1.0, p)}


# -- multiple comparisons ----------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (``nan`` stays ``nan`` and is not counted).

    Sorted ascending, the i-th smallest (from 0) of m p-values becomes ``(m - i) * p``, made
    non-decreasing along the order and capped at 1. Reject at level a where adjusted p < a.
    """
    values = list(p_values)
    present = [i for i, p in enumerate(values) if not math.isnan(p)]
    m = len(present)
    adjusted = [math.nan] * len(values)
    running = 0.0
    for rank, index in enumerate(sorted(present, key=lambda i: values[i])):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted


def cluster_weights(groups: Sequence[object], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, N)`` draw counts of a cluster bootstrap: clusters (patients) are drawn with
    replacement as many times as there are clusters, and every study of a drawn cluster counts."""
    _, cluster = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_clusters = int(cluster.max()) + 1 if len(cluster) else 0
    draws = rng.integers(0, n_clusters, size=(resamples, n_clusters))
    counts = np.zeros((resamples, n_clusters))
    np.add.at(counts, (np.repeat(np.arange(resamples), n_clusters), draws.ravel()), 1.0)
    return counts[:, cluster]


def paired_bootstrap(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, Sequence[object]]],
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Difference ``metric(arm) - metric(baseline)`` with a paired percentile-bootstrap interval.

    ``pairs`` holds one ``(arm probabilities, baseline probabilities, labels, groups)`` per seed,
    both arms scored on the same studies (rows aligned). Each resample draws every seed's test
    studies anew (clusters of ``groups`` together) and scores *both* arms on it; the statistic is
    the mean over seeds of the difference. Returns the point estimate on the full data, the
    interval, and a two-sided bootstrap p-value ``2 * min(P(d <= 0), P(d >= 0))``.
    """
    score = metric
    rng = np.random.default_rng(seed)
    estimate, draws = [], []
    for arm, baseline, labels, groups in pairs:
        ones = np.ones((1, len(labels)))
        estimate.append(float(score(arm, labels, ones)[0] - score(baseline, labels, ones)[0]))
        w = cluster_weights(groups, resamples, rng)
        draws.append(score(arm, labels, w) - score(baseline, labels, w))
    differences = np.nanmean(np.stack(draws), 0) if draws else np.array([math.nan])
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(differences, [tail, 1.0 - tail])
    below, above = np.mean(differences <= 0), np.mean(differences >= 0)
    p = min(1.0, 2.0 * min(below, above))
    return {"mean": float(np.mean(estimate)), "low": float(low), "high": float(high), "p": float(p),
            "n": float(len(pairs)), "resamples": float(resamples)}
