"""Multi-label training and evaluation: the head's masked BCE, the ``multilabel`` evaluator against
scikit-learn, thresholds chosen on validation, and ``corex run`` on tiny NIH and CheXpert layouts."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import corex_eval
import numpy as np
import pytest
import torch
from corex_eval import MultilabelEvaluator
from corex_eval.bootstrap import resample_counts
from corex_eval.multilabel import best_f1_thresholds, label_ap, label_auroc
from corex_heads import ClassificationHead
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from corex.errors import CorexError
from corex.interfaces import Calibrated, Evaluator, HasIntervals, SavesArtefacts
from corex.testing import assert_mirrors

NAMES = ["Atelectasis", "Cardiomegaly", "Pleural Effusion", "Hernia"]


def data(n: int = 80, seed: int = 0, unknown: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits correlated with random targets, some unknown; Hernia never positive."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, len(NAMES), generator=generator) < 0.35).float()
    labels[:, 3] = 0.0
    logits = 1.5 * labels + torch.randn(n, len(NAMES), generator=generator)
    logits[:10, 0] = 0.25  # ties
    labels[torch.rand(n, len(NAMES), generator=generator) < unknown] = -1.0
    return logits, labels


def batch(labels: torch.Tensor, studies=None, patients=None) -> dict:
    n = len(labels)
    studies = studies or [f"s{i}" for i in range(n)]
    return {"labels": labels, "label": torch.full((n,), -1), "study_id": studies, "image_id": [f"i{i}" for i in range(n)],
            "patient_id": patients or [f"p{i // 2}" for i in range(n)]}


def evaluate(logits, labels, **options) -> tuple[MultilabelEvaluator, dict]:
    evaluator = MultilabelEvaluator(class_names=NAMES, **{"bootstrap": 0, **options})
    evaluator.update(batch(labels), {"classification": logits})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluator, evaluator.compute()


# -- the head ---------------------------------------------------------------------------------------


def reference_bce(logits, labels, weights=None, smoothing=0.0) -> float:
    """Binary cross-entropy over the known entries, written out sample by sample."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            y = float(labels[b, c])
            if y < 0:
                continue
            y = y * (1 - smoothing) + smoothing / 2
            p = 1 / (1 + math.exp(-float(logits[b, c])))
            w = 1.0 if weights is None else weights[c]
            total += -w * (y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total / count


def test_the_head_masks_unknown_labels_in_its_binary_cross_entropy():
    logits, labels = data(12)
    head = ClassificationHead(channels=(8,), num_classes=4, multilabel=True)
    assert head.multilabel and head.loss(logits, batch(labels)).item() == pytest.approx(reference_bce(logits, labels), rel=1e-6)
    weighted = ClassificationHead(channels=(8,), num_classes=4, multilabel=True, class_weights=[1.0, 2.0, 0.5, 3.0],
                                  label_smoothing=0.1)
    expected = reference_bce(logits, labels, [1.0, 2.0, 0.5, 3.0], 0.1)
    assert weighted.loss(logits, batch(labels)).item() == pytest.approx(expected, rel=1e-6)
    # an unknown entry's logit gets no gradient; a known one does
    logits = logits.clone().requires_grad_()
    head.loss(logits, batch(labels)).backward()
    assert bool((logits.grad[labels < 0] == 0).all()) and bool((logits.grad[labels >= 0] != 0).all())


def test_a_batch_without_any_known_label_gives_a_zero_with_a_graph():
    head = ClassificationHead(channels=(8,), num_classes=4, multilabel=True)
    features = [torch.rand(3, 8, 2, 2, requires_grad=True)]
    loss = head.loss(head(features), batch(torch.full((3, 4), -1.0)))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # the graph reaches the head's weights
    assert head.fc.weight.grad is not None


def test_the_head_refuses_the_wrong_kind_of_data():
    logits, labels = data(4)
    single = ClassificationHead(channels=(8,), num_classes=4)
    with pytest.raises(CorexError, match="multilabel: true"):
        single.loss(logits, batch(labels))
    multi = ClassificationHead(channels=(8,), num_classes=4, multilabel=True)
    with pytest.raises(CorexError, match="no 'labels'"):
        multi.loss(logits, {"label": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(CorexError, match="differ"):
        multi.loss(logits[:, :3], batch(labels))
    assert ClassificationHead(channels=(8,), num_classes=1, multilabel=True).num_classes == 1


# -- the evaluator ----------------------------------------------------------------------------------


def test_registered_light_factory_and_protocols():
    factory = corex_eval.corex_evaluators()["multilabel"]
    assert factory is corex_eval.multilabel_evaluator
    assert_mirrors(factory, MultilabelEvaluator)
    evaluator = factory(class_names=NAMES)
    assert isinstance(evaluator, MultilabelEvaluator)
    assert all(isinstance(evaluator, p) for p in (Evaluator, HasIntervals, SavesArtefacts, Calibrated))


def test_per_label_auroc_and_ap_match_scikit_learn_without_the_unknown_entries():
    logits, labels = data()
    _, metrics = evaluate(logits, labels)
    probabilities = torch.sigmoid(logits).double().numpy()
    aurocs, aps = [], []
    for c, name in enumerate(["atelectasis", "cardiomegaly", "pleural_effusion"]):
        known = labels[:, c].numpy() >= 0
        y, p = labels[known, c].numpy(), probabilities[known, c]
        aurocs.append(roc_auc_score(y, p))
        aps.append(average_precision_score(y, p))
        assert metrics[f"multilabel/auroc/{name}"] == pytest.approx(aurocs[-1], abs=1e-12)
        assert metrics[f"multilabel/ap/{name}"] == pytest.approx(aps[-1], abs=1e-12)
    # Hernia has no positive: no AUROC, and it is left out of both macro averages
    assert math.isnan(metrics["multilabel/auroc/hernia"])
    assert metrics["multilabel/auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)
    assert metrics["multilabel/ap"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert (metrics["multilabel/labels"], metrics["multilabel/n"]) == (3, 80)


def test_weighted_scores_match_scikit_learn_sample_weights():
    """A bootstrap resample is a weighting: each row of counts must score as scikit-learn does with
    those counts as sample weights."""
    logits, labels = data(40, seed=3)
    probabilities = torch.sigmoid(logits).double()
    counts = resample_counts(torch.arange(40) // 2, 5, torch.Generator().manual_seed(1))
    auroc, ap = label_auroc(probabilities, labels, counts), label_ap(probabilities, labels, counts)
    for r in range(5):
        for c in range(3):
            known = (labels[:, c] >= 0) & (counts[r] > 0)
            y, p, w = labels[known, c].numpy(), probabilities[known, c].numpy(), counts[r, known].numpy()
            if 0 < y.sum() < len(y):
                assert auroc[r, c].item() == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
                assert ap[r, c].item() == pytest.approx(average_precision_score(y, p, sample_weight=w), abs=1e-12)


def test_thresholds_maximise_validation_f1_and_f1_is_scored_at_them(tmp_path):
    val_logits, val_labels = data(60, seed=1)
    logits, labels = data(50, seed=2)
    evaluator = MultilabelEvaluator(class_names=NAMES, bootstrap=0)
    evaluator.calibration_update(batch(val_labels), {"classification": val_logits})
    evaluator.update(batch(labels), {"classification": logits})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluator.compute()
    thresholds, sources = evaluator.thresholds
    assert sources == ["validation F1"] * 3 + ["default"]  # Hernia has no validation positive: 0.5
    val_p, p = torch.sigmoid(val_logits).double().numpy(), torch.sigmoid(logits).double().numpy()
    f1s = []
    for c in range(3):
        known = val_labels[:, c].numpy() >= 0
        y, scores = val_labels[known, c].numpy(), val_p[known, c]
        # brute force: every distinct validation score as the threshold, the highest on ties
        best = max(sorted(set(scores), reverse=True), key=lambda t: f1_score(y, scores >= t))
        assert thresholds[c].item() == best
        known = labels[:, c].numpy() >= 0
        f1s.append(f1_score(labels[known, c].numpy(), p[known, c] >= best))
        assert metrics[f"multilabel/f1/{evaluator.slugs[c]}"] == pytest.approx(f1s[-1], abs=1e-12)
    assert thresholds[3].item() == 0.5
    assert metrics["multilabel/f1"] == pytest.approx(np.mean(f1s), abs=1e-12)
    evaluator.reset()  # keeps the validation data
    assert evaluator.thresholds[0].tolist() == thresholds.tolist()
    fixed = MultilabelEvaluator(class_names=NAMES, threshold=0.3)
    fixed.calibration_update(batch(val_labels), {"classification": val_logits})
    assert fixed.thresholds == (pytest.approx([0.3] * 4), ["fixed"] * 4)


def test_best_f1_threshold_on_a_hand_made_ranking():
    # scores 0.9 + / 0.8 - / 0.7 + / 0.6 + / 0.2 -: F1 at 0.9 = 2/4, at 0.7 = 4/6, at 0.6 = 6/7 (the best)
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.2]], dtype=torch.float64)
    labels = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0]])
    thresholds, fitted = best_f1_thresholds(scores, labels)
    assert thresholds.tolist() == [0.6] and fitted == [True]


