"""corex_study.stats against independent references, at the edges the mutation job found untested
(issue 23): the special functions against scipy, power and the seeds it needs against their
definition, Holm against statsmodels, and the two bootstraps and the variance components against
re-computations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from corex_study import stats
from scipy import special
from scipy import stats as scipy_stats

# -- special functions ------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.5), (1.0, 3.0), (2.5, 0.5), (15.0, 0.5), (40.0, 7.0)])
def test_the_regularised_incomplete_beta_matches_scipy_on_both_sides_of_its_switch(a, b):
    switch = (a + 1.0) / (a + b + 2.0)
    for x in (1e-9, 0.01, 0.3, switch - 1e-9, switch, switch + 1e-9, 0.7, 0.99, 1 - 1e-9):
        assert stats.regularized_beta(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10, abs=1e-14)
    assert stats.regularized_beta(a, b, 0.0) == 0.0 and stats.regularized_beta(a, b, -0.5) == 0.0
    assert stats.regularized_beta(a, b, 1.0) == 1.0 and stats.regularized_beta(a, b, 1.5) == 1.0


@pytest.mark.parametrize("df", [1, 2, 4, 29, 1000])
def test_t_quantiles_match_scipy_in_the_tails(df):
    for p in (1e-6, 0.001, 0.025, 0.975, 0.999, 1 - 1e-6):  # df = 1, p = 1e-6: -318,310, far beyond a fixed bracket
        assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)
    # At the median the distribution function is flat to double precision near 0 (within 1e-6 for df = 1000).
    assert stats.t_quantile(0.5, df) == pytest.approx(0.0, abs=1e-6)
    for p in (0.0, 1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="must lie in"):
            stats.t_quantile(p, df)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 60])
def test_the_noncentral_t_matches_scipy_for_few_and_many_degrees_of_freedom(df):
    for nc in (0.0, 0.8, 3.0, 9.0):
        for t in (-4.0, -0.5, 0.0, 1.0, 2.5, 6.0, 15.0):
            reference = scipy_stats.nct.cdf(t, df, nc)
            if math.isnan(reference):  # scipy gives up far in the lower tail, where the probability is below 1e-20
                assert stats.nct_cdf(t, df, nc) < 1e-12
                continue
            assert stats.nct_cdf(t, df, nc) == pytest.approx(reference, abs=2e-7), (t, df, nc)


# -- power and the seeds it needs -------------------------------------------------------------------


def test_power_at_its_edges():
    assert math.isnan(stats.t_power(0.1, 0.05, 1, 0.05)) and math.isnan(stats.t_power(0.1, 0.05, 0, 0.05))
    assert math.isnan(stats.t_power(math.nan, 0.05, 5, 0.05)) and math.isnan(stats.t_power(0.1, math.inf, 5, 0.05))
    assert stats.t_power(0.1, 0.0, 5, 0.05) == 1.0 and stats.t_power(0.0, 0.0, 5, 0.05) == 0.05
    from statsmodels.stats.power import TTestPower

    for n in (2, 3, 7):  # the smallest designs, where the t distribution matters most
        expected = TTestPower().power(effect_size=0.09 / 0.05, nobs=n, alpha=0.01, alternative="two-sided")
        assert stats.t_power(0.09, 0.05, n, 0.01) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("effect", "sd", "alpha"), [(1.0, 0.1, 0.05), (0.3, 0.1, 0.05), (0.2, 0.1, 0.05), (0.08, 0.093, 0.005),
                                                     (0.02, 0.045, 0.005), (-0.05, 0.04, 0.01)])
def test_the_seeds_for_power_are_the_smallest_number_that_reaches_it(effect, sd, alpha):
    n = stats.seeds_for_power(effect, sd, alpha)
    assert isinstance(n, int) and n >= 2 and stats.t_power(effect, sd, n, alpha) >= 0.8
    assert n == 2 or stats.t_power(effect, sd, n - 1, alpha) < 0.8
    assert stats.seeds_for_power(effect, sd, alpha, power=0.5) <= n


def test_the_seeds_for_power_within_a_limit_and_beyond_it():
    needed = stats.seeds_for_power(0.08, 0.093, 0.005)
    assert needed == 22  # the first study's example (docs/study.md)
    assert stats.seeds_for_power(0.08, 0.093, 0.005, limit=needed) == needed  # a limit that is not a power of two
    assert stats.seeds_for_power(0.08, 0.093, 0.005, limit=needed - 1) is None
    assert stats.seeds_for_power(0.0, 0.1, 0.05) is None and stats.seeds_for_power(math.nan, 0.1, 0.05) is None
    assert stats.seeds_for_power(1.0, 0.0, 0.05) == 2  # no spread: two pairs reject any nonzero difference


# -- Holm, means and the paired t -------------------------------------------------------------------------


def test_holm_caps_at_one_and_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    for values in ([0.4, 0.6, 0.9], [0.01, 0.02, 0.03, 0.5], [0.3, 0.001, 0.3, 0.2]):
        expected = multipletests(values, method="holm")[1]
        assert stats.holm(values) == pytest.approx(list(expected), abs=1e-15)
        assert max(stats.holm(values)) <= 1.0


def test_mean_sd_and_the_paired_t_with_too_few_values():
    assert all(math.isnan(v) for v in stats.mean_sd([]))
    mean, sd = stats.mean_sd([3.0])
    assert mean == 3.0 and math.isnan(sd)
    assert stats.mean_sd([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    one = stats.paired_t([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["sd"]) and math.isnan(one["p"]) and math.isnan(one["low"])
    broken = stats.paired_t([math.nan, 0.5])
    assert math.isnan(broken["mean"]) and math.isnan(broken["sd"]) and math.isnan(broken["p"])
    assert math.isnan(stats.paired_t([])["mean"])


# -- the bootstraps ---------------------------------------------------------------------------------------


def accuracy(probabilities: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted accuracy per weighting (rows of ``weights``); nan for an empty weighting."""
    right = (probabilities.argmax(1) == labels).astype(float)
    with np.errstate(invalid="ignore"):
        return weights @ right / weights.sum(1)


