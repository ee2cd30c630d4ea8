"""Selective prediction: the risk-coverage curve, AURC and its excess over an oracle, checked against a
brute-force reference that averages over every order of tied confidences."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from corex_eval.classification import ClassificationEvaluator
from corex_eval.selective import (
    aurc,
    coverage_at_accuracy,
    oracle_aurc,
    risk_coverage,
    selective_accuracy,
)

CLASSES = ["negative", "typical", "indeterminate", "atypical"]


def orderings(confidence: list[float]):
    """Every order of the studies that ranks higher confidence first (ties in every possible order)."""
    levels = sorted(set(confidence), reverse=True)
    groups = [[i for i, c in enumerate(confidence) if c == level] for level in levels]
    for parts in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield [i for part in parts for i in part]


def naive_risks(order: list[int], correct: list[bool]) -> list[float]:
    """Error rate among the first k studies of ``order``, k = 1..N (Geifman and El-Yaniv's curve)."""
    risks, errors = [], 0
    for k, i in enumerate(order, start=1):
        errors += not correct[i]
        risks.append(errors / k)
    return risks


def reference(confidence: list[float], correct: list[bool]) -> tuple[list[float], float]:
    """The curve and AURC = mean of the risks, each averaged over all orders of the ties."""
    curves = [naive_risks(order, correct) for order in orderings(confidence)]
    mean_curve = [sum(c[k] for c in curves) / len(curves) for k in range(len(confidence))]
    return mean_curve, sum(mean_curve) / len(confidence)


CASES = [
    ([0.9, 0.8, 0.8, 0.8, 0.6, 0.6, 0.5], [True, False, True, True, False, True, False]),
    ([0.7, 0.7, 0.7, 0.7], [True, False, False, True]),                     # one tie group
    ([0.95, 0.9, 0.85, 0.8, 0.7], [True, True, True, False, False]),          # errors ranked last: the oracle
    ([0.95, 0.9, 0.85, 0.8, 0.7], [False, False, True, True, True]),          # errors ranked first
    ([0.5, 0.4, 0.4, 0.3, 0.3, 0.3, 0.2, 0.1], [True, False, True, False, True, True, False, True]),
    ([0.6, 0.6], [True, True]),
    ([0.6, 0.5], [False, False]),
]


@pytest.mark.parametrize(("confidence", "correct"), CASES)
def test_curve_and_aurc_match_the_brute_force_mean_over_tie_orders(confidence, correct):
    curve, area = reference(confidence, correct)
    c, k = torch.tensor(confidence), torch.tensor(correct)
    coverage, risk, oracle = risk_coverage(c, k)
    assert coverage.tolist() == pytest.approx([(i + 1) / len(c) for i in range(len(c))])
    assert risk.tolist() == pytest.approx(curve, abs=1e-12)
    assert float(aurc(c, k)) == pytest.approx(area, abs=1e-12)
    # The oracle: the same errors, every one of them ranked last.
    best = naive_risks(sorted(range(len(c)), key=lambda i: not correct[i]), correct)
    assert oracle.tolist() == pytest.approx(best, abs=1e-12)
    assert float(oracle_aurc(k)) == pytest.approx(sum(best) / len(best), abs=1e-12)
    assert float(aurc(c, k)) >= float(oracle_aurc(k)) - 1e-12


def test_aurc_ends_and_a_perfect_ranking_has_no_excess():
    c = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert float(aurc(c, torch.ones(4, dtype=torch.bool))) == 0.0
    assert float(aurc(c, torch.zeros(4, dtype=torch.bool))) == pytest.approx(1.0)
    ranked = torch.tensor([True, True, False, False])
    assert float(aurc(c, ranked)) == pytest.approx(float(oracle_aurc(ranked)))
    # Geifman et al.'s large-sample form of the oracle's area: r + (1 - r) ln(1 - r).
    n, errors = 20_000, 3_000
    correct = torch.arange(n) >= errors
    r = errors / n
    assert float(oracle_aurc(correct)) == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-3)


def test_arrival_order_does_not_matter():
    generator = torch.Generator().manual_seed(0)
    confidence = torch.randint(0, 5, (40,), generator=generator).float() / 5  # many ties
    correct = torch.rand(40, generator=generator) < 0.7
    permutation = torch.randperm(40, generator=generator)
    assert float(aurc(confidence, correct)) == pytest.approx(float(aurc(confidence[permutation], correct[permutation])))
    assert float(selective_accuracy(confidence, correct, 0.8)) == pytest.approx(
        float(selective_accuracy(confidence[permutation], correct[permutation], 0.8)))


