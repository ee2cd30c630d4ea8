"""Tests of the corex_eval evaluators on small hand-made examples."""

from __future__ import annotations

import csv
import math
import time
import warnings

import pluggy
import pytest
import torch
import torchmetrics.functional.classification as tmf

import corex.hookspecs
import corex_eval
from corex.interfaces import Evaluator
from corex.testing import assert_mirrors
from corex_eval.classification import ClassificationEvaluator, weighted_auroc, weighted_metrics
from corex_eval.segmentation import GALLERY_SIZE, SegmentationEvaluator

CLASSES = ["Negative for Pneumonia", "Typical", "Indeterminate", "Atypical"]
SLUGS = ["negative_for_pneumonia", "typical", "indeterminate", "atypical"]


def batch_of(probabilities, labels, study_ids=None, image_ids=None):
    """A classification batch and outputs whose softmax gives back ``probabilities``."""
    probabilities = torch.as_tensor(probabilities, dtype=torch.float32)
    n = len(labels)
    study_ids = study_ids or [f"s{i}" for i in range(n)]
    image_ids = image_ids or [f"{s}-i{i}" for i, s in enumerate(study_ids)]
    batch = {"label": torch.as_tensor(labels), "study_id": study_ids, "image_id": image_ids}
    return batch, {"classification": probabilities.log()}


def read_csv(path):
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# Six studies with a known confusion matrix (rows true, columns predicted):
#   true 0: predicted 0, 1     -> recall 1/2
#   true 1: predicted 1, 1     -> recall 1
#   true 2: predicted 2        -> recall 1
#   true 3: predicted 0        -> recall 0
# accuracy 4/6; balanced accuracy (1/2 + 1 + 1 + 0) / 4 = 0.625;
# F1 = 2TP / (2TP + FP + FN): class 0 2/4, class 1 4/5, class 2 1, class 3 0 -> macro 0.575.
SIX_LABELS = [0, 0, 1, 1, 2, 3]
SIX_PROBABILITIES = [
    [0.7, 0.1, 0.1, 0.1],
    [0.3, 0.4, 0.2, 0.1],
    [0.1, 0.6, 0.2, 0.1],
    [0.2, 0.5, 0.1, 0.2],
    [0.1, 0.1, 0.7, 0.1],
    [0.4, 0.1, 0.2, 0.3],
]


def six_studies(**options):
    evaluator = ClassificationEvaluator(class_names=CLASSES, **options)
    evaluator.update(*batch_of(SIX_PROBABILITIES, SIX_LABELS))
    return evaluator


def test_registered_through_the_hook_and_satisfies_the_protocol():
    manager = pluggy.PluginManager(corex.hookspecs.PROJECT)
    manager.add_hookspecs(corex.hookspecs)
    manager.register(corex_eval)
    (evaluators,) = manager.hook.corex_evaluators()
    assert evaluators["classification"] is corex_eval.classification_evaluator
    assert evaluators["segmentation"] is corex_eval.segmentation_evaluator
    assert isinstance(evaluators["classification"](class_names=CLASSES), ClassificationEvaluator)
    assert isinstance(evaluators["segmentation"](), SegmentationEvaluator)
    assert isinstance(ClassificationEvaluator(class_names=CLASSES), Evaluator)
    assert isinstance(SegmentationEvaluator(), Evaluator)


@pytest.mark.parametrize("name", ["classification", "segmentation", "localization"])
def test_each_factory_has_its_evaluators_options_and_defaults(name):
    factory = corex_eval.corex_evaluators()[name]
    evaluator = getattr(corex_eval, f"{name.capitalize()}Evaluator")  # the lazy public name
    assert_mirrors(factory, evaluator)