def test_study_level_averages_a_studys_images_and_resamples_patients(tmp_path):
    logits, labels = data(30, seed=4, unknown=0.0)
    # images 2i and 2i+1 are one study, with one target
    labels[1::2] = labels[0::2]
    studies = [f"s{i // 2}" for i in range(30)]
    evaluator = MultilabelEvaluator(class_names=NAMES, bootstrap=200, seed=3)
    evaluator.update(batch(labels, studies, [f"p{i // 4}" for i in range(30)]), {"classification": logits})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, intervals = evaluator.compute(), evaluator.intervals()
    mean = ((torch.sigmoid(logits[0::2]) + torch.sigmoid(logits[1::2])) / 2).double().numpy()
    assert metrics["multilabel/n"] == 15
    y = labels[0::2, 1].numpy()
    assert metrics["multilabel/auroc/cardiomegaly"] == pytest.approx(roc_auc_score(y, mean[:, 1]), abs=1e-12)
    low, high = intervals["multilabel/auroc"]
    assert low <= metrics["multilabel/auroc"] <= high and high - low > 0
    assert "multilabel/ap/cardiomegaly" in intervals and "multilabel/auroc/hernia" not in intervals
    assert evaluator.intervals() == intervals  # seeded
    labels[1, 0] = 1 - labels[0, 0]
    evaluator.reset()
    evaluator.update(batch(labels, studies), {"classification": logits})
    with pytest.raises(ValueError, match="different labels"):
        evaluator.compute()


