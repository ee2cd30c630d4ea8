"""corex compare: the paired statistics on cases with a known answer, and the command end to end."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from corex_study import stats
from scipy import stats as scipy_stats
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

# -- the t distribution and the paired t interval ---------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_t_distribution_matches_scipy(df):
    for t in (-3.2, -1.0, 0.0, 0.4, 2.5):
        assert stats.t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-9)
    for p in (0.025, 0.5, 0.975):
        assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), abs=1e-7)


def test_paired_t_agrees_with_scipy_and_a_constant_difference_is_exact():
    d = [0.03, -0.01, 0.05, 0.02, 0.04]
    result = stats.paired_t(d)
    reference = scipy_stats.ttest_1samp(d, 0.0)
    low, high = reference.confidence_interval(0.95)
    assert result["mean"] == pytest.approx(np.mean(d))
    assert (result["low"], result["high"]) == pytest.approx((low, high))
    assert result["p"] == pytest.approx(reference.pvalue)
    # Arms that differ by a constant: the interval is that constant.
    constant = stats.paired_t([0.05] * 5)
    assert constant["low"] == pytest.approx(0.05) and constant["high"] == pytest.approx(0.05) and constant["p"] == 0.0
    same = stats.paired_t([0.0] * 3)
    assert same["low"] == 0.0 == same["high"] and same["p"] == 1.0
    assert math.isnan(stats.paired_t([0.1])["low"])  # one seed: no interval


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = stats.holm([0.01, math.nan, 0.02])  # nan is not a comparison
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


# -- metrics recomputed from predictions against scikit-learn ---------------------------------------


def random_predictions(n=60, k=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probabilities[:5] = np.round(probabilities[:5], 1)  # some ties
    return probabilities, labels


def recompute(name: str):
    """How the plugin that declares ``name`` recomputes it from predictions (corex.metrics)."""
    from corex.metrics import catalog

    return catalog().get(name).recompute


PREDICTION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "study_map")


def test_weighted_metrics_equal_scikit_learn_with_sample_weights():
    """The recompute functions the classification evaluator declares (corex.metrics), which compare's
    paired bootstrap uses, against scikit-learn with sample weights."""
    from corex.metrics import catalog as declared

    catalog = declared()
    probabilities, labels = random_predictions()
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 3, size=(3, len(labels))).astype(float)
    predicted = probabilities.argmax(1)
    for row in np.vstack([np.ones(len(labels)), counts]):
        keep = row > 0
        got = {name: catalog.get(name).recompute(probabilities, labels, row[None])[0] for name in PREDICTION_METRICS}
        y, p, w = labels[keep], probabilities[keep], row[keep]
        assert got["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1), sample_weight=w))
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1), sample_weight=w))
        assert got["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro", sample_weight=w))
        onehot = np.eye(4)[y]
        auroc = [roc_auc_score(onehot[:, c], p[:, c], sample_weight=w) for c in range(4)]
        ap = [average_precision_score(onehot[:, c], p[:, c], sample_weight=w) for c in range(4)]
        assert got["auroc"] == pytest.approx(np.mean(auroc))
        # study_map is the evaluator's (VOC 2010, enveloped): never below scikit-learn's mean AP
        import torch

        from corex_eval import study_map

        expected = float(study_map(torch.as_tensor(p), torch.as_tensor(y), torch.as_tensor(w)[None])[0])
        assert got["study_map"] == pytest.approx(expected)
        assert got["study_map"] >= np.mean(ap) - 1e-12
    assert predicted.shape == labels.shape
    assert catalog.get("dice").recompute is None  # a segmentation metric: not from class probabilities


def test_cluster_weights_draw_a_patients_studies_together():
    groups = ["a", "a", "b", "c", "c", "c"]
    w = stats.cluster_weights(groups, 200, np.random.default_rng(0))
    assert w.shape == (200, 6)
    assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 3] == w[:, 5])
    # three clusters drawn three times: the counts per cluster sum to 3
    assert np.all(w[:, 0] + w[:, 2] + w[:, 3] == 3)


# -- the paired bootstrap on cases with a known answer -----------------------------------------------


def onehot_predictions(predicted, k=4):
    return np.eye(k)[predicted] * 0.7 + 0.075  # rows sum to 1, argmax = predicted


def test_identical_arms_give_an_interval_containing_zero_and_p_one():
    probabilities, labels = random_predictions()
    groups = [str(i) for i in range(len(labels))]
    result = stats.paired_bootstrap([(probabilities, probabilities, labels, groups)], recompute("macro_f1"), resamples=300)
    assert result["mean"] == 0.0 and result["low"] == 0.0 == result["high"] and result["p"] == 1.0


def test_accuracy_difference_matches_the_binomial_answer():
    # Arm right on every study, baseline right on exactly half: the accuracy difference is the
    # share of the baseline's misses in a resample, so mean 0.5 and sd sqrt(0.25 / n).
    n = 400
    labels = np.arange(n) % 4
    wrong = (labels + 1) % 4
    baseline_pred = np.where(np.arange(n) % 2 == 0, labels, wrong)
    pair = (onehot_predictions(labels), onehot_predictions(baseline_pred), labels, list(range(n)))
    result = stats.paired_bootstrap([pair], recompute("accuracy"), resamples=4000, seed=3)
    half_width = 1.96 * math.sqrt(0.25 / n)
    assert result["mean"] == pytest.approx(0.5)
    assert result["low"] == pytest.approx(0.5 - half_width, abs=0.01)
    assert result["high"] == pytest.approx(0.5 + half_width, abs=0.01)
    assert result["p"] < 0.001


def test_arms_differing_by_a_constant_in_every_resample():
    # A constant shift of the metric: arm perfect, baseline always wrong -> accuracy difference 1.
    n = 50
    labels = np.arange(n) % 4
    pair = (onehot_predictions(labels), onehot_predictions((labels + 1) % 4), labels, list(range(n)))
    two_seeds = stats.paired_bootstrap([pair, pair], recompute("accuracy"), resamples=200)
    assert two_seeds["low"] == 1.0 == two_seeds["high"] and two_seeds["mean"] == 1.0 and two_seeds["n"] == 2


# -- the command on fabricated runs (no training: the statistics are what is under test) ------------

CLASSES = ["negative", "typical", "indeterminate", "atypical"]


def fabricate_run(path: Path, recipe: str, seed: int, predicted: np.ndarray, labels: np.ndarray, ids: list[str],
                  fraction: float = 1.0, interval: tuple[float, float] = (0.5, 0.9)) -> float:
    """A finished run directory as the engine and the classification evaluator leave it; returns its macro-F1."""
    (path / "test").mkdir(parents=True)
    probabilities = onehot_predictions(predicted)
    macro_f1 = f1_score(labels, predicted, average="macro")
    (path / "recipe.yaml").write_text(yaml.safe_dump({"name": recipe, "seed": seed, "data": {"label_fraction": fraction}}))
    stages = {"train": {"kind": "train", "metrics": {"macro_f1": 0.5}, "time_s": 1.0},
              "test": {"kind": "evaluate", "split": "test", "metrics": {"macro_f1": macro_f1, "accuracy": accuracy_score(labels, predicted)},
                       "intervals": {"macro_f1": list(interval)}, "time_s": 1.0}}
    (path / "results.json").write_text(json.dumps({"recipe": recipe, "stages": stages}))
    with (path / "test" / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "label", "predicted", *(f"p_{c}" for c in CLASSES)])
        for study, y, p, row in zip(ids, labels, predicted, probabilities):
            writer.writerow([study, CLASSES[y], CLASSES[p], *row])
    return macro_f1


def fabricate_study(root: Path, seeds=(0, 1, 2), n=120):
    """Baseline right on 60% of studies, the better arm on 80%, per seed; returns both arms' macro-F1s."""
    f1 = {"base": [], "better": []}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, n)
        ids = [f"study{seed}-{i}" for i in range(n)]
        for recipe, right in (("base", 0.6), ("better", 0.8)):
            predicted = np.where(rng.random(n) < right, labels, (labels + rng.integers(1, 4, n)) % 4)
            f1[recipe].append(fabricate_run(root / recipe / f"seed-{seed}", recipe, seed, predicted, labels, ids))
    return f1


