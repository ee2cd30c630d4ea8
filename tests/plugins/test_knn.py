"""The ``knn`` evaluator: a weighted cosine kNN on pooled encoder features, against a brute-force
reference written here, and right after a pre-training stage through ``corex.run``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import corex_eval
import pytest
import torch
from corex_eval import KnnEvaluator
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

import corex
from corex.errors import CorexError
from corex.interfaces import (
    Calibrated,
    Evaluator,
    HasIntervals,
    LearnsFromTraining,
    NeedsModel,
    SavesArtefacts,
)
from corex.testing import TOY_CLASSES, assert_mirrors, tiny_recipe_dict

CLASSES = ["a", "b", "c"]


class StubEncoder:
    """A 'pyramid' whose deepest map is the image itself seen as 2x2 maps of 4 channels, shifted to
    [-1, 1] so that cosine similarities take both signs."""

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        b = images.shape[0]
        deepest = (images.reshape(b, 4, 2, 2) * 2 - 1)
        return [torch.zeros(b, 1, 4, 4), deepest]


class StubModel:
    encoder = StubEncoder()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def batch(image: torch.Tensor, label=None, labels=None, studies=None, offset: int = 0) -> dict:
    n = len(image)
    out = {"image": image, "study_id": studies or [f"s{offset + i}" for i in range(n)],
           "image_id": [f"i{offset + i}" for i in range(n)], "patient_id": [f"p{(offset + i) // 2}" for i in range(n)]}
    out["label"] = torch.full((n,), -1) if label is None else torch.as_tensor(label)
    if labels is not None:
        out["labels"] = labels
    return out


def pooled(image: torch.Tensor) -> list[list[float]]:
    """The evaluator's feature, written out: the mean of each channel's 2x2 map, L2-normalised."""
    rows = []
    for x in StubModel.encoder(image[None])[-1][0]:
        rows.append(float(x.mean()))
    norm = math.sqrt(sum(v * v for v in rows))
    return [v / norm for v in rows]


def neighbours(query: torch.Tensor, bank: list[torch.Tensor], k: int, temperature: float) -> list[tuple[int, float]]:
    """The k most similar bank images by cosine similarity, each with its vote weight exp(s / T).

    In float64; the evaluator works in float32, hence the tolerance of the comparisons (1e-5).
    """
    q = pooled(query)
    similarities = []
    for j, image in enumerate(bank):
        b = pooled(image)
        similarities.append((sum(x * y for x, y in zip(q, b)), j))
    similarities.sort(reverse=True)
    return [(j, math.exp(s / temperature)) for s, j in similarities[:k]]


def reference_votes(queries, bank, bank_labels, k, temperature, classes) -> list[list[float]]:
    out = []
    for query in queries:
        votes = [0.0] * classes
        for j, weight in neighbours(query, bank, k, temperature):
            votes[bank_labels[j]] += weight
        total = sum(votes)
        out.append([v / total for v in votes])
    return out


def fed(evaluator: KnnEvaluator, train: dict, scored: dict) -> KnnEvaluator:
    evaluator.training_update(train, {}, model=StubModel())
    evaluator.update(scored, {}, model=StubModel())
    return evaluator


def test_registered_light_factory_and_protocols():
    factory = corex_eval.corex_evaluators()["knn"]
    assert factory is corex_eval.knn_evaluator
    assert_mirrors(factory, KnnEvaluator)
    evaluator = factory(class_names=CLASSES)
    assert (evaluator.k, evaluator.temperature) == (20, 0.07)  # solo-learn's WeightedKNNClassifier, Wu et al. 2018
    assert all(isinstance(evaluator, p) for p in (Evaluator, LearnsFromTraining, NeedsModel, HasIntervals, SavesArtefacts))
    assert evaluator.needs_model and not isinstance(evaluator, Calibrated)


@pytest.mark.parametrize(("k", "temperature"), [(5, 0.07), (1, 0.5), (200, 0.1)])
def test_votes_match_a_brute_force_reference(k, temperature, tmp_path):
    train_images, test_images = images(40, 0), images(25, 1)
    train_labels = [i % 3 for i in range(40)]
    train_labels[3] = -1  # an unlabelled training image never votes
    test_labels = [(i * 7) % 3 for i in range(25)]
    test_labels[4] = -1  # nor is an unlabelled scored image scored
    evaluator = fed(KnnEvaluator(class_names=CLASSES, k=k, temperature=temperature, level="image", bootstrap=0),
                    batch(train_images, train_labels), batch(test_images, test_labels, offset=100))
    bank = [train_images[j] for j in range(40) if train_labels[j] >= 0]
    bank_labels = [y for y in train_labels if y >= 0]
    kept = [i for i in range(25) if test_labels[i] >= 0]
    expected = reference_votes([test_images[i] for i in kept], bank, bank_labels, k, temperature, 3)
    scored = evaluator.scored()
    assert scored.ids == [f"i{100 + i}" for i in kept]
    assert scored.probabilities.tolist() == [pytest.approx(row, abs=1e-5) for row in expected]
    y_true = [test_labels[i] for i in kept]
    y_pred = [max(range(3), key=lambda c: row[c]) for row in expected]
    metrics = evaluator.compute()
    assert metrics["knn/accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert metrics["knn/macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
    assert metrics["knn/balanced_accuracy"] == pytest.approx(recall_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
    assert (metrics["knn/n"], metrics["knn/n_train"]) == (24, 39)
    evaluator.save(tmp_path)
    rows = list(csv.DictReader((tmp_path / "knn_predictions.csv").open()))
    assert [row["predicted"] for row in rows] == [CLASSES[p] for p in y_pred]
    assert set(rows[0]) == {"image_id", "label", "predicted", "p_a", "p_b", "p_c", "patient_id"}


def test_study_level_averages_vote_shares_and_intervals_resample_patients():
    train_images, test_images = images(30, 2), images(20, 3)
    train_labels = [i % 3 for i in range(30)]
    test_labels = [(i // 2) % 3 for i in range(20)]
    studies = [f"s{i // 2}" for i in range(20)]
    evaluator = fed(KnnEvaluator(class_names=CLASSES, k=7, bootstrap=100, seed=1),
                    batch(train_images, train_labels), batch(test_images, test_labels, studies=studies))
    votes = torch.tensor(reference_votes(list(test_images), list(train_images), train_labels, 7, 0.07, 3), dtype=torch.float64)
    scored = evaluator.scored()
    assert scored.ids == [f"s{i}" for i in range(10)]
    assert torch.allclose(scored.probabilities, (votes[0::2] + votes[1::2]) / 2)
    metrics, intervals = evaluator.compute(), evaluator.intervals()
    assert metrics["knn/n"] == 10
    for name in ("knn/accuracy", "knn/balanced_accuracy", "knn/macro_f1"):
        low, high = intervals[name]
        assert low <= metrics[name] <= high
    assert evaluator.intervals() == intervals
    evaluator.reset()  # the bank stays
    evaluator.update(batch(test_images, test_labels, studies=studies), {}, model=StubModel())
    assert evaluator.compute() == metrics


def test_a_small_temperature_does_not_overflow():
    evaluator = fed(KnnEvaluator(class_names=CLASSES, k=10, temperature=0.001, level="image", bootstrap=0),
                    batch(images(20, 4), [i % 3 for i in range(20)]), batch(images(5, 5), [0, 1, 2, 0, 1]))
    probabilities = evaluator.scored().probabilities
    assert bool(torch.isfinite(probabilities).all()) and torch.allclose(probabilities.sum(1), torch.ones(5, dtype=torch.float64))


def test_multilabel_scores_match_a_brute_force_reference():
    train_images, test_images = images(30, 6), images(16, 7)
    generator = torch.Generator().manual_seed(8)
    train_labels = (torch.rand(30, 3, generator=generator) < 0.4).float()
    train_labels[torch.rand(30, 3, generator=generator) < 0.3] = -1.0
    train_labels[:, 2] = -1.0
    train_labels[0, 2] = 1.0  # label c: known for one training image only
    test_labels = (torch.rand(16, 3, generator=generator) < 0.5).float()
    k, temperature = 6, 0.1
    evaluator = fed(KnnEvaluator(class_names=CLASSES, k=k, temperature=temperature, level="image", bootstrap=0),
                    batch(train_images, labels=train_labels), batch(test_images, labels=test_labels, offset=50))
    expected = []
    for query in test_images:
        found = neighbours(query, list(train_images), k, temperature)
        row = []
        for c in range(3):
            known = [(j, w) for j, w in found if train_labels[j, c] >= 0]
            if known:
                row.append(sum(w for j, w in known if train_labels[j, c] == 1) / sum(w for _, w in known))
            else:  # no neighbour knows it: the label's share of positives in the bank
                row.append(float((train_labels[:, c] == 1).sum() / (train_labels[:, c] >= 0).sum()))
        expected.append(row)
    scored = evaluator.scored()
    assert scored.probabilities.tolist() == [pytest.approx(row, abs=1e-5) for row in expected]
    metrics = evaluator.compute()
    aurocs = []
    for c, name in enumerate(CLASSES):
        aurocs.append(roc_auc_score(test_labels[:, c].numpy(), [row[c] for row in expected]))
        assert metrics[f"knn/auroc/{name}"] == pytest.approx(aurocs[-1], abs=1e-12)
    assert metrics["knn/auroc"] == pytest.approx(sum(aurocs) / 3, abs=1e-12)
    assert "knn/accuracy" not in metrics and metrics["knn/n_train"] == 30


def test_mistakes_are_named():
    evaluator = KnnEvaluator(class_names=CLASSES)
    evaluator.update(batch(images(4, 0), [0, 1, 2, 0]), {}, model=StubModel())
    with pytest.raises(CorexError, match="no labelled training image"):
        evaluator.compute()
    with pytest.raises(ValueError, match="needs the model"):
        evaluator.update(batch(images(4, 0), [0, 1, 2, 0]), {})
    with pytest.raises(CorexError, match="multi-label"):
        evaluator.training_update(batch(images(2, 0), labels=torch.zeros(2, 3)), {}, model=StubModel())
    for options, message in (({"k": 0}, "k must"), ({"temperature": 0.0}, "temperature"), ({"level": "patient"}, "level")):
        with pytest.raises(ValueError, match=message):
            KnnEvaluator(class_names=CLASSES, **options)


def test_a_train_stage_refuses_it(corex_cli, tmp_path):
    recipe = tiny_recipe_dict()
    recipe["stages"]["train"]["evaluators"] = ["knn"]
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    code, out, err = corex_cli("validate", path)
    assert code == 2 and "learns from the training split" in out + err


@pytest.mark.slow
def test_knn_judges_a_pretrained_encoder_without_heads(corex_pm, tmp_path):
    recipe = tiny_recipe_dict()
    recipe["stages"] = {
        "pretrain": {"kind": "pretrain", "epochs": 1, "augment": "moco_cxr",
                     "objective": {"name": "moco", "queue_size": 16, "key_momentum": 0.99}},
        "knn": {"kind": "evaluate", "split": "test", "evaluators": [{"name": "knn", "k": 10, "bootstrap": 50}]},
    }
    results = corex.run(corex.load_recipe(recipe), out=tmp_path / "run", progress=False)
    metrics = results["stages"]["knn"]["metrics"]
    assert "loss" not in metrics  # the model has no head
    assert (metrics["knn/n"], metrics["knn/n_train"]) == (32, 96)  # the toy's test and training splits
    assert all(0.0 <= metrics[f"knn/{m}"] <= 1.0 for m in ("accuracy", "balanced_accuracy", "macro_f1"))
    assert "knn/macro_f1" in results["stages"]["knn"]["intervals"]
    rows = list(csv.DictReader((Path(tmp_path) / "run" / "knn" / "knn_predictions.csv").open()))
    assert len(rows) == 32 and {row["label"] for row in rows} == set(TOY_CLASSES)
    report = json.loads((Path(tmp_path) / "run" / "report.json").read_text())
    finding = next(f for f in report["findings"] if f["metric"] == "knn/macro_f1")
    assert "without fine-tuning, 96 training images voting" in finding["text"] and "(chance: 0.25)" in finding["text"]