def test_weights_count_a_study_that_many_times():
    confidence = torch.tensor([0.9, 0.8, 0.8, 0.8, 0.6, 0.6, 0.5])
    correct = torch.tensor([True, False, True, True, False, True, False])
    weights = torch.tensor([[2, 0, 1, 3, 1, 1, 2], [1, 1, 1, 1, 1, 1, 1], [0, 4, 0, 1, 2, 0, 1]], dtype=torch.float64)
    for row, w in enumerate(weights):
        repeated = torch.repeat_interleave(torch.arange(7), w.long())
        c, k = confidence[repeated], correct[repeated]
        assert float(aurc(confidence, correct, weights)[row]) == pytest.approx(float(aurc(c, k)))
        assert float(oracle_aurc(correct, weights)[row]) == pytest.approx(float(oracle_aurc(k)))
        for share in (0.9, 0.8, 0.5):
            assert float(selective_accuracy(confidence, correct, share, weights)[row]) == pytest.approx(
                float(selective_accuracy(c, k, share)))


def test_accuracy_at_a_coverage_and_the_coverage_at_a_target():
    confidence = [0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    correct = [True, True, True, True, False, True, True, False, True, False]
    c, k = torch.tensor(confidence), torch.tensor(correct)
    # Keeping the 8 (80%) most confident: 2 errors among them.
    assert float(selective_accuracy(c, k, 0.8)) == pytest.approx(6 / 8)
    assert float(selective_accuracy(c, k, 0.9)) == pytest.approx(7 / 9)
    assert float(selective_accuracy(c, k, 1.0)) == pytest.approx(0.7)
    # Accuracy among the k most confident: 1, 1, 1, 1, 0.8, 5/6, 6/7, 0.75, 7/9, 0.7.
    assert coverage_at_accuracy(c, k, 0.95) == pytest.approx(0.4)
    assert coverage_at_accuracy(c, k, 0.8) == pytest.approx(0.7)  # the largest k whose accuracy reaches 0.8
    assert coverage_at_accuracy(c, k, 1.0) == pytest.approx(0.4)
    assert coverage_at_accuracy(~k & k, torch.zeros(10, dtype=torch.bool), 0.5) == 0.0


def test_a_coverage_inside_a_tie_group_takes_its_expected_errors():
    # Four tied studies, one error among them: keeping two of them keeps half an error on average.
    c, k = torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([True, False, True, True])
    assert float(selective_accuracy(c, k, 0.5)) == pytest.approx(1 - 0.5 / 2)


def logits_batch(logits, labels):
    n = len(labels)
    return ({"label": torch.as_tensor(labels), "study_id": [f"s{i}" for i in range(n)], "image_id": [f"i{i}" for i in range(n)]},
            {"classification": torch.as_tensor(logits, dtype=torch.float32)})


def test_the_evaluator_ranks_by_the_calibrated_probabilities(tmp_path):
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (120,), generator=generator)
    logits = 3 * torch.randn(120, 4, generator=generator)
    logits[torch.arange(120), labels] += 3 * torch.rand(120, generator=generator)
    val_labels = torch.randint(0, 4, (80,), generator=generator)
    val_logits = 3 * torch.randn(80, 4, generator=generator)
    val_logits[torch.arange(80), val_labels] += 2.0
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=200, target_accuracy=0.9)
    evaluator.calibration_update(*logits_batch(val_logits, val_labels))
    evaluator.update(*logits_batch(logits, labels))
    metrics, intervals = evaluator.compute(), evaluator.intervals()
    temperature = metrics["temperature"]
    assert 0.05 < temperature < 20 and temperature != pytest.approx(1.0, abs=0.05)
    _, probabilities, scored_labels = evaluator.scored(temperature)
    confidence, predicted = probabilities.max(1)
    correct = predicted == scored_labels
    assert metrics["selective/aurc"] == pytest.approx(float(aurc(confidence, correct)))
    assert metrics["selective/e_aurc"] == pytest.approx(float(aurc(confidence, correct) - oracle_aurc(correct)))
    assert metrics["selective/accuracy_at_80"] == pytest.approx(float(selective_accuracy(confidence, correct, 0.8)))
    assert metrics["selective/coverage_at_target"] == pytest.approx(coverage_at_accuracy(confidence, correct, 0.9))
    for name in ("selective/aurc", "selective/e_aurc", "selective/accuracy_at_90", "selective/accuracy_at_80"):
        low, high = intervals[name]
        assert low <= metrics[name] <= high, name
    evaluator.save(tmp_path)
    assert (tmp_path / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"


def test_a_temperature_outside_the_sane_range_is_not_used_for_ranking():
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 4, (60,), generator=generator)
    logits = torch.randn(60, 4, generator=generator)
    evaluator = ClassificationEvaluator(class_names=CLASSES, bootstrap=0)
    # Every validation image right: the likelihood rises as T falls to 0, the fit stops at a tiny T.
    val_labels = torch.arange(40) % 4
    val_logits = torch.nn.functional.one_hot(val_labels, 4).float() * 5
    with pytest.warns(UserWarning, match="no temperature"):
        evaluator.calibration_update(*logits_batch(val_logits, val_labels))
        evaluator.update(*logits_batch(logits, labels))
        metrics = evaluator.compute()
    assert evaluator.temperature_problem == "no validation error" and evaluator.selective_temperature is None
    _, probabilities, scored_labels = evaluator.scored()
    confidence, predicted = probabilities.max(1)
    assert metrics["selective/aurc"] == pytest.approx(float(aurc(confidence, predicted == scored_labels)))
