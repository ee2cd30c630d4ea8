"""The evaluation metrics added for issue 7 against independent computations: the challenge's
study-level mAP (hand-worked and against scikit-learn), the patient-cluster bootstrap, temperature
scaling, calibration under weightings, the false-positive area, and the training curves."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmf
from sklearn.metrics import average_precision_score, precision_recall_curve

from corex.curves import best_epoch, plot_curves
from corex_eval.average_precision import average_precision, average_precision_per_class, study_map
from corex_eval.bootstrap import cluster_index, percentile_intervals, resample_counts
from corex_eval.calibration import fit_temperature, weighted_brier, weighted_ece
from corex_eval.classification import ClassificationEvaluator
from corex_eval.segmentation import SegmentationEvaluator

CLASSES = ["Negative for Pneumonia", "Typical", "Indeterminate", "Atypical"]
SLUGS = ["negative_for_pneumonia", "typical", "indeterminate", "atypical"]


def voc2010_reference(scores, positive):
    """PASCAL VOC 2010 AP written the way its development kit does, one detection at a time
    (distinct scores only, so that the walk order is the ranking)."""
    order = np.argsort(-np.asarray(scores, dtype=float))
    hits = np.asarray(positive, dtype=float)[order]
    true_positive, false_positive = np.cumsum(hits), np.cumsum(1 - hits)
    recall = np.concatenate([[0.0], true_positive / hits.sum(), [1.0]])
    precision = np.concatenate([[0.0], true_positive / (true_positive + false_positive), [0.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    changed = np.nonzero(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[changed] - recall[changed - 1]) * precision[changed]))


def enveloped_sklearn(scores, positive):
    """VOC's envelope applied to scikit-learn's precision-recall curve (ties as one threshold)."""
    precision, recall, _ = precision_recall_curve(positive, scores)
    precision, recall = precision[::-1], recall[::-1]  # from recall 0 upwards
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall) * envelope[1:]))


# -- average precision and study_map -------------------------------------------------------------


def test_average_precision_worked_by_hand():
    # Ranked: -, +, +, -, +. Precision after each: 0, 1/2, 2/3, 2/4, 3/5; recall 0, 1/3, 2/3, 2/3, 1.
    # VOC envelope at the three recall steps: max(1/2, 2/3, 2/4, 3/5) = 2/3, then 2/3, then 3/5,
    # so AP = (2/3 + 2/3 + 3/5) / 3 = 0.6444. scikit-learn keeps the raw precisions at the steps,
    # (1/2 + 2/3 + 3/5) / 3 = 0.5889: the envelope raised the first step.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    positive = torch.tensor([False, True, True, False, True])
    assert float(average_precision(scores, positive)) == pytest.approx((2 / 3 + 2 / 3 + 3 / 5) / 3)
    assert average_precision_score(positive, scores) == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    # Ranked +, +, -, -, +: the precisions at the steps (1, 1, 3/5) already fall, so both agree.
    positive = torch.tensor([True, True, False, False, True])
    expected = (1 + 1 + 3 / 5) / 3
    assert float(average_precision(scores, positive)) == pytest.approx(expected)
    assert average_precision_score(positive, scores) == pytest.approx(expected)
    # No positive: no AP.
    assert math.isnan(float(average_precision(scores, torch.zeros(5, dtype=torch.bool))))


def test_study_map_worked_by_hand():
    # Three studies, three classes; labels 0, 1, 2.
    probabilities = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.1, 0.5, 0.4]])
    labels = torch.tensor([0, 1, 2])
    # class 0 ranks studies 0 (+), 1, 2: AP 1. class 1 ranks 2, 0, 1 (+): precision 1/3 at recall 1.
    # class 2 ranks 2 (+), 1, 0: AP 1. study_map = (1 + 1/3 + 1) / 3.
    assert average_precision_per_class(probabilities, labels).tolist() == pytest.approx([1, 1 / 3, 1])
    assert float(study_map(probabilities, labels)) == pytest.approx(7 / 9)
    # A class that no study has is left out of the mean, not counted as 0.
    assert float(study_map(probabilities[:, :3], torch.tensor([0, 0, 2]))) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_against_references_and_sklearn(seed):
    generator = np.random.default_rng(seed)
    positive = generator.random(40) < 0.3
    positive[0] = True
    scores = generator.random(40) + 0.6 * positive
    ours = float(average_precision(torch.tensor(scores), torch.tensor(positive)))
    assert ours == pytest.approx(voc2010_reference(scores, positive))
    assert ours == pytest.approx(enveloped_sklearn(scores, positive))
    # The envelope only raises precision: never below scikit-learn's uninterpolated AP.
    assert ours >= average_precision_score(positive, scores) - 1e-12

    # Ties: rounded scores. Tied studies form one threshold, as in scikit-learn's curve.
    rounded = np.round(scores, 1)
    tied = float(average_precision(torch.tensor(rounded), torch.tensor(positive)))
    assert tied == pytest.approx(enveloped_sklearn(rounded, positive))
    shuffled = generator.permutation(40)
    again = average_precision(torch.tensor(rounded[shuffled]), torch.tensor(positive[shuffled]))
    assert float(again) == pytest.approx(tied)  # the order of arrival does not matter


def test_weighted_average_precision_equals_repeated_samples():
    generator = torch.Generator().manual_seed(3)
    probabilities = torch.softmax(torch.randn(30, 4, generator=generator), 1)
    labels = torch.arange(30) % 4
    counts = torch.randint(0, 3, (5, 30), generator=generator).double()
    weighted = average_precision_per_class(probabilities, labels, counts)
    for row in range(5):
        repeated = torch.arange(30).repeat_interleave(counts[row].long())
        expected = average_precision_per_class(probabilities[repeated], labels[repeated])
        assert weighted[row].tolist() == pytest.approx(expected.tolist(), nan_ok=True)


SIX_PROBABILITIES = torch.tensor([
    [0.7, 0.1, 0.1, 0.1], [0.3, 0.4, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1],
    [0.2, 0.5, 0.1, 0.2], [0.1, 0.1, 0.7, 0.1], [0.4, 0.1, 0.2, 0.3],
])
SIX_LABELS = torch.tensor([0, 0, 1, 1, 2, 3])


def six_study_batch():
    batch = {"label": SIX_LABELS, "study_id": [f"s{i}" for i in range(6)], "image_id": [f"i{i}" for i in range(6)]}
    return batch, {"classification": SIX_PROBABILITIES.log()}


def six_study_evaluator(**options):
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=0, **options)
    evaluator.update(*six_study_batch())
    return evaluator, SIX_PROBABILITIES, SIX_LABELS


def test_evaluator_reports_study_map_and_per_class_ap():
    evaluator, probabilities, labels = six_study_evaluator()
    metrics = evaluator.compute()
    per_class = [voc2010_reference(probabilities[:, c].numpy(), (labels == c).numpy()) for c in range(4)]
    # By hand for "typical" (class 1): ranked s2 (0.6, +), s3 (0.5, +), ...: AP 1.
    assert per_class[1] == pytest.approx(1.0)
    assert [metrics[f"ap/{s}"] for s in SLUGS] == pytest.approx(per_class)
    assert metrics["study_map"] == pytest.approx(sum(per_class) / 4)


# -- the cluster bootstrap -----------------------------------------------------------------------


def test_cluster_resampling_draws_whole_patients():
    # Patient A has three studies, patient B one. A resample draws two patients, so A is drawn
    # k = 0, 1 or 2 times with probability 1/4, 1/2, 1/4 and all of A's studies count k times.
    clusters = cluster_index(["A", "A", "B", "A"])
    assert clusters.tolist() == [0, 0, 1, 0]
    counts = resample_counts(clusters, 20000, torch.Generator().manual_seed(0))
    assert counts.shape == (20000, 4)
    assert torch.equal(counts[:, 0], counts[:, 1]) and torch.equal(counts[:, 0], counts[:, 3])
    assert torch.all(counts[:, 0] + counts[:, 2] == 2)  # two patients per resample
    frequencies = torch.bincount(counts[:, 0].long(), minlength=3) / 20000
    assert frequencies.tolist() == pytest.approx([0.25, 0.5, 0.25], abs=0.015)
    # If A's studies are right and B's wrong, the resampled accuracy is 0, 3/4 or 1: never the
    # 1/4 or 1/2 that resampling the four studies independently would give.
    correct = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    accuracy = counts @ correct / counts.sum(1)
    assert set(accuracy.unique().tolist()) == {0.0, 0.75, 1.0}


def test_one_study_per_patient_is_the_ordinary_bootstrap():
    clusters = torch.arange(7)
    counts = resample_counts(clusters, 50, torch.Generator().manual_seed(4))
    draws = torch.randint(7, (50, 7), generator=torch.Generator().manual_seed(4))
    expected = torch.zeros(50, 7, dtype=torch.float64).scatter_add_(1, draws, torch.ones(50, 7, dtype=torch.float64))
    assert torch.equal(counts, expected)


def test_percentile_intervals_skip_undefined_resamples():
    values = {"x": [torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([2.0])], "never": [torch.tensor([float("nan")])]}
    intervals = percentile_intervals(values)
    assert set(intervals) == {"x"}
    expected = np.percentile([1.0, 2.0, 3.0], [2.5, 97.5])
    assert intervals["x"] == pytest.approx(tuple(expected))


def homogeneous_patients(with_patients: bool, patients: int = 20, studies: int = 5):
    """Each patient's studies are all right or all wrong (alternating patients)."""
    n = patients * studies
    labels = torch.zeros(n, dtype=torch.long)
    right = torch.tensor([[0.9, 0.05, 0.03, 0.02]])
    wrong = torch.tensor([[0.05, 0.9, 0.03, 0.02]])
    probabilities = torch.cat([right if (i // studies) % 2 == 0 else wrong for i in range(n)])
    labels[-1] = 3  # two classes present, so AUROC and AP exist
    batch = {"label": labels, "study_id": [f"s{i}" for i in range(n)], "image_id": [f"i{i}" for i in range(n)]}
    if with_patients:
        batch["patient_id"] = [f"p{i // studies}" for i in range(n)]
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=1000)
    evaluator.update(batch, {"classification": probabilities.log()})
    return evaluator


@pytest.mark.filterwarnings("ignore:AUROC leaves out")
def test_intervals_resample_patients_not_studies():
    clustered = homogeneous_patients(True).intervals()["accuracy"]
    independent = homogeneous_patients(False).intervals()["accuracy"]
    # Accuracy about 0.5: the standard error is sqrt(0.25 / 20) over 20 patients but
    # sqrt(0.25 / 100) over 100 "independent" studies, a factor sqrt(5) = 2.2 narrower.
    width_clustered, width_independent = clustered[1] - clustered[0], independent[1] - independent[0]
    assert 0.3 < width_clustered < 0.55
    assert 0.12 < width_independent < 0.25
    assert homogeneous_patients(True).intervals()["accuracy"] == clustered  # seeded


@pytest.mark.filterwarnings("ignore:AUROC leaves out")
def test_predictions_csv_keeps_its_columns_and_adds_patient_id_last(tmp_path):
    homogeneous_patients(True, patients=2, studies=2).save(tmp_path)
    with (tmp_path / "predictions.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["study_id", "label", "predicted", *(f"p_{s}" for s in SLUGS), "patient_id"]
    assert [r["patient_id"] for r in rows] == ["p0", "p0", "p1", "p1"]
    with (tmp_path / "per_class.csv").open(newline="") as file:
        # Columns only ever added at the end: ap, then the recalled count and the exact recall interval.
        assert list(next(csv.DictReader(file))) == ["class", "precision", "recall", "f1", "auroc", "support", "ap", "recalled",
                                                    "recall_low", "recall_high"]


# -- calibration ---------------------------------------------------------------------------------


def test_weighted_ece_and_brier_agree_with_torchmetrics_and_repeats():
    generator = torch.Generator().manual_seed(5)
    probabilities = torch.softmax(2 * torch.randn(80, 4, generator=generator), 1)
    probabilities[:5] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # confidence exactly 1: its own bin
    labels = torch.randint(4, (80,), generator=generator)
    ones = torch.ones(1, 80)
    expected_ece = tmf.multiclass_calibration_error(probabilities, labels, 4, n_bins=10)
    assert float(weighted_ece(probabilities, labels, ones, 10)) == pytest.approx(float(expected_ece), abs=1e-6)
    expected_brier = ((probabilities - torch.nn.functional.one_hot(labels, 4)) ** 2).sum(1).mean()
    assert float(weighted_brier(probabilities, labels, ones)) == pytest.approx(float(expected_brier))
    counts = torch.randint(0, 4, (1, 80), generator=generator)
    repeated = torch.arange(80).repeat_interleave(counts[0])
    expected = tmf.multiclass_calibration_error(probabilities[repeated], labels[repeated], 4, n_bins=10)
    assert float(weighted_ece(probabilities, labels, counts, 10)) == pytest.approx(float(expected), abs=1e-6)


def overconfident(n: int, seed: int, images_per_study: int = 1):
    """Labels drawn from softmax(z); the model reports 3 z, three times too sure."""
    generator = torch.Generator().manual_seed(seed)
    studies = n // images_per_study
    true_logits = 1.5 * torch.randn(studies, 4, generator=generator)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator)[:, 0]
    noise = 0.1 * torch.randn(n, 4, generator=generator)
    logits = 3 * true_logits.repeat_interleave(images_per_study, 0) + noise
    ids = [f"{seed}-s{i // images_per_study}" for i in range(n)]
    batch = {"label": labels.repeat_interleave(images_per_study), "study_id": ids,
             "image_id": [f"{seed}-i{i}" for i in range(n)]}
    return batch, {"classification": logits}


@pytest.mark.filterwarnings("ignore:AUROC leaves out")
def test_temperature_scaling_softens_overconfident_logits():
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=200)
    evaluator.calibration_update(*overconfident(600, seed=1))
    evaluator.reset()  # as the engine does before an evaluate stage: calibration data survive
    evaluator.update(*overconfident(600, seed=2))
    metrics = evaluator.compute()
    assert 2.3 < metrics["temperature"] < 3.8  # the truth is 3
    assert metrics["ece"] > 0.1
    assert metrics["ece/calibrated"] < metrics["ece"] / 2
    assert metrics["brier/calibrated"] < metrics["brier"]

    # Independent check of the calibrated numbers: torchmetrics on softmax(logits / T).
    batch, outputs = overconfident(600, seed=2)
    tempered = torch.softmax(outputs["classification"] / metrics["temperature"], 1)
    labels = batch["label"]
    expected_ece = tmf.multiclass_calibration_error(tempered, labels, 4, n_bins=15)
    assert metrics["ece/calibrated"] == pytest.approx(float(expected_ece), abs=1e-5)
    expected_brier = ((tempered - torch.nn.functional.one_hot(labels, 4)) ** 2).sum(1).mean()
    assert metrics["brier/calibrated"] == pytest.approx(float(expected_brier), abs=1e-5)
    # Scaling changes no prediction.
    assert metrics["accuracy"] == pytest.approx(float(tmf.multiclass_accuracy(tempered, labels, 4, average="micro")))
    intervals = evaluator.intervals()
    assert intervals["ece/calibrated"][1] < intervals["ece"][0]


def test_fitted_temperature_minimises_the_study_level_nll():
    batch, outputs = overconfident(300, seed=3, images_per_study=3)  # 100 studies of 3 images
    logits = outputs["classification"].double()
    unit = cluster_index(batch["study_id"])
    labels = batch["label"][::3]
    fitted = fit_temperature(logits, unit, labels)

    def study_nll(t: float) -> float:  # reference: mean of the images' softmax per study
        probabilities = torch.softmax(logits / t, 1).reshape(100, 3, 4).mean(1)
        return float(-probabilities[torch.arange(100), labels].log().mean())

    grid = np.exp(np.linspace(np.log(0.2), np.log(20), 2001))
    best = grid[np.argmin([study_nll(t) for t in grid])]
    assert fitted == pytest.approx(best, rel=0.01)
    assert study_nll(fitted) <= min(study_nll(fitted * 0.98), study_nll(fitted * 1.02))


def test_nothing_calibrated_without_calibration_data():
    evaluator, _, _ = six_study_evaluator()
    metrics = evaluator.compute()
    assert not {"temperature", "ece/calibrated", "brier/calibrated"} & set(metrics)
    assert evaluator.temperature is None
    # Only unlabelled validation data: still nothing to fit on.
    unlabelled = {"label": torch.tensor([-1, -1]), "study_id": ["v1", "v2"], "image_id": ["v1", "v2"]}
    evaluator.calibration_update(unlabelled, {"classification": torch.zeros(2, 4)})
    assert "temperature" not in evaluator.compute()


# -- segmentation --------------------------------------------------------------------------------


def test_false_positive_area_and_dice_intervals_by_patient():
    # Four 4x4 images of two patients. Image 0 (p1): opacity 2x2, predicted exactly (Dice 1).
    # Image 1 (p1): empty, 4 of 16 pixels predicted. Image 2 (p2): empty, nothing predicted.
    # Image 3 (p2): empty, 2 pixels predicted. fp_area/negative = (4/16 + 0 + 2/16) / 3 = 0.125.
    target = torch.zeros(4, 1, 4, 4)
    predicted = torch.zeros(4, 1, 4, 4)
    target[0, 0, :2, :2] = predicted[0, 0, :2, :2] = 1
    predicted[1, 0, 3, :] = 1
    predicted[3, 0, 0, :2] = 1
    batch = {
        "image": torch.zeros(4, 1, 4, 4), "mask": target, "has_mask": torch.ones(4, dtype=torch.bool),
        "label": torch.tensor([1, 0, 0, 0]), "image_id": ["a", "b", "c", "d"],
        "study_id": ["s1", "s2", "s3", "s4"], "patient_id": ["p1", "p1", "p2", "p2"],
    }
    evaluator = SegmentationEvaluator(bootstrap=2000, class_names=CLASSES)
    evaluator.update(batch, {"segmentation": 8 * predicted - 4})
    metrics = evaluator.compute()
    assert metrics["fp_area/negative"] == pytest.approx(0.125)
    assert metrics["dice"] == pytest.approx((1 + 0 + 1 + 0) / 4)  # the empty-empty image counts 1
    assert metrics["dice/positive"] == pytest.approx(1.0)
    intervals = evaluator.intervals()
    # Per patient Dice is (1 + 0) / 2 for both p1 and p2, so every resample of whole patients
    # has Dice 0.5 exactly; resampling images independently would spread it from 0 to 1.
    assert intervals["dice"] == pytest.approx((0.5, 0.5))
    # dice/positive exists only in resamples that drew p1 (the others are nan and ignored).
    assert intervals["dice/positive"] == pytest.approx((1.0, 1.0))
    # fp_area/negative: p1 alone gives 4/16, p2 alone 1/16 (mean of 0 and 2/16).
    low, high = intervals["fp_area/negative"]
    assert low == pytest.approx(1 / 16) and high == pytest.approx(4 / 16)
    assert evaluator.intervals() == intervals
    assert SegmentationEvaluator(bootstrap=0).intervals() == {}
    # Only images with an opacity: no clear image to measure false positives on.
    only_positive = SegmentationEvaluator(bootstrap=10)
    only_positive.update({**batch, "has_mask": torch.tensor([True, False, False, False])}, {"segmentation": 8 * predicted - 4})
    assert "fp_area/negative" not in only_positive.compute()
    assert "fp_area/negative" not in only_positive.intervals()


# -- curves --------------------------------------------------------------------------------------


def test_curves_mark_the_selected_epoch(tmp_path):
    rows = [{"stage": "pre", "epoch": e, "train/loss": 5.0 - e} for e in (1, 2, 3)]
    f1 = [0.3, 0.6, 0.6, 0.5]  # a tie: the first best is the one kept
    loss = [1.0, 0.8, 0.7, 0.9]
    rows += [{"stage": "train", "epoch": e + 1, "train/loss": 1.0, "val/loss": loss[e], "val/macro_f1": f1[e]}
             for e in range(4)]
    train = [r for r in rows if r["stage"] == "train"]
    # The epoch the stage selected, on the metric it was selected on (results.json says which).
    assert best_epoch(train, "macro_f1", 2)[:3] == (2, "val/macro_f1", 0.6)
    assert best_epoch(train, "loss", 3)[:3] == (3, "val/loss", 0.7)
    assert "selected epoch 3: val/loss 0.700" == best_epoch(train, "loss", 3)[3]
    assert best_epoch(train, "macro_f1", None) is None  # nothing was selected
    assert best_epoch([{**r, "val/macro_f1": float("nan")} for r in train], "macro_f1", 2) is None
    assert best_epoch([r for r in rows if r["stage"] == "pre"], None, None) is None
    plot_curves(rows, tmp_path / "curves.png", selected={"train": ("macro_f1", 2)}, metrics=["macro_f1"])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_temperature_warns_when_validation_is_separated_without_error():
    # Every validation study right and confident: the likelihood keeps rising as T falls to 0.
    labels = torch.arange(40) % 4
    logits = 4 * torch.nn.functional.one_hot(labels, 4).float()
    with pytest.warns(UserWarning, match="every validation image is classified correctly"):
        temperature = fit_temperature(logits, torch.arange(40), labels)
    assert temperature < 1  # somewhere on the way to 0


def test_figures_are_titled_with_split_and_level(tmp_path, monkeypatch):
    import corex_eval.figures

    titles = {}

    def capture(figure, path):
        titles[path.name] = figure.get_suptitle() or " ".join(a.get_title() for a in figure.axes)

    monkeypatch.setattr(corex_eval.figures, "save_figure", capture)
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=0, level="image", split="val")
    evaluator.update(*six_study_batch())
    evaluator.save(tmp_path)
    assert set(titles) == {"confusion_matrix.png", "reliability.png", "roc.png", "pr.png"}
    for name, title in titles.items():
        assert "val split, image level" in title, name