def test_every_cluster_can_be_drawn_and_each_is_drawn_once_per_resample_on_average():
    groups = ["p0", "p0", "p1", "p2", "p2", "p2"]
    weights = stats.cluster_weights(groups, 4000, np.random.default_rng(0))
    per_cluster = weights[:, [0, 2, 3]]
    assert (per_cluster > 0).mean(0) == pytest.approx([1 - (2 / 3) ** 3] * 3, abs=0.03)  # P(a cluster is drawn)
    assert per_cluster.mean(0) == pytest.approx([1.0] * 3, abs=0.05)
    assert (per_cluster.sum(1) == 3).all()


def block(seed: int, n: int, right_arm: float, right_baseline: float):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    groups = [f"p{i // 2}" for i in range(n)]  # two studies per patient

    def run(right: float) -> np.ndarray:
        p = rng.random((n, 3))
        correct = rng.random(n) < right
        p[correct, labels[correct]] += 2.0
        return p

    return run(right_arm), run(right_baseline), labels, groups


def test_the_paired_bootstrap_matches_a_recomputation_of_its_draws():
    pairs = [block(1, 60, 0.8, 0.6), block(2, 40, 0.7, 0.7)]
    level = 0.9
    result = stats.paired_bootstrap(pairs, accuracy, resamples=500, seed=3, level=level)
    rng = np.random.default_rng(3)
    per_block, variances = [], []
    for arm, baseline, labels, groups in pairs:
        w = stats.cluster_weights(groups, 500, rng)
        d = accuracy(arm, labels, w) - accuracy(baseline, labels, w)
        per_block.append(d)
        variances.append(np.var(d, ddof=1))
    differences = np.mean(per_block, 0)
    point = np.mean([accuracy(a, y, np.ones((1, len(y))))[0] - accuracy(b, y, np.ones((1, len(y))))[0] for a, b, y, _ in pairs])
    assert result["mean"] == pytest.approx(point)
    assert (result["low"], result["high"]) == pytest.approx(tuple(np.quantile(differences, [0.05, 0.95])))
    assert result["p"] == pytest.approx(min(1.0, 2 * min(np.mean(differences <= 0), np.mean(differences >= 0))))
    assert result["test_variance"] == pytest.approx(np.mean(variances)) and result["dropped"] == 0.0
    assert result["n"] == 2.0 and result["resamples"] == 500.0


