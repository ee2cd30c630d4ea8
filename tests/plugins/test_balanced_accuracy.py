"""Balanced accuracy is the mean recall over the classes present in the labels (scikit-learn's
definition): a class that is only predicted has no recall, rather than a recall of 0."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from corex_eval import ClassificationEvaluator
from sklearn.metrics import balanced_accuracy_score

from corex.metrics import catalog

CLASSES = ["negative", "typical", "indeterminate", "atypical"]


def probabilities_of(predicted: np.ndarray, k: int = 4) -> torch.Tensor:
    return torch.as_tensor(np.eye(k)[predicted] * 0.7 + 0.075)


def evaluator_value(labels: np.ndarray, predicted: np.ndarray) -> float:
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=0)
    ids = [f"s{i}" for i in range(len(labels))]
    batch = {"label": torch.as_tensor(labels), "study_id": ids, "image_id": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AUROC warns about the classes without positives
        evaluator.update(batch, {"classification": torch.log(probabilities_of(predicted)).float()})
        return evaluator.compute()["balanced_accuracy"]


def test_a_predicted_class_absent_from_the_labels_is_not_a_recall_of_zero():
    labels, predicted = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn: "y_pred contains classes not in y_true"
        expected = balanced_accuracy_score(labels, predicted)
    assert expected == 0.75
    assert evaluator_value(labels, predicted) == pytest.approx(expected)
    recompute = catalog().get("balanced_accuracy").recompute  # corex_eval's weighted_metrics, as compare uses it
    assert recompute(probabilities_of(predicted).numpy(), labels, np.ones((1, 4)))[0] == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_accuracy_equals_scikit_learn_with_and_without_sample_weights(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 40)  # class 3 never a label, sometimes predicted
    predicted = np.where(rng.random(40) < 0.6, labels, rng.integers(0, 4, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert evaluator_value(labels, predicted) == pytest.approx(balanced_accuracy_score(labels, predicted))
        recompute = catalog().get("balanced_accuracy").recompute
        weights = np.vstack([np.ones(40), rng.integers(0, 4, size=(6, 40))]).astype(float)
        weights[1, labels == 2] = 0.0  # a resample without class 2: it leaves the average
        got = recompute(probabilities_of(predicted).numpy(), labels, weights)
        for row, value in zip(weights, got):
            keep = row > 0
            assert value == pytest.approx(balanced_accuracy_score(labels[keep], predicted[keep], sample_weight=row[keep]))
