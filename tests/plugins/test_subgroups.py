"""The subgroup evaluator: per-subgroup metrics against scikit-learn, the paired difference from the rest,
Holm's correction, and a planted harder subgroup found (and none found where none is planted)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

import corex
import corex_eval
from corex.testing import assert_mirrors
from corex_eval.subgroups import SubgroupEvaluator, correct_p_values

CLASSES = ["negative", "typical", "indeterminate", "atypical"]


def studies(n: int, seed: int, hard_margin: float | None = None, images: int = 1):
    """``n`` studies of one image each (or ``images``), with header metadata; AP portable studies get a
    smaller logit margin for their true class when ``hard_margin`` is given (a planted harder subgroup)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    view = rng.choice(["AP", "PA"], n, p=[0.55, 0.45])
    portable = np.where((view == "AP") & (rng.random(n) < 0.8), "yes", "no")
    sex = rng.choice(["F", "M"], n)
    age = rng.choice(["18-39", "40-59", "60-79", "80+", ""], n, p=[0.2, 0.3, 0.3, 0.15, 0.05])
    logits = rng.normal(0, 1, (n, 4))
    margin = np.full(n, 2.0)
    if hard_margin is not None:
        margin[(view == "AP") & (portable == "yes")] = hard_margin
    logits[np.arange(n), labels] += margin
    meta = {"view": list(view), "portable": list(portable), "sex": list(sex), "age_band": list(age)}
    batch = {"label": torch.as_tensor(labels).repeat_interleave(images),
             "study_id": [f"s{i}" for i in range(n) for _ in range(images)],
             "image_id": [f"s{i}-{j}" for i in range(n) for j in range(images)],
             "patient_id": [f"p{i // 2}" for i in range(n) for _ in range(images)],
             "meta": {k: [v for v in values for _ in range(images)] for k, values in meta.items()}}
    outputs = {"classification": torch.as_tensor(logits, dtype=torch.float32).repeat_interleave(images, 0)}
    return batch, outputs, labels, logits, meta


def evaluate(batch, outputs, **options):
    evaluator = SubgroupEvaluator(class_names=CLASSES, **options)
    evaluator.update(batch, outputs)
    return evaluator


def test_registered_and_mirrored():
    assert corex_eval.corex_evaluators()["subgroups"] is corex_eval.subgroups_evaluator
    assert_mirrors(corex_eval.subgroups_evaluator, SubgroupEvaluator)
    assert isinstance(corex_eval.subgroups_evaluator(class_names=CLASSES), SubgroupEvaluator)


def test_subgroup_metrics_and_differences_match_scikit_learn():
    batch, outputs, labels, logits, meta = studies(160, seed=1)
    evaluator = evaluate(batch, outputs, bootstrap=0)
    metrics = evaluator.compute()
    predicted = logits.argmax(1)
    probabilities = torch.softmax(torch.as_tensor(logits), 1).numpy()

    def sklearn_metrics(where):
        y, p, prob = labels[where], predicted[where], probabilities[where]
        present = sorted(set(y) | set(p))  # torchmetrics' convention: a class absent from both is left out
        aurocs = [roc_auc_score(y == c, prob[:, c]) for c in range(4) if 0 < (y == c).sum() < len(y)]
        return {"accuracy": accuracy_score(y, p), "macro_f1": f1_score(y, p, average="macro", labels=present),
                "balanced_accuracy": recall_score(y, p, average="macro", labels=present, zero_division=0),
                "auroc": float(np.mean(aurocs))}

    for field, value, key in [("view", "AP", "view=ap"), ("sex", "F", "sex=f"), ("age_band", "80+", "age_band=80plus")]:
        inside = np.array([v == value for v in meta[field]])
        expected, rest = sklearn_metrics(inside), sklearn_metrics(~inside)
        for metric in ("accuracy", "macro_f1", "balanced_accuracy", "auroc"):
            assert metrics[f"subgroup/{key}/{metric}"] == pytest.approx(expected[metric], abs=1e-6), (key, metric)
            assert metrics[f"subgroup/{key}/{metric}/difference"] == pytest.approx(expected[metric] - rest[metric], abs=1e-6)
    # Unknown values ("" age band) form no subgroup; 'mixed' and small groups are left out.
    assert not any(k.startswith("subgroup/age_band=/") for k in metrics)
    assert metrics["subgroups/tests"] == 0 and metrics["subgroups/worse"] == 0  # no bootstrap, no test


def test_a_studys_value_is_its_images_shared_value_or_mixed():
    batch, outputs, *_ = studies(60, seed=2, images=2)
    batch["meta"]["view"][0:2] = ["AP", "PA"]  # study s0 has one image of each view
    evaluator = evaluate(batch, outputs, bootstrap=0, min_studies=1)
    ids, values = evaluator.unit_values()
    assert len(ids) == 60
    assert values["view"][0] == "mixed"
    assert values["view"][1] == batch["meta"]["view"][2]
    assert any(k.startswith("subgroup/view=mixed/") for k in evaluator.compute())