def test_compare_writes_tables_and_plot_with_paired_differences(corex_cli, tmp_path):
    f1 = fabricate_study(tmp_path / "study")
    evaluation = tmp_path / "study" / "base" / "seed-0" / "model-evaluations" / "test-1"  # a re-evaluation, not a run
    evaluation.mkdir(parents=True)
    (evaluation / "results.json").write_text((tmp_path / "study" / "base" / "seed-0" / "results.json").read_text())
    code, stdout, err = corex_cli("compare", tmp_path / "study", "--baseline", "base", "--resamples", "500")
    assert code == 0, err
    assert "| better | 1 | 3 |" in stdout and "Paired differences in test macro_f1 against base" in stdout
    for name in ("compare.md", "compare.csv", "compare.png", "compare.json", "report.html"):
        assert (tmp_path / "study" / name).exists(), name
    rows = {r["recipe"]: r for r in csv.DictReader((tmp_path / "study" / "compare.csv").open())}
    assert float(rows["better"]["macro_f1_mean"]) == pytest.approx(np.mean(f1["better"]), abs=1e-5)
    assert float(rows["better"]["macro_f1_sd"]) == pytest.approx(np.std(f1["better"], ddof=1), abs=1e-5)
    differences = np.subtract(f1["better"], f1["base"])
    reference = scipy_stats.ttest_1samp(differences, 0.0)
    assert float(rows["better"]["by_seed_mean"]) == pytest.approx(differences.mean(), abs=1e-5)
    assert float(rows["better"]["by_seed_p"]) == pytest.approx(reference.pvalue, rel=1e-4)
    # by test study: the point estimate is the same mean difference, recomputed from predictions.csv
    assert float(rows["better"]["by_study_mean"]) == pytest.approx(differences.mean(), abs=1e-5)
    assert float(rows["better"]["by_study_low"]) > 0  # 20 points of accuracy on 3 x 120 studies is detectable
    assert rows["better"]["by_study_comparisons"] == "1" and rows["base"]["conclusion"] == "baseline"
    assert rows["better"]["conclusion"].startswith("higher")


