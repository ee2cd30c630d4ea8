"""The statistics of a comparison, as small pure numpy functions.

* :func:`paired_t` -- differences paired by seed: mean difference with a Student-t interval.
* :func:`cluster_weights` and :func:`paired_bootstrap` -- differences paired by test study: both
  arms are scored on the *same* resamples of the test studies (a patient's studies drawn
  together), so the variation that the two arms share cancels.
* :func:`holm` -- Holm's step-down adjustment of p-values for the number of comparisons made.
* :func:`t_power` and :func:`seeds_for_power` -- the power of the paired t test (noncentral t) and
  the number of paired units it needs for a given power.
* :func:`variance_components` -- how much of a metric's spread comes from the data draw, from the
  training and from the sampling of the test studies (method of moments, one-way random effects).

The metrics themselves are recomputed under weightings (a bootstrap resample is a weighting: how
often each study was drawn) by the plugin that declares them (``Metric.recompute``, corex.metrics).

No scipy at run time: the t distribution comes from the regularised incomplete beta function, the
noncentral t from integrating the normal distribution function over the chi distribution.
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
    while t_cdf(low, df) > p:  # heavy tails (df = 1, tiny p): widen the bracket until it holds the quantile
        low *= 2.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


def normal_cdf(x: np.ndarray | float) -> np.ndarray:
    """The standard normal distribution function, elementwise."""
    return 0.5 * _erfc(-np.asarray(x, dtype=float) / math.sqrt(2.0))


_erfc = np.frompyfunc(math.erfc, 1, 1)


def nct_cdf(t: float, df: float, nc: float, points: int = 4001) -> float:
    """P(T <= t) for the noncentral t with ``df`` degrees of freedom and noncentrality ``nc``.

    T = (Z + nc) / S with S = sqrt(V / df), V chi-squared with ``df`` degrees of freedom, so
    P(T <= t) = E[Phi(t S - nc)]: Simpson's rule over the density of S (a chi distribution scaled by
    1 / sqrt(df)) on its mean +- 15 sd (tested against scipy.stats.nct to 1e-8).
    """
    spread = 1.0 / math.sqrt(2.0 * df)
    low, high = max(0.0, 1.0 - 15.0 * spread), 1.0 + 15.0 * spread + (10.0 if df < 3 else 0.0)
    s = np.linspace(low, high, points)
    power_term = (df - 1.0) * np.log(np.maximum(s, 1e-300))  # s = 0: 0 for df = 1, a vanishing density above
    log_density = (math.log(2.0) + 0.5 * df * math.log(df) - 0.5 * df * math.log(2.0) - math.lgamma(0.5 * df)
                   + power_term - 0.5 * df * s * s)
    density = np.exp(log_density)
    weights = np.ones(points)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    h = (high - low) / (points - 1)
    values = normal_cdf(t * s - nc).astype(float)
    return float(min(1.0, max(0.0, h / 3.0 * np.sum(weights * density * values))))


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
    interval is the point and p is 0 unless the mean is 0 (then 1). A difference that is not a
    number (a metric a run could not compute) makes the whole test ``nan``: never p = 1, so
    :func:`holm` does not count it as a comparison made.
    """
    d = np.asarray(differences, dtype=float)
    n = d.size
    finite = bool(np.all(np.isfinite(d)))
    mean = float(d.mean()) if n and finite else math.nan
    sd = float(d.std(ddof=1)) if n > 1 and finite else math.nan
    out = {"mean": mean, "low": math.nan, "high": math.nan, "p": math.nan, "n": float(n), "sd": sd}
    if n < 2 or not finite:
        return out
    se = sd / math.sqrt(n)
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


Blocks = Sequence[tuple[object, object, np.ndarray, Sequence[object]]]


def _sides(side: object) -> list[np.ndarray]:
    """One run's probabilities ``(N, K)``, or a list of runs' on the same studies."""
    return [np.asarray(p) for p in side] if isinstance(side, (list, tuple)) else [np.asarray(side)]