def test_hand_computed_metrics_on_six_studies():
    metrics = six_studies(bootstrap=0).compute()
    assert metrics["n"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx(0.625)
    assert metrics["macro_f1"] == pytest.approx(0.575)
    assert [metrics[f"f1/{s}"] for s in SLUGS] == pytest.approx([0.5, 0.8, 1.0, 0.0])
    # Atypical (class 3): its one study scores 0.3; the five others 0.1, 0.1, 0.1, 0.2, 0.1 -> 5/5.
    assert metrics["auroc/atypical"] == pytest.approx(1.0)
    # Negative (class 0): positives 0.7, 0.3 against negatives 0.1, 0.2, 0.1, 0.4 -> (4 + 3) / 8.
    assert metrics["auroc/negative_for_pneumonia"] == pytest.approx(7 / 8)
    auroc = [metrics[f"auroc/{s}"] for s in SLUGS]
    assert metrics["auroc"] == pytest.approx(sum(auroc) / 4)
    squared_errors = [
        (p - (k == y)) ** 2 for row, y in zip(SIX_PROBABILITIES, SIX_LABELS) for k, p in enumerate(row)
    ]
    brier = sum(squared_errors) / 6
    assert metrics["brier"] == pytest.approx(brier, rel=1e-5)
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.filterwarnings("ignore:AUROC leaves out")
def test_images_of_one_study_are_averaged(tmp_path):
    # Study "a" (label 0): image 1 says negative, image 2 typical; their mean says negative.
    study_a = batch_of([[0.9, 0.1, 0.0, 0.0], [0.1, 0.5, 0.2, 0.2]], [0, 0], ["a", "a"], ["a1", "a2"])
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=0)
    evaluator.update(*study_a)
    evaluator.update(*batch_of([[0.1, 0.1, 0.1, 0.7]], [3], ["b"], ["b1"]))
    metrics = evaluator.compute()
    assert metrics["n"] == 2 and metrics["accuracy"] == 1.0
    evaluator.save(tmp_path)
    rows = read_csv(tmp_path / "predictions.csv")
    assert [r["study_id"] for r in rows] == ["a", "b"]
    assert [float(rows[0][f"p_{s}"]) for s in SLUGS] == pytest.approx([0.5, 0.3, 0.1, 0.1], abs=1e-5)
    assert rows[0]["label"] == rows[0]["predicted"] == CLASSES[0]

    per_image = ClassificationEvaluator(class_names=CLASSES, level="image", bootstrap=0)
    per_image.update(*study_a)
    assert per_image.compute()["n"] == 2 and per_image.compute()["accuracy"] == 0.5


def test_images_of_one_study_must_share_its_label():
    evaluator = ClassificationEvaluator(class_names=CLASSES)
    evaluator.update(*batch_of([[0.7, 0.1, 0.1, 0.1]] * 2, [0, 1], ["a", "a"]))
    with pytest.raises(ValueError, match="study 'a' has images with different labels"):
        evaluator.compute()


def test_unlabelled_samples_are_skipped_and_reset_clears():
    evaluator = six_studies(bootstrap=0)
    before = evaluator.compute()
    evaluator.update(*batch_of([[0.1, 0.1, 0.1, 0.7]] * 2, [-1, -1], ["u1", "u2"]))
    assert evaluator.compute() == before
    evaluator.reset()
    empty = evaluator.compute()
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and set(empty) == set(before)
    assert evaluator.intervals() == {}


def test_absent_class_is_left_out_of_macro_auroc():
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=0)
    evaluator.update(*batch_of(SIX_PROBABILITIES[:5], SIX_LABELS[:5]))  # no atypical study
    with pytest.warns(UserWarning, match="AUROC leaves out \\['Atypical'\\]"):
        metrics = evaluator.compute()
    assert math.isnan(metrics["auroc/atypical"])
    present = [metrics[f"auroc/{s}"] for s in SLUGS[:3]]
    assert metrics["auroc"] == pytest.approx(sum(present) / 3)


@pytest.mark.filterwarnings("ignore:AUROC leaves out")
def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    # Ten studies at confidence 0.8 with eight right: calibrated.
    labels = [0] * 8 + [1] * 2
    calibrated = ClassificationEvaluator(class_names=CLASSES, level="image", bootstrap=0)
    calibrated.update(*batch_of([[0.8, 0.1, 0.05, 0.05]] * 10, labels))
    assert calibrated.compute()["ece"] == pytest.approx(0.0, abs=1e-6)
    # Confidence 0.97 with half right: overconfident by 0.47.
    overconfident = ClassificationEvaluator(class_names=CLASSES, level="image", bootstrap=0)
    overconfident.update(*batch_of([[0.97, 0.01, 0.01, 0.01]] * 10, [0, 1] * 5))
    assert overconfident.compute()["ece"] == pytest.approx(0.47, abs=1e-5)