def test_an_arm_against_itself_shows_no_detectable_difference(corex_cli, tmp_path):
    fabricate_study(tmp_path / "a", seeds=(0, 1))
    for run in (tmp_path / "a" / "base").iterdir():  # a copy of the baseline under another recipe name
        twin = tmp_path / "a" / "twin" / run.name
        twin.mkdir(parents=True)
        for file in ("results.json", "recipe.yaml"):
            (twin / file).write_text((run / file).read_text().replace("base", "twin"))
        (twin / "test").mkdir()
        (twin / "test" / "predictions.csv").write_text((run / "test" / "predictions.csv").read_text())
    code, _, err = corex_cli("compare", tmp_path / "a", "--baseline", "base", "--resamples", "200", "--out", tmp_path / "out")
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    twin = next(d for d in result["differences"] if d["recipe"] == "twin")
    assert twin["by_study"]["low"] == 0.0 == twin["by_study"]["high"] and twin["conclusion"] == (
        "not established: the by-seed interval contains 0 and the by-test-study interval contains 0")
    assert len(result["differences"]) == 2 and all(d["by_study"]["comparisons"] == 2 for d in result["differences"])


def test_compare_refuses_runs_whose_test_studies_differ(corex_cli, tmp_path):
    labels = np.arange(40) % 4
    fabricate_run(tmp_path / "one", "base", 0, labels, labels, [f"s{i}" for i in range(40)])
    fabricate_run(tmp_path / "two", "other", 0, labels, labels, [f"t{i}" for i in range(40)])
    code, _, err = corex_cli("compare", tmp_path / "one", tmp_path / "two")
    assert code == 2 and "Traceback" not in err
    assert f"cannot pair '{tmp_path / 'two'}' with '{tmp_path / 'one'}': their test studies differ (40 only in the first, 40 only in the second)" in err