def test_the_paired_bootstrap_counts_the_resamples_it_drops():
    arm, baseline, labels, groups = block(4, 6, 0.8, 0.5)

    def undefined_without_patient_zero(probabilities, labels, weights):
        values = accuracy(probabilities, labels, weights)
        return np.where(weights[:, 0] > 0, values, np.nan)  # not a number when patient p0 was not drawn

    result = stats.paired_bootstrap([(arm, baseline, labels, groups)], undefined_without_patient_zero, resamples=300, seed=0)
    weights = stats.cluster_weights(groups, 300, np.random.default_rng(0))
    assert result["dropped"] == float((weights[:, 0] == 0).sum()) and 0 < result["dropped"] < 300
    assert math.isfinite(result["low"]) and math.isfinite(result["p"])


def test_the_bootstrap_variance_of_a_data_draw_matches_a_recomputation():
    blocks = [([block(5, 50, 0.7, 0.0)[0], block(6, 50, 0.6, 0.0)[0]], block(5, 50, 0.7, 0.0)[2], block(5, 50, 0.7, 0.0)[3]),
              ([block(7, 30, 0.8, 0.0)[0]], block(7, 30, 0.8, 0.0)[2], block(7, 30, 0.8, 0.0)[3])]
    result = stats.bootstrap_variance(blocks, accuracy, resamples=400, seed=2)
    rng = np.random.default_rng(2)
    expected = []
    for runs, labels, groups in blocks:
        w = stats.cluster_weights(groups, 400, rng)
        expected.append(np.var(np.mean([accuracy(p, labels, w) for p in runs], 0), ddof=1))
    assert result == pytest.approx(np.mean(expected)) and result > 0
    assert math.isnan(stats.bootstrap_variance([], accuracy))


# -- variance components ------------------------------------------------------------------------------


def test_variance_components_of_a_known_design_with_test_sampling():
    # Three data draws with two trainings each: means 1, 2, 4; within-draw deviations +-0.5, +-0.25, +-0.
    values = [0.5, 1.5, 1.75, 2.25, 4.0, 4.0]
    seeds = [0, 0, 1, 1, 2, 2]
    out = stats.variance_components(values, seeds, test_variance=0.1)
    training = (0.5 + 0.125 + 0.0) / 3  # pooled: sums of squares over 3 degrees of freedom
    between = np.var([1.0, 2.0, 4.0], ddof=1)
    assert out["training"] == pytest.approx(training) and out["test"] == 0.1
    assert out["data"] == pytest.approx(between - training / 2 - 0.1) and out["truncated"] == []
    assert out["total"] == pytest.approx(np.var(values, ddof=1)) and out["runs"] == 6.0 and out["data_draws"] == 3.0


def test_variance_components_at_their_edges():
    # One training per draw: data and training together; an estimate of exactly 0 is not truncated.
    out = stats.variance_components([0.0, 1.0], ["a", "b"], test_variance=0.5)
    assert out["training"] is None and out["data_and_training"] == 0.0 and out["truncated"] == []
    below = stats.variance_components([0.0, 1.0], ["a", "b"], test_variance=0.6)
    assert below["data_and_training"] == 0.0 and below["truncated"] == ["data_and_training"]
    # One draw with two trainings (one degree of freedom) gives the training component, not the data one.
    single = stats.variance_components([1.0, 2.0], ["a", "a"])
    assert single["training"] == pytest.approx(0.5) and single["data"] is None and single["total"] == pytest.approx(0.5)
    alone = stats.variance_components([1.0], ["a"])
    assert alone["total"] is None and alone["training"] is None and alone["test"] is None


# -- edges the second mutation run found open -----------------------------------------------------------