def test_artefacts_record_the_thresholds(tmp_path):
    val_logits, val_labels = data(60, seed=1)
    logits, labels = data(20, seed=2)
    evaluator = MultilabelEvaluator(class_names=NAMES, bootstrap=0)
    evaluator.calibration_update(batch(val_labels), {"classification": val_logits})
    evaluator.update(batch(labels), {"classification": logits})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator.save(tmp_path)
    rows = list(csv.DictReader((tmp_path / "multilabel_per_label.csv").open()))
    assert [row["label"] for row in rows] == NAMES
    assert [row["threshold_from"] for row in rows] == ["validation F1"] * 3 + ["default"]
    assert float(rows[1]["threshold"]) == pytest.approx(evaluator.thresholds[0][1].item(), rel=1e-5)
    assert int(rows[0]["positives"]) + int(rows[0]["negatives"]) + int(rows[0]["unknown"]) == 20
    predictions = list(csv.DictReader((tmp_path / "multilabel_predictions.csv").open()))
    assert len(predictions) == 20 and set(predictions[0]) >= {"study_id", "p_hernia", "y_hernia", "patient_id"}
    unknown = int(labels[:, 0].lt(0).nonzero()[0])
    assert predictions[unknown]["y_atelectasis"] == ""


def test_wrong_inputs_are_named():
    evaluator = MultilabelEvaluator(class_names=NAMES)
    logits, labels = data(4)
    with pytest.raises(CorexError, match="no 'labels'"):
        evaluator.update({"label": torch.zeros(4), "study_id": ["a"] * 4, "image_id": ["a"] * 4}, {"classification": logits})
    with pytest.raises(ValueError, match=r"expected \(B, 4\)"):
        evaluator.update(batch(labels), {"classification": logits[:, :2]})
    with pytest.raises(ValueError, match="threshold"):
        MultilabelEvaluator(class_names=NAMES, threshold=1.5)
    empty = MultilabelEvaluator(class_names=NAMES).compute()
    assert empty["multilabel/n"] == 0 and math.isnan(empty["multilabel/auroc"])