def test_compare_names_a_bad_baseline_or_metric(corex_cli, tmp_path):
    fabricate_study(tmp_path / "s", seeds=(0,), n=20)
    code, _, err = corex_cli("compare", tmp_path / "s", "--baseline", "bas")
    assert code == 2 and "--baseline: no arm named 'bas'; did you mean 'base'?" in err
    code, _, err = corex_cli("compare", tmp_path / "s", "--metric", "macro_f")
    assert code == 2 and "did you mean 'macro_f1'?" in err
    code, _, err = corex_cli("compare", tmp_path / "nowhere")
    assert code == 2 and "is not a directory" in err


# -- issue 19: which test failed, power, NaN, baseline names, degenerate arms, ablations, variance ------------


def write_metrics(run: Path, **metrics):
    """Overwrite some test metrics of a fabricated run's results.json."""
    results = json.loads((run / "results.json").read_text())
    results["stages"]["test"]["metrics"].update(metrics)
    (run / "results.json").write_text(json.dumps(results))


def test_a_row_names_the_test_that_failed_and_calls_requiring_both_an_intersection_union_test(corex_cli, tmp_path):
    # Per seed, the better arm's edge differs in sign between seeds (by seed: the interval holds 0),
    # while on the test studies of every seed the two are far apart (by test study: rejects).
    root = tmp_path / "s"
    n = 200
    for seed, right in zip((0, 1, 2), (0.95, 0.35, 0.95)):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, n)
        ids = [f"study{seed}-{i}" for i in range(n)]
        base = np.where(rng.random(n) < 0.6, labels, (labels + 1) % 4)
        arm = np.where(rng.random(n) < right, labels, (labels + 1) % 4)
        fabricate_run(root / "base" / f"seed-{seed}", "base", seed, base, labels, ids)
        fabricate_run(root / "arm" / f"seed-{seed}", "arm", seed, arm, labels, ids)
    code, stdout, err = corex_cli("compare", root, "--baseline", "base", "--resamples", "1000")
    assert code == 0, err
    result = json.loads((root / "compare.json").read_text())
    (d,) = result["differences"]
    reference = scipy_stats.ttest_1samp(d["differences"], 0.0)
    low, high = reference.confidence_interval(0.95)
    assert (d["by_seed"]["low"], d["by_seed"]["high"]) == pytest.approx((low, high)) and low < 0 < high
    assert d["by_study"]["low"] > 0 and d["by_study"]["p_holm"] < 0.05
    assert d["conclusion"].startswith("not established: the by-seed interval contains 0 (the by-test-study test rejects (Holm p <0.001))")
    assert "no detectable difference" not in stdout and "intersection-union test" in stdout
    assert not d["detected"]


