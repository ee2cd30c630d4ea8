"""corex compare: the paired statistics on cases with a known answer, and the command end to end."""

from __future__ import annotations

import csv
import json
import math
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
    assert twin["by_study"]["low"] == 0.0 == twin["by_study"]["high"] and twin["conclusion"] == "no detectable difference at this size"
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
    assert code == 2 and "--baseline: no run of recipe 'bas'; did you mean 'base'?" in err
    code, _, err = corex_cli("compare", tmp_path / "s", "--metric", "macro_f")
    assert code == 2 and "did you mean 'macro_f1'?" in err
    code, _, err = corex_cli("compare", tmp_path / "nowhere")
    assert code == 2 and "is not a directory" in err