def test_findings_name_the_best_and_worst_label(tmp_path):
    from corex_eval.findings import stage_findings

    val_logits, val_labels = data(60, seed=1)
    logits, labels = data(40, seed=2)
    evaluator = MultilabelEvaluator(class_names=NAMES, bootstrap=50)
    evaluator.calibration_update(batch(val_labels), {"classification": val_logits})
    evaluator.update(batch(labels), {"classification": logits})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, intervals = evaluator.compute(), evaluator.intervals()
        (tmp_path / "test").mkdir()
        evaluator.save(tmp_path / "test")
    found = stage_findings(tmp_path, "test", {"split": "test", "metrics": metrics, "intervals": intervals})
    texts = [f.text for f in found]
    assert texts[0].startswith(f"Macro AUROC {metrics['multilabel/auroc']:.2f} (95% interval")
    aurocs = {name: metrics[f"multilabel/auroc/{s}"] for name, s in zip(NAMES[:3], evaluator.slugs)}
    worst, best = min(aurocs, key=aurocs.get), max(aurocs, key=aurocs.get)
    assert any(f"best-separated finding is {best}" in t and f"the worst {worst}" in t for t in texts)
    assert any("3 of 4 findings at the F1-best threshold" in t for t in texts)
    assert not any(f.verdict for f in found)  # no single-label deploy rule applied to multi-label data


# -- end to end: corex run on tiny NIH and CheXpert layouts -----------------------------------------

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


def write_nih(root: Path, patients: int = 24) -> Path:
    """One or two PNGs per patient; Cardiomegaly images carry a bright block (something to learn)."""
    (root / "images").mkdir(parents=True)
    lines, test = [NIH_HEADER], []
    rng = np.random.default_rng(0)
    for p in range(1, patients + 1):
        for follow_up in range(1 + p % 2):
            name = f"{p:08d}_{follow_up:03d}.png"
            findings = ["Cardiomegaly"] * (p % 3 == 0) + ["Effusion"] * (p % 4 == 1) + ["Mass"] * (p % 5 == 2)
            pixels = rng.integers(0, 120, size=(40, 40), dtype=np.uint8)
            if "Cardiomegaly" in findings:
                pixels[12:30, 10:30] = 250
            Image.fromarray(pixels).save(root / "images" / name)
            lines.append(f"{name},{'|'.join(findings) or 'No Finding'},{follow_up},{p},{40 + p},{'MF'[p % 2]},PA")
            if p > patients - 7:
                test.append(name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(line.split(",")[0] for line in lines[1:] if line.split(",")[0] not in test) + "\n")
    return root


CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices")