def test_power_of_the_paired_t_test_against_statsmodels_and_the_noncentral_t_of_scipy():
    power_module = pytest.importorskip("statsmodels.stats.power")
    reference = power_module.TTestPower()
    # The issue's example: +0.08 with sd 0.093 over 10 comparisons (Holm's first step: alpha 0.005).
    assert stats.t_power(0.08, 0.093, 15, 0.005) == pytest.approx(0.52, abs=0.005)
    assert stats.t_power(0.08, 0.093, 20, 0.005) == pytest.approx(0.74, abs=0.005)
    assert stats.seeds_for_power(0.08, 0.093, 0.005) == 22
    assert math.ceil(reference.solve_power(0.08 / 0.093, nobs=None, alpha=0.005, power=0.8)) == 22
    for effect, sd, n, alpha in [(0.08, 0.093, 15, 0.005), (0.02, 0.05, 9, 0.05), (-0.3, 0.1, 3, 0.01), (0.01, 0.04, 120, 0.0025)]:
        assert stats.t_power(effect, sd, n, alpha) == pytest.approx(
            reference.power(abs(effect) / sd, n, alpha, alternative="two-sided"), abs=1e-6)
    for t, df, nc in [(2.0, 4, 1.5), (-1.0, 1, 0.3), (3.0, 14, 3.3), (0.5, 2, -1.0), (2.6, 199, 2.9)]:
        assert stats.nct_cdf(t, df, nc) == pytest.approx(scipy_stats.nct.cdf(t, df, nc), abs=1e-8)
    for effect, sd, alpha in [(0.05, 0.1, 0.05), (0.3, 0.2, 0.005), (0.01, 0.03, 0.01)]:
        needed = stats.seeds_for_power(effect, sd, alpha)
        assert needed == max(2, math.ceil(reference.solve_power(effect / sd, nobs=None, alpha=alpha, power=0.8)))
    assert stats.seeds_for_power(0.0, 0.1, 0.05) is None and stats.seeds_for_power(math.nan, 0.1, 0.05) is None


def test_compare_reports_the_seeds_needed_for_power_at_holms_first_step(corex_cli, tmp_path):
    power_module = pytest.importorskip("statsmodels.stats.power")
    fabricate_study(tmp_path / "s", seeds=(0, 1, 2, 3))
    for seed, base, better in zip(range(4), (0.60, 0.62, 0.58, 0.61), (0.63, 0.61, 0.66, 0.64)):
        write_metrics(tmp_path / "s" / "base" / f"seed-{seed}", macro_f1=base)
        write_metrics(tmp_path / "s" / "better" / f"seed-{seed}", macro_f1=better)
    code, stdout, err = corex_cli("compare", tmp_path / "s", "--resamples", "200")
    assert code == 0, err
    (d,) = json.loads((tmp_path / "s" / "compare.json").read_text())["differences"]
    differences = np.asarray(d["differences"])
    assert differences == pytest.approx([0.03, -0.01, 0.08, 0.03])
    effect, sd = differences.mean(), differences.std(ddof=1)
    found = d["power"]
    assert found["alpha"] == 0.05 and found["n"] == 4 and found["sd"] == pytest.approx(sd)
    reference = power_module.TTestPower()
    assert found["power_now"] == pytest.approx(reference.power(effect / sd, 4, 0.05), abs=1e-6)
    # the smallest number of seeds with 80% power (statsmodels' power on either side of it)
    needed = found["needed"]
    assert reference.power(effect / sd, needed, 0.05) >= 0.8
    assert needed == 2 or reference.power(effect / sd, needed - 1, 0.05) < 0.8
    assert needed == math.ceil(reference.solve_power(effect / sd, nobs=None, alpha=0.05, power=0.8))
    assert f"| {needed} (power {found['power_now']:.2f} at 4) |" in stdout