# -- exact (Clopper-Pearson) recall intervals ------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 30, 101, 1000])
@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_clopper_pearson_matches_scipy(n, confidence):
    from scipy.stats import beta, binomtest

    from corex_eval.exact import clopper_pearson

    for k in sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1))):
        low, high = clopper_pearson(k, n, confidence)
        reference = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
        assert low == pytest.approx(reference.low, abs=1e-10) and high == pytest.approx(reference.high, abs=1e-10)
        alpha = 1 - confidence  # the same from the beta quantiles
        assert low == pytest.approx(0.0 if k == 0 else beta.ppf(alpha / 2, k, n - k + 1), abs=1e-10)
        assert high == pytest.approx(1.0 if k == n else beta.ppf(1 - alpha / 2, k + 1, n - k), abs=1e-10)
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))


def test_per_class_csv_holds_each_recall_with_its_exact_interval(tmp_path):
    from scipy.stats import binomtest

    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (90,), generator=generator)
    logits = torch.randn(90, 4, generator=generator)
    logits[torch.arange(90), labels] += 1.0
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=0, confidence=0.9)
    evaluator.update({"label": labels, "study_id": [f"s{i}" for i in range(90)], "image_id": [f"i{i}" for i in range(90)]},
                     {"classification": logits})
    evaluator.save(tmp_path)
    rows = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    predicted = logits.argmax(1)
    for c, row in enumerate(rows):
        support, recalled = int((labels == c).sum()), int(((labels == c) & (predicted == c)).sum())
        assert (int(row["support"]), int(row["recalled"])) == (support, recalled)
        reference = binomtest(recalled, support).proportion_ci(confidence_level=0.9, method="exact")
        assert float(row["recall_low"]) == pytest.approx(reference.low, rel=1e-5)
        assert float(row["recall_high"]) == pytest.approx(reference.high, rel=1e-5)
    settings = json.loads((tmp_path / "classification.json").read_text())
    assert settings["confidence"] == 0.9 and settings["ready_recall"] == 0.8 and settings["target_accuracy"] == 0.95