def write_chexpert(parent: Path, train: int = 24, valid: int = 8) -> Path:
    """Frontal JPEGs of one study per patient, with uncertain (-1.0) and blank labels."""
    root = parent / "CheXpert-v1.0-small"
    rng = np.random.default_rng(1)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    for folder, count, first in (("train", train, 1), ("valid", valid, 64541)):
        rows = [header]
        for p in range(first, first + count):
            path = f"{folder}/patient{p:05d}/study1/view1_frontal.jpg"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 120, size=(40, 32), dtype=np.uint8)
            values = {"Cardiomegaly": ["1.0", "0.0", "", "-1.0"][p % 4], "Edema": ["0.0", "1.0", "-1.0"][p % 3],
                      "Support Devices": ["1.0", ""][p % 2]}
            if values["Cardiomegaly"] == "1.0":
                pixels[10:30, 8:24] = 250
            Image.fromarray(pixels).save(root / path, quality=95)
            rows.append([f"CheXpert-v1.0-small/{path}", "Female" if p % 2 else "Male", 50, "Frontal", "AP",
                         *(values.get(label, "") for label in CHEXPERT_LABELS)])
        with open(root / f"{folder}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return root


def run_recipe(corex_cli, tmp_path: Path, data: dict, name: str) -> dict:
    recipe = {
        "name": name, "seed": 0,
        "data": {"image_size": 32, "batch_size": 8, "workers": 1, "cache_dir": str(tmp_path / "cache"), **data},
        "model": {"encoder": {"name": "resnet18", "width": 8}},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "stages": {
            "train": {"kind": "train", "epochs": 2, "heads": {"classification": {"multilabel": True}},
                      "evaluators": [{"name": "multilabel", "bootstrap": 0}], "select": "multilabel/auroc"},
            "test": {"kind": "evaluate", "split": "test", "evaluators": [{"name": "multilabel", "bootstrap": 50}]},
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    code, _, err = corex_cli("--progress", "off", "run", path, "--out", tmp_path / "run")
    assert code == 0, err
    return json.loads((tmp_path / "run" / "results.json").read_text())


def check_run(tmp_path: Path, results: dict, labels: int) -> list[dict[str, str]]:
    train, test = results["stages"]["train"], results["stages"]["test"]
    assert "multilabel/auroc" in train["metrics"] and train["selected_on"] == "multilabel/auroc"
    metrics = test["metrics"]
    assert 0.0 <= metrics["multilabel/auroc"] <= 1.0 and 0.0 <= metrics["multilabel/ap"] <= 1.0
    assert metrics["multilabel/labels"] >= 1 and "multilabel/auroc" in test["intervals"]
    rows = list(csv.DictReader((tmp_path / "run" / "test" / "multilabel_per_label.csv").open()))
    assert len(rows) == labels
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert any(f["metric"] == "multilabel/auroc" for f in report["findings"])
    return rows


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:multilabel")  # a tiny test split lacks most findings
def test_nih_trains_and_evaluates_through_corex_run(corex_cli, tmp_path):
    root = write_nih(tmp_path / "nih")
    results = run_recipe(corex_cli, tmp_path, {"name": "nih_cxr14", "root": str(root), "val_fraction": 0.25}, "nih")
    rows = check_run(tmp_path, results, 14)
    by_name = {row["label"]: row for row in rows}
    assert by_name["Cardiomegaly"]["threshold_from"] == "validation F1"  # chosen on the validation split
    assert by_name["Hernia"]["threshold_from"] == "default" and by_name["Hernia"]["auroc"] == "nan"
    assert results["stages"]["test"]["metrics"]["multilabel/n"] == 10  # the official test list: 7 patients, 10 images


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:multilabel")
def test_chexpert_ignores_uncertain_labels_through_corex_run(corex_cli, tmp_path):
    root = write_chexpert(tmp_path / "data")
    results = run_recipe(corex_cli, tmp_path, {"name": "chexpert", "root": str(root), "test_fraction": 0.3}, "chexpert")
    rows = check_run(tmp_path, results, 14)
    cardiomegaly = {row["label"]: row for row in rows}["Cardiomegaly"]
    assert int(cardiomegaly["unknown"]) > 0  # the uncertain ones, left out of its scores
    assert cardiomegaly["threshold_from"] == "validation F1"