def test_a_nan_difference_is_not_a_comparison_and_an_all_nan_bootstrap_is_not_p_zero(corex_cli, tmp_path):
    fabricate_study(tmp_path / "s", seeds=(0, 1, 2))
    for seed in (0, 1, 2):  # a third arm whose metric could not be computed
        run = tmp_path / "s" / "broken" / f"seed-{seed}"
        run.mkdir(parents=True)
        for file in ("results.json", "recipe.yaml"):
            (run / file).write_text((tmp_path / "s" / "base" / f"seed-{seed}" / file).read_text().replace("base", "broken"))
        write_metrics(run, macro_f1=math.nan, accuracy=0.5)
    code, _, err = corex_cli("compare", tmp_path / "s", "--baseline", "base", "--metric", "macro_f1", "--resamples", "200")
    assert code == 0, err
    result = json.loads((tmp_path / "s" / "compare.json").read_text())
    better = next(d for d in result["differences"] if d["arm"] == "better")
    broken = next(d for d in result["differences"] if d["arm"] == "broken")
    assert broken["by_seed"] is None and broken["conclusion"].startswith("not tested")
    assert len(broken["left_out"]) == 3
    # Holm counts one comparison: the better arm's adjusted p is its own p (scipy for the reference)
    reference = scipy_stats.ttest_1samp(better["differences"], 0.0).pvalue
    assert better["by_seed"]["comparisons"] == 1 and better["by_seed"]["p_holm"] == pytest.approx(reference, rel=1e-6)
    # The statistics themselves: a NaN difference gives no p, and Holm does not count it.
    assert math.isnan(stats.paired_t([0.1, math.nan, 0.2])["p"])
    assert stats.holm([0.544 / 2, stats.paired_t([0.1, math.nan])["p"]])[0] == pytest.approx(0.272)
    # A metric that is NaN on every resample: no interval, no p (never p = 0 and 'lower than the baseline').
    probabilities, labels = random_predictions()
    nowhere = stats.paired_bootstrap([(probabilities, probabilities, labels, list(range(len(labels))))],
                                     lambda p, y, w: np.full(len(w), math.nan), resamples=100)
    assert math.isnan(nowhere["p"]) and math.isnan(nowhere["low"]) and nowhere["dropped"] == 100
    from corex_study.compare import conclusion

    row = {"by_seed": None, "by_study": nowhere | {"p_holm": math.nan, "comparisons": 0}, "by_seed_missing": "one seed",
           "by_study_missing": None}
    text, detected = conclusion(row)
    assert text.startswith("not tested") and "lower" not in text and not detected


def fabricate_named_study(root: Path):
    """A `corex study` layout whose recipe names differ from the arms' file names."""
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, 60)
        ids = [f"s{seed}-{i}" for i in range(60)]
        for arm, recipe, fraction in (("scratch", "phantom-scratch", 1.0), ("moco", "phantom-moco", 1.0), ("moco", "phantom-moco", 0.1),
                                      ("scratch", "phantom-scratch", 0.1)):
            predicted = np.where(rng.random(60) < 0.7, labels, (labels + 1) % 4)
            fabricate_run(root / arm / f"frac-{fraction:g}" / f"seed-{seed}", recipe, seed, predicted, labels, ids, fraction=fraction)


def test_the_default_baseline_is_the_first_arm_alphabetically_and_file_or_recipe_names_both_work(corex_cli, tmp_path):
    from corex_study import compare_runs

    fabricate_named_study(tmp_path / "s")
    # runs sort by label fraction first (0.1 before 1): the default must still be alphabetical
    assert compare_runs([tmp_path / "s"], resamples=50)["baseline"] == "phantom-moco"
    for name in ("scratch", "phantom-scratch"):  # the study's arm (file name) or the recipe's name
        assert compare_runs([tmp_path / "s"], baseline=name, resamples=50)["baseline"] == "phantom-scratch"
        code, _, err = corex_cli("compare", tmp_path / "s", "--baseline", name, "--resamples", "50")
        assert code == 0, err