def paired_bootstrap(
    pairs: Blocks,
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Difference ``metric(arm) - metric(baseline)`` with a paired percentile-bootstrap interval.

    ``pairs`` holds one ``(arm, baseline, labels, groups)`` per *block* of test studies (one data
    draw): ``arm`` and ``baseline`` are the probabilities ``(N, K)`` of one run each, or lists of
    several runs' (trainings on the same data draw), all on the same studies (rows aligned). Each
    resample draws every block's test studies anew (clusters of ``groups`` together) and scores every
    run of the block on the same draw; a block's difference is the mean of its arm runs minus the
    mean of its baseline runs, and the statistic is the mean over blocks. Returns the point estimate
    on the full data, the interval, a two-sided bootstrap p-value ``2 * min(P(d <= 0), P(d >= 0))``,
    and ``test_variance``: the bootstrap variance of one block's difference, averaged over blocks
    (the test-sampling variance of a data draw's difference, see :func:`variance_components`).

    Resamples on which the statistic is not a number (a class missing from the draw, say) are left
    out and counted (``dropped``); when none is left the interval and p are ``nan``, never p = 0.
    """
    rng = np.random.default_rng(seed)
    estimate, draws, variances = [], [], []
    for arm, baseline, labels, groups in pairs:
        labels = np.asarray(labels)
        ones = np.ones((1, len(labels)))
        mine, theirs = _sides(arm), _sides(baseline)
        estimate.append(float(np.mean([metric(p, labels, ones)[0] for p in mine]) - np.mean([metric(p, labels, ones)[0] for p in theirs])))
        w = cluster_weights(groups, resamples, rng)
        block = (np.mean([metric(p, labels, w) for p in mine], 0) - np.mean([metric(p, labels, w) for p in theirs], 0)).astype(float)
        draws.append(block)
        finite = block[np.isfinite(block)]
        variances.append(float(finite.var(ddof=1)) if finite.size > 1 else math.nan)
    result = {"mean": float(np.mean(estimate)) if estimate else math.nan, "low": math.nan, "high": math.nan, "p": math.nan,
              "n": float(len(pairs)), "resamples": float(resamples), "dropped": float(resamples),
              "test_variance": float(np.nanmean(variances)) if any(np.isfinite(variances)) else math.nan}
    if not draws:
        return result
    stacked = np.stack(draws)
    differences = np.full(resamples, math.nan)
    present = np.isfinite(stacked).any(0)
    if present.any():
        differences[present] = np.nanmean(stacked[:, present], 0)
    differences = differences[np.isfinite(differences)]
    result["dropped"] = float(resamples - differences.size)
    if differences.size == 0 or not math.isfinite(result["mean"]):
        return result
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    below, above = np.mean(differences <= 0), np.mean(differences >= 0)
    return result | {"low": float(low), "high": float(high), "p": float(min(1.0, 2.0 * min(below, above)))}


def bootstrap_variance(
    blocks: Sequence[tuple[Sequence[np.ndarray], np.ndarray, Sequence[object]]],
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> float:
    """The test-sampling variance of a data draw's mean score: per block ``(runs' probabilities,
    labels, groups)``, the bootstrap variance over resamples of the test studies of the mean over the
    block's runs (every run scored on the same draw), averaged over blocks; ``nan`` without any."""
    rng = np.random.default_rng(seed)
    variances = []
    for runs, labels, groups in blocks:
        w = cluster_weights(groups, resamples, rng)
        scores = np.mean([metric(np.asarray(p), np.asarray(labels), w) for p in runs], 0).astype(float)
        scores = scores[np.isfinite(scores)]
        if scores.size > 1:
            variances.append(float(scores.var(ddof=1)))
    return float(np.mean(variances)) if variances else math.nan


# -- power of the paired t test -------------------------------------------------------------------------


def t_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided one-sample (paired) t test at level ``alpha`` with ``n`` pairs when
    the true mean difference is ``effect`` and the differences' sd is ``sd``:
    ``P(|T| > t_{1-alpha/2, n-1})`` with T noncentral t, ``n - 1`` degrees of freedom, noncentrality
    ``effect / sd * sqrt(n)`` (Cohen 1988, ch. 2; statsmodels' TTestPower computes the same)."""
    if n < 2 or not all(math.isfinite(v) for v in (effect, sd)):
        return math.nan
    if sd == 0.0:
        return 1.0 if effect != 0.0 else alpha
    df, nc = n - 1.0, abs(effect) / sd * math.sqrt(n)
    critical = t_quantile(1.0 - alpha / 2.0, df)
    return 1.0 - nct_cdf(critical, df, nc) + nct_cdf(-critical, df, nc)


def seeds_for_power(effect: float, sd: float, alpha: float, power: float = 0.8, limit: int = 100_000) -> int | None:
    """The smallest number of pairs ``n >= 2`` at which :func:`t_power` reaches ``power``; ``None``
    when the difference is 0 (or not a number) or more than ``limit`` pairs would be needed."""
    if not all(math.isfinite(v) for v in (effect, sd)) or effect == 0.0:
        return None
    if t_power(effect, sd, 2, alpha) >= power:
        return 2
    low, high = 2, min(4, limit)
    while t_power(effect, sd, high, alpha) < power:  # power grows with n: double (up to limit), then bisect
        if high >= limit:
            return None
        low, high = high, min(high * 2, limit)
    while high - low > 1:
        middle = (low + high) // 2
        if t_power(effect, sd, middle, alpha) >= power:
            high = middle
        else:
            low = middle
    return high


# -- variance components -----------------------------------------------------------------------------


def variance_components(values: Sequence[float], data_seeds: Sequence[object], test_variance: float = math.nan) -> dict[str, float | None]:
    """Split the spread of ``values`` (one per run, each labelled with its data seed) into variance
    between data draws, between trainings, and from the sampling of the test studies.

    The model is ``value = mu + data + training + test``: each data draw (phantom, split, hence its
    test studies) adds ``data`` and, because its test studies are a sample, ``test``; each training
    on it adds ``training``. Method of moments for one-way random effects (Searle, Casella and
    McCulloch 1992, ch. 3), with ``test_variance`` (the test-sampling variance of a data draw's mean,
    from a bootstrap of its test studies) known:

    * ``training``: the pooled variance of runs around their data draw's mean (needs a data draw with
      two trainings); the trainings of one draw share its test studies, so test sampling is held fixed;
    * ``data``: the variance of the data draws' means, less ``training`` times the mean of 1 / (runs
      per draw), less ``test_variance`` (needs two data draws); with one training per draw the data and
      training components cannot be told apart and their sum is ``data_and_training``;
    * a negative estimate is set to 0 and flagged in ``truncated`` (the usual convention).

    Returns ``None`` for what the design cannot estimate. For a balanced design and
    ``test_variance = 0``, ``data`` and ``training`` are the REML estimates of a random-intercept
    model (statsmodels' MixedLM; tested).
    """
    x = np.asarray(values, dtype=float)
    keys = [str(k) for k in data_seeds]
    keep = np.isfinite(x)
    x, keys = x[keep], [k for k, kept in zip(keys, keep) if kept]
    groups: dict[str, list[float]] = {}
    for key, value in zip(keys, x):
        groups.setdefault(key, []).append(float(value))
    sizes = [len(g) for g in groups.values()]
    out: dict[str, float | None] = {"runs": float(x.size), "data_draws": float(len(groups)),
                                    "total": float(x.var(ddof=1)) if x.size > 1 else None,
                                    "test": float(test_variance) if math.isfinite(test_variance) else None,
                                    "training": None, "data": None, "data_and_training": None, "truncated": []}
    truncated: list[str] = []
    within_df = sum(n - 1 for n in sizes)
    if within_df > 0:
        out["training"] = sum(float(np.sum((np.asarray(g) - np.mean(g)) ** 2)) for g in groups.values()) / within_df
    if len(groups) >= 2:
        means = np.array([np.mean(g) for g in groups.values()])
        between = float(means.var(ddof=1))
        test = out["test"] or 0.0
        if out["training"] is not None:
            estimate = between - out["training"] * float(np.mean([1.0 / n for n in sizes])) - test
            key = "data"
        else:
            estimate = between - test
            key = "data_and_training"
        if estimate < 0:
            truncated.append(key)
        out[key] = max(0.0, estimate)
    out["truncated"] = truncated
    return out