def test_too_few_values_give_nan_quietly_and_an_infinite_difference_makes_the_test_nan():
    """nan for fewer than two values without numpy's degrees-of-freedom warning; an infinite
    difference is not a number either (a mean of inf is no result)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(stats.mean_sd([0.3])[1])
        one = stats.paired_t([0.3])
        assert one["mean"] == 0.3 and math.isnan(one["sd"])
        single = stats.paired_bootstrap([block(8, 20, 0.8, 0.5)], accuracy, resamples=1, seed=0)
        assert math.isnan(single["test_variance"])
    infinite = stats.paired_t([0.1, math.inf, 0.2])
    assert all(math.isnan(infinite[key]) for key in ("mean", "sd", "low", "high", "p"))


def test_a_worse_arm_has_a_small_p_value_and_an_interval_below_zero():
    """p = 2 min(P(d <= 0), P(d >= 0)): small whichever side the difference lies on."""
    pairs = [block(9, 200, 0.3, 0.9)]
    worse = stats.paired_bootstrap(pairs, accuracy, resamples=400, seed=1)
    assert worse["high"] < 0 and worse["p"] < 0.01
    better = stats.paired_bootstrap([(b, a, y, g) for a, b, y, g in pairs], accuracy, resamples=400, seed=1)
    assert better["low"] > 0 and better["p"] == worse["p"]


def test_two_resamples_are_enough_for_a_variance_and_one_for_an_interval():
    pairs = [block(10, 30, 0.8, 0.5)]
    two = stats.paired_bootstrap(pairs, accuracy, resamples=2, seed=0)
    w = stats.cluster_weights(pairs[0][3], 2, np.random.default_rng(0))
    d = accuracy(pairs[0][0], pairs[0][2], w) - accuracy(pairs[0][1], pairs[0][2], w)
    assert two["test_variance"] == pytest.approx(np.var(d, ddof=1))
    runs = [([pairs[0][0]], pairs[0][2], pairs[0][3])]
    assert stats.bootstrap_variance(runs, accuracy, resamples=2, seed=0) == pytest.approx(
        np.var(accuracy(pairs[0][0], pairs[0][2], w), ddof=1))
    one = stats.paired_bootstrap(pairs, accuracy, resamples=1, seed=0)
    d1 = accuracy(pairs[0][0], pairs[0][2], stats.cluster_weights(pairs[0][3], 1, np.random.default_rng(0)))[0] - accuracy(
        pairs[0][1], pairs[0][2], stats.cluster_weights(pairs[0][3], 1, np.random.default_rng(0)))[0]
    assert one["low"] == one["high"] == pytest.approx(d1) and one["dropped"] == 0.0


def test_a_block_with_a_single_defined_resample_is_left_out_of_the_variance():
    def defined_once(probabilities, labels, weights):
        values = accuracy(probabilities, labels, weights)
        values[1:] = np.nan  # only the first resample is a number
        return values

    good = ([block(11, 30, 0.7, 0.0)[0]], block(11, 30, 0.7, 0.0)[2], block(11, 30, 0.7, 0.0)[3])

    def mixed(probabilities, labels, weights):
        return defined_once(probabilities, labels, weights) if len(labels) == 12 else accuracy(probabilities, labels, weights)

    poor = ([block(12, 12, 0.7, 0.0)[0]], block(12, 12, 0.7, 0.0)[2], block(12, 12, 0.7, 0.0)[3])
    rng = np.random.default_rng(0)
    stats.cluster_weights(poor[2], 50, rng)  # the poor block's draws come first
    w = stats.cluster_weights(good[2], 50, rng)
    expected = np.var(accuracy(good[0][0], good[1], w), ddof=1)
    assert stats.bootstrap_variance([poor, good], mixed, resamples=50, seed=0) == pytest.approx(expected)


def test_no_interval_when_the_full_data_difference_is_not_a_number():
    def undefined_on_the_full_data(probabilities, labels, weights):
        values = accuracy(probabilities, labels, weights)
        return np.where((weights == 1).all(1), np.nan, values)  # the all-ones weighting is the full data

    result = stats.paired_bootstrap([block(13, 30, 0.8, 0.5)], undefined_on_the_full_data, resamples=100, seed=0)
    assert math.isnan(result["mean"]) and math.isnan(result["low"]) and math.isnan(result["p"])