def test_an_ablation_is_an_arm_labelled_by_the_keys_that_differ(corex_cli, tmp_path):
    labels = np.arange(80) % 4
    ids = [f"s{i}" for i in range(80)]
    rng = np.random.default_rng(0)
    for folder, weight in (("full", 1.0), ("half", 0.5)):
        run = tmp_path / folder
        predicted = np.where(rng.random(80) < 0.7, labels, (labels + 1) % 4)
        fabricate_run(run, "quickstart", 0, predicted, labels, ids)
        config = yaml.safe_load((run / "recipe.yaml").read_text())
        config["stages"] = {"train": {"heads": {"segmentation": {"weight": weight}}, "epochs": 4}}
        (run / "recipe.yaml").write_text(yaml.safe_dump(config))
    half, full = "quickstart [stages.train.heads.segmentation.weight=0.5]", "quickstart [stages.train.heads.segmentation.weight=1.0]"
    code, stdout, err = corex_cli("compare", tmp_path / "full", tmp_path / "half", "--resamples", "100", "--out", tmp_path / "out")
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["baseline"] == half  # alphabetical
    assert [d["arm"] for d in result["differences"]] == [full]
    code, _, err = corex_cli("compare", tmp_path / "full", tmp_path / "half", "--baseline", "quickstart")
    assert code == 2 and "'quickstart' names 2 arms" in err
    code, _, err = corex_cli("compare", tmp_path / "full", tmp_path / "half", "--baseline", full, "--resamples", "100")
    assert code == 0, err
    # Identical recipes with the same seeds are still refused: they are one run twice.
    twin = tmp_path / "twin"
    twin.mkdir()
    for file in ("results.json", "recipe.yaml"):
        (twin / file).write_text((tmp_path / "full" / file).read_text())
    code, _, err = corex_cli("compare", tmp_path / "full", twin)
    assert code == 2 and "compare one of them" in err


def test_a_degenerate_arm_is_named_in_the_findings(corex_cli, tmp_path):
    fabricate_study(tmp_path / "s", seeds=(0, 1))
    for seed in (0, 1):  # an arm that always predicts 'typical'
        source = tmp_path / "s" / "base" / f"seed-{seed}"
        rows = list(csv.DictReader((source / "test" / "predictions.csv").open()))
        labels = np.array([CLASSES.index(r["label"]) for r in rows])
        constant = np.full(len(labels), 1)
        fabricate_run(tmp_path / "s" / "constant" / f"seed-{seed}", "constant", seed, constant, labels, [r["study_id"] for r in rows])
        # the reference: scikit-learn's balanced accuracy of a constant prediction is 1/K
        assert balanced_accuracy_score(labels, constant) == pytest.approx(0.25)
    code, stdout, err = corex_cli("compare", tmp_path / "s", "--baseline", "base", "--resamples", "100")
    assert code == 0, err
    result = json.loads((tmp_path / "s" / "compare.json").read_text())
    arm = next(a for a in result["arms"] if a["label"] == "constant")
    issues = {issue["kind"] for entry in arm["degenerate"] for issue in entry["issues"]}
    assert issues == {"class never predicted", "no better than chance"} and len(arm["degenerate"]) == 2
    balanced = next(i for i in arm["degenerate"][0]["issues"] if i.get("metric") == "balanced_accuracy")
    assert balanced["value"] == pytest.approx(0.25) and balanced["chance"] == pytest.approx(0.25)
    auroc = next(i for i in arm["degenerate"][0]["issues"] if i.get("metric") == "auroc")
    assert auroc["value"] == pytest.approx(0.5)  # constant probabilities rank nothing
    assert not any(a["degenerate"] for a in result["arms"] if a["label"] == "better")
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    text = next(f["text"] for f in report["findings"] if f["metric"].startswith("degenerate/constant"))
    assert "is degenerate in 2 of 2 runs" in text and "never predicts negative or indeterminate or atypical" in text
    assert "balanced accuracy 0.250, no better than an uninformative prediction" in text
    constant = next(d for d in result["differences"] if d["arm"] == "constant")
    assert "the arm is degenerate in 2 runs" in constant["conclusion"]
    assert "## Degenerate runs" in stdout