def test_holm_and_bonferroni_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert correct_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert correct_p_values(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert correct_p_values([], "holm") == []


def flagged(evaluator) -> set[str]:
    return {row["key"] for row in evaluator.analysis()["rows"] if row["worse"]}


def test_a_planted_harder_subgroup_is_found():
    batch, outputs, *_ = studies(300, seed=3, hard_margin=0.3)
    evaluator = evaluate(batch, outputs, bootstrap=400)
    metrics = evaluator.compute()
    assert "portable=yes" in flagged(evaluator)
    assert flagged(evaluator) <= {"portable=yes", "view=ap"}  # AP is mostly portable: it is worse too
    low, high = evaluator.intervals()["subgroup/portable=yes/macro_f1/difference"]
    assert high < 0 and metrics["subgroups/worse"] >= 1
    # Every examined subgroup and metric counted in the correction.
    assert metrics["subgroups/tests"] == 4 * metrics["subgroups/examined"]


@pytest.mark.parametrize("seed", range(5))
def test_none_is_found_where_none_is_planted(seed):
    batch, outputs, *_ = studies(300, seed=10 + seed)
    evaluator = evaluate(batch, outputs, bootstrap=300)
    assert evaluator.compute()["subgroups/worse"] == 0 and not flagged(evaluator)


def test_artefacts_and_settings(tmp_path):
    batch, outputs, *_ = studies(200, seed=4, hard_margin=0.0)
    evaluator = evaluate(batch, outputs, bootstrap=200, correction="bonferroni")
    evaluator.compute()
    evaluator.save(tmp_path)
    rows = list(csv.DictReader((tmp_path / "subgroups.csv").open()))
    settings = json.loads((tmp_path / "subgroups.json").read_text())
    assert settings["correction"] == "bonferroni" and settings["tests"] == len(rows) == 4 * settings["subgroups"]
    assert {r["metric"] for r in rows} == {"macro_f1", "balanced_accuracy", "accuracy", "auroc"}
    assert any(r["worse"] == "yes" for r in rows)
    for r in rows:
        assert float(r["p_adjusted"]) == pytest.approx(min(1.0, float(r["p"]) * len(rows)), rel=1e-4)
    assert (tmp_path / "subgroups.png").read_bytes()[:4] == b"\x89PNG"


def test_data_without_metadata_examines_nothing(tmp_path):
    batch, outputs, *_ = studies(50, seed=5)
    del batch["meta"]
    evaluator = evaluate(batch, outputs)
    assert evaluator.compute() == {"subgroups/examined": 0.0, "subgroups/tests": 0.0, "subgroups/worse": 0.0}
    evaluator.save(tmp_path)
    assert not (tmp_path / "subgroups.png").exists()


@pytest.mark.parametrize(("options", "message"), [({"min_studies": 0}, "min_studies"), ({"alpha": 1.0}, "alpha"),
                                                  ({"correction": "sidak"}, "correction"), ({"fields": ("view+",)}, "fields")])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SubgroupEvaluator(class_names=CLASSES, **options)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_end_to_end_on_the_phantom_with_a_planted_subgroup_and_without(tmp_path, seed):
    """The whole path on real DICOM headers, both ways, on two training seeds. A tiny model trained on the
    phantom is scored on the same test patients twice: stage ``test`` reads the phantom with its AP portable
    films planted (``hard_subgroup: ap_portable`` at strength 1: their opacities are erased, their exposure
    fogged and noisy), stage ``clean`` the phantom as trained on. The planted subgroup must be flagged and
    nothing else but the AP view (mostly portable); nothing is flagged where nothing is planted."""
    data = {"name": "phantom", "image_size": 64, "size": 64, "batch_size": 16, "studies": 300, "difficulty": 0.0,
            "test_fraction": 0.4, "val_fraction": 0.1, "cache_dir": str(tmp_path / "cache"), "workers": 1}
    evaluators = [{"name": "classification", "bootstrap": 200}, {"name": "subgroups", "bootstrap": 500}]
    recipe = {
        "name": "planted", "seed": seed,
        "data": data,
        "model": {"encoder": {"name": "resnet18", "width": 8}},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "stages": {
            "train": {"kind": "train", "epochs": 6, "heads": {"classification": {}},
                      "evaluators": [{"name": "classification", "bootstrap": 0}]},
            "test": {"kind": "evaluate", "split": "test", "evaluators": evaluators,
                     "data": data | {"hard_subgroup": "ap_portable", "hard_subgroup_strength": 1.0}},
            "clean": {"kind": "evaluate", "split": "test", "evaluators": evaluators},
        },
    }
    results = corex.run(corex.load_recipe(recipe), out=tmp_path / "run", progress=False)
    planted, clean = results["stages"]["test"]["metrics"], results["stages"]["clean"]["metrics"]
    assert planted["subgroups/examined"] == clean["subgroups/examined"] >= 8  # the same headers: the same subgroups
    assert planted["subgroups/tests"] == 4 * planted["subgroups/examined"]
    worse = {}
    for stage in ("test", "clean"):
        rows = list(csv.DictReader((tmp_path / "run" / stage / "subgroups.csv").open()))
        worse[stage] = {(r["field"], r["group"]) for r in rows if r["worse"] == "yes"}
        assert (tmp_path / "run" / stage / "subgroups.png").exists()
    assert worse["clean"] == set()
    assert ("portable", "yes") in worse["test"] and worse["test"] <= {("portable", "yes"), ("view", "AP")}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    texts = {f["stage"]: [] for f in report["findings"]}
    for f in report["findings"]:
        texts[f["stage"]].append(f["text"])
    assert any(t.startswith("No subgroup is worse than the rest of the split beyond chance (Holm over") for t in texts["clean"])
    assert any(t.startswith("Studies with portable yes (n=") and "worse beyond chance after Holm over" in t for t in texts["test"])
    # The planted stage reads its own data: the external-validation findings set it against the training data.
    assert any(t.startswith("External data: the header metadata of the test split of stage test's own data") for t in texts["test"])
    assert any(t.startswith("External data: decoded pixel intensities of the test split of stage test's own data") for t in texts["test"])
    assert any(t.startswith("External against internal validation") for t in texts["test"])