def random_study_data(n, seed, num_classes=4):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=generator)
    logits = torch.randn(n, num_classes, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels)
    probabilities = torch.softmax(logits, 1)
    probabilities[: n // 4] = probabilities[: n // 4].round(decimals=1)  # ties in the scores
    return probabilities, labels


@pytest.mark.parametrize("labels_present", [4, 3])
def test_vectorised_metrics_agree_with_torchmetrics(labels_present):
    probabilities, labels = random_study_data(60, seed=labels_present)
    labels = labels.clamp(max=labels_present - 1)  # with 3: a class absent from the targets
    ones = torch.ones(1, 60)
    plain = {name: float(value) for name, value in weighted_metrics(probabilities, labels, ones).items()}
    expected = {
        "accuracy": tmf.multiclass_accuracy(probabilities, labels, 4, average="micro"),
        # recall averaged over the classes present in the labels (scikit-learn's balanced accuracy)
        "balanced_accuracy": tmf.multiclass_recall(probabilities, labels, 4, average=None)[:labels_present].mean(),
        "macro_f1": tmf.multiclass_f1_score(probabilities, labels, 4, average="macro"),
    }
    for name, value in expected.items():
        assert plain[name] == pytest.approx(float(value)), name
    per_class = weighted_auroc(probabilities, torch.nn.functional.one_hot(labels, 4), ones)[0]
    for c in range(labels_present):
        expected_auroc = tmf.binary_auroc(probabilities[:, c], labels == c)
        assert float(per_class[c]) == pytest.approx(float(expected_auroc))
    assert per_class[labels_present:].isnan().all()

    # Integer weights mean repeated samples.
    counts = torch.randint(0, 3, (1, 60), generator=torch.Generator().manual_seed(0))
    repeated = torch.arange(60).repeat_interleave(counts[0])
    weighted = weighted_metrics(probabilities, labels, counts)
    assert float(weighted["macro_f1"]) == pytest.approx(
        float(tmf.multiclass_f1_score(probabilities[repeated], labels[repeated], 4, average="macro"))
    )


def test_bootstrap_intervals_are_deterministic_fast_and_contain_the_estimate():
    probabilities, labels = random_study_data(100, seed=1)
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=1000)
    evaluator.update(*batch_of(probabilities, labels))
    start = time.perf_counter()
    intervals = evaluator.intervals()
    # About 0.3 s on one free core (scoring resamples one by one with torchmetrics takes tens of
    # seconds); the bound leaves room for a machine loaded by other jobs.
    assert time.perf_counter() - start < 8.0
    metrics = evaluator.compute()
    selective = {"selective/aurc", "selective/e_aurc", "selective/accuracy_at_90", "selective/accuracy_at_80"}
    assert set(intervals) == {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "study_map", "ece", "brier"} | selective
    for name, (low, high) in intervals.items():
        assert low < metrics[name] < high, name
        assert high - low < 0.35, name
    assert evaluator.intervals() == intervals
    other_seed = ClassificationEvaluator(class_names=CLASSES, bootstrap=1000, seed=1)
    other_seed.update(*batch_of(probabilities, labels))
    assert other_seed.intervals() != intervals
    assert six_studies(bootstrap=0).intervals() == {}


def test_save_writes_plots_and_tables(tmp_path):
    evaluator = six_studies(bootstrap=0)
    evaluator.save(tmp_path / "eval")
    files = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert files == ["classification.json", "confusion_matrix.png", "per_class.csv", "pr.png", "predictions.csv",
                     "reliability.png", "risk_coverage.png", "roc.png"]
    for png in ("confusion_matrix.png", "reliability.png", "roc.png", "pr.png", "risk_coverage.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    per_class = read_csv(tmp_path / "eval" / "per_class.csv")
    assert [r["class"] for r in per_class] == CLASSES
    assert [int(r["support"]) for r in per_class] == [2, 2, 1, 1]
    assert [float(r["recall"]) for r in per_class] == pytest.approx([0.5, 1, 1, 0])
    assert [float(r["precision"]) for r in per_class] == pytest.approx([0.5, 2 / 3, 1, 0])
    assert float(per_class[0]["auroc"]) == pytest.approx(7 / 8)
    predictions = read_csv(tmp_path / "eval" / "predictions.csv")
    assert [r["study_id"] for r in predictions] == [f"s{i}" for i in range(6)]
    assert [CLASSES.index(r["predicted"]) for r in predictions] == [0, 1, 1, 1, 2, 0]
    assert list(predictions[0]) == ["study_id", "label", "predicted", *(f"p_{s}" for s in SLUGS)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bootstrap": -1}, "bootstrap"),
        ({"calibration_bins": 0}, "calibration_bins"),
        ({"level": "patient"}, "level"),
        ({"class_names": ["typical"]}, "at least 2"),
        ({"class_names": ["Typical", "typical!"]}, "clashing"),
        ({"ready_recall": 0.0}, "ready_recall"),
        ({"confidence": 1.0}, "confidence"),
        ({"target_accuracy": 1.5}, "target_accuracy"),
    ],
)
def test_classification_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        ClassificationEvaluator(**{"class_names": CLASSES} | options)