def test_variance_components_against_statsmodels_mixedlm_and_a_known_design():
    mixed = pytest.importorskip("statsmodels.formula.api")
    import pandas

    rng = np.random.default_rng(4)
    draws, trainings = 8, 4
    data = rng.normal(0, 0.05, draws)
    values = np.array([[0.8 + data[d] + rng.normal(0, 0.02) for _ in range(trainings)] for d in range(draws)])
    seeds = np.repeat(np.arange(draws), trainings)
    found = stats.variance_components(values.ravel(), seeds, test_variance=0.0)
    frame = pandas.DataFrame({"y": values.ravel(), "draw": seeds})
    with warnings.catch_warnings():  # statsmodels' boundary warning for a well-separated fit
        warnings.simplefilter("ignore")
        fit = mixed.mixedlm("y ~ 1", frame, groups=frame["draw"]).fit(reml=True)
    assert found["training"] == pytest.approx(fit.scale, rel=1e-4)
    assert found["data"] == pytest.approx(float(fit.cov_re.iloc[0, 0]), rel=1e-3)
    # the test-sampling variance of a draw's mean is taken out of the data component
    less = stats.variance_components(values.ravel(), seeds, test_variance=0.0005)
    assert less["data"] == pytest.approx(found["data"] - 0.0005) and less["test"] == 0.0005
    # one training per draw: data and trainings cannot be told apart; one draw: no data component
    single = stats.variance_components(values[:, 0], np.arange(draws))
    assert single["training"] is None and single["data"] is None
    assert single["data_and_training"] == pytest.approx(np.var(values[:, 0], ddof=1))
    one_draw = stats.variance_components(values[0], [0] * trainings)
    assert one_draw["data"] is None and one_draw["training"] == pytest.approx(np.var(values[0], ddof=1))
    # a negative estimate is set to 0 and said so
    assert stats.variance_components([0.5, 0.5, 0.6, 0.6], [0, 1, 0, 1])["truncated"] == ["data"]


def test_crossed_seeds_pair_by_seed_over_data_draws_and_by_test_study_within_them(corex_cli, tmp_path):
    """Two data seeds x two training seeds: same (data, training) seeds are paired by seed; the trainings of
    one data seed share its test studies and are resampled together."""
    root = tmp_path / "s"
    values = {}
    for data_seed in (0, 1):
        rng = np.random.default_rng(10 + data_seed)
        labels = rng.integers(0, 4, 100)
        ids = [f"d{data_seed}-{i}" for i in range(100)]
        for seed in (0, 1):
            for recipe, right in (("base", 0.55), ("arm", 0.75)):
                predicted = np.where(rng.random(100) < right, labels, (labels + 1) % 4)
                run = root / recipe / f"data-{data_seed}-seed-{seed}"
                values[(recipe, data_seed, seed)] = fabricate_run(run, recipe, seed, predicted, labels, ids)
                config = yaml.safe_load((run / "recipe.yaml").read_text())
                config["data"]["seed"] = data_seed
                (run / "recipe.yaml").write_text(yaml.safe_dump(config))
    code, _, err = corex_cli("compare", root, "--baseline", "base", "--resamples", "300")
    assert code == 0, err
    (d,) = json.loads((root / "compare.json").read_text())["differences"]
    assert d["pairs"] == [[0, 0], [0, 1], [1, 0], [1, 1]] and d["units"] == "data seeds"
    per_draw = [np.mean([values[("arm", ds, s)] - values[("base", ds, s)] for s in (0, 1)]) for ds in (0, 1)]
    assert d["unit_values"] == pytest.approx(per_draw)
    reference = scipy_stats.ttest_1samp(per_draw, 0.0)
    assert d["by_seed"]["p"] == pytest.approx(reference.pvalue, rel=1e-6) and d["by_seed"]["n"] == 2
    assert d["by_study"]["n"] == 2 and d["by_study"]["mean"] == pytest.approx(np.mean(per_draw), abs=1e-9)
    assert d["variance"]["data_draws"] == 2 and d["variance"]["training"] is not None