def test_classification_complains_about_wrong_outputs():
    evaluator = ClassificationEvaluator(class_names=CLASSES)
    batch, outputs = batch_of(SIX_PROBABILITIES, SIX_LABELS)
    with pytest.raises(ValueError, match="head 'classification' is not among the outputs \\['cls'\\]"):
        evaluator.update(batch, {"cls": outputs["classification"]})
    with pytest.raises(ValueError, match="expected \\(B, 4\\)"):
        evaluator.update(batch, {"classification": outputs["classification"][:, :3]})


# -- segmentation ----------------------------------------------------------------------------------


def segmentation_batch():
    """Four 4x4 masks; the last is unannotated and must not count.

    0: target 2x2 block, prediction 2x3 block -> overlap 4: Dice 8/10, IoU 4/6
    1: target and prediction empty          -> Dice 1, IoU 1 (a correct "no opacity")
    2: target empty, prediction one pixel   -> Dice 0, IoU 0
    3: has_mask False, prediction all wrong -> skipped
    """
    target = torch.zeros(4, 1, 4, 4)
    predicted = torch.zeros(4, 1, 4, 4)
    target[0, 0, :2, :2] = 1
    predicted[0, 0, :2, :3] = 1
    predicted[2, 0, 0, 0] = 1
    target[3] = 1
    batch = {
        "image": torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
        "mask": target,
        "has_mask": torch.tensor([True, True, True, False]),
        "image_id": ["overlap", "empty", "false-alarm", "unannotated"],
    }
    return batch, {"segmentation": 8 * predicted - 4}  # logits: +4 inside, -4 outside


def test_segmentation_hand_made_masks():
    evaluator = SegmentationEvaluator()
    evaluator.update(*segmentation_batch())
    metrics = evaluator.compute()
    assert metrics["n_masks"] == 3 and metrics["n_masks/positive"] == 1
    assert metrics["dice"] == pytest.approx((0.8 + 1 + 0) / 3)
    assert metrics["iou"] == pytest.approx((4 / 6 + 1 + 0) / 3)
    assert metrics["dice/positive"] == pytest.approx(0.8)
    assert metrics["iou/positive"] == pytest.approx(4 / 6)


def test_segmentation_threshold_and_empty_state():
    batch, outputs = segmentation_batch()
    strict = SegmentationEvaluator(threshold=0.99)  # sigmoid(4) = 0.982: nothing predicted
    strict.update(batch, outputs)
    assert strict.compute()["dice"] == pytest.approx((0 + 1 + 1) / 3)
    strict.reset()
    empty = strict.compute()
    assert empty["n_masks"] == 0 and math.isnan(empty["dice"])
    strict.update({**batch, "has_mask": torch.zeros(4, dtype=torch.bool)}, outputs)
    assert strict.compute()["n_masks"] == 0
    with pytest.raises(ValueError, match="threshold"):
        SegmentationEvaluator(threshold=1.0)
    with pytest.raises(ValueError, match="head 'segmentation' is not among"):
        SegmentationEvaluator().update(batch, {"mask": outputs["segmentation"]})


def test_segmentation_gallery_keeps_the_first_examples(tmp_path):
    evaluator = SegmentationEvaluator()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib complaining about empty contours
        for _ in range(4):
            evaluator.update(*segmentation_batch())
        evaluator.save(tmp_path)
    assert len(evaluator._gallery) == GALLERY_SIZE
    assert [e["image_id"] for e in evaluator._gallery[:3]] == ["overlap", "empty", "false-alarm"]
    assert (tmp_path / "segmentation_examples.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
