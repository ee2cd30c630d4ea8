"""corex_cxr.splits: patient-grouped stratified splits, k-fold, nested label fractions."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from corex_cxr.splits import assign_splits, check_split_options, label_subset, multilabel_strata, patient_stratum

BALANCE = (0.28, 0.47, 0.17, 0.08)  # roughly the competition's class frequencies


def synthetic_patients(count: int = 400, seed: int = 1) -> dict[str, int]:
    rng = random.Random(seed)
    return {f"patient-{i:04d}": rng.choices(range(4), BALANCE)[0] for i in range(count)}


def proportions(strata: dict[str, int], patients) -> list[float]:
    counts = Counter(strata[p] for p in patients)
    return [counts[k] / max(1, sum(counts.values())) for k in range(4)]


def test_every_patient_in_exactly_one_split_with_close_class_proportions():
    strata = synthetic_patients()
    assignment = assign_splits(strata, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert set(assignment) == set(strata) and set(assignment.values()) == {"train", "val", "test"}
    by_split = {name: [p for p, s in assignment.items() if s == name] for name in ("train", "val", "test")}
    assert len(by_split["test"]) == 60 and len(by_split["val"]) == 60  # 15 % of 400, exactly
    overall = proportions(strata, strata)
    for name, patients in by_split.items():
        for share, expected in zip(proportions(strata, patients), overall):
            assert abs(share - expected) < 0.02, (name, share, expected)


def test_splits_are_deterministic_by_seed():
    strata = synthetic_patients()
    first = assign_splits(strata, seed=3)
    assert first == assign_splits(dict(reversed(list(strata.items()))), seed=3)  # input order is irrelevant
    assert first != assign_splits(strata, seed=4)


def test_k_fold_keeps_the_test_split_and_rotates_validation():
    strata = synthetic_patients(300)
    plain = assign_splits(strata, test_fraction=0.2, seed=0)
    test = {p for p, s in plain.items() if s == "test"}
    vals = []
    for fold in range(5):
        folded = assign_splits(strata, test_fraction=0.2, folds=5, fold=fold, seed=0)
        assert {p for p, s in folded.items() if s == "test"} == test
        vals.append({p for p, s in folded.items() if s == "val"})
    assert sum(map(len, vals)) == len(strata) - len(test)  # the folds partition the rest
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1 :])
    assert max(map(len, vals)) - min(map(len, vals)) <= 1


def test_patient_stratum_is_the_most_common_study_label():
    assert patient_stratum([2, 1, 2]) == 2
    assert patient_stratum([3, 1]) == 1  # ties: the lower index
    assert patient_stratum([-1, 3]) == 3 and patient_stratum([-1]) == -1


def test_label_fractions_are_nested_stratified_and_keep_every_class():
    rng = random.Random(0)
    studies = {f"study-{i:03d}": rng.choices(range(4), BALANCE)[0] for i in range(300)}
    studies.update({"unlabelled-1": -1, "unlabelled-2": -1})
    tenth, half, full = (label_subset(studies, f, seed=7) for f in (0.1, 0.5, 1.0))
    assert tenth < half < full and "unlabelled-1" not in full
    assert full == {s for s, label in studies.items() if label >= 0}
    per_class = Counter(studies.values())
    for label in range(4):
        chosen = sum(studies[s] == label for s in tenth)
        assert chosen == max(1, -(-per_class[label] // 10))  # ceil(n / 10), at least one
    assert label_subset(studies, 0.1, seed=7) == tenth and label_subset(studies, 0.1, seed=8) != tenth
    assert {studies[s] for s in label_subset(studies, 0.001, seed=7)} == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"val_fraction": 1.2}, "val_fraction must be in"),
        ({"test_fraction": -0.1}, "test_fraction must be in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leave patients for training"),
        ({"folds": 1}, "folds must be 0"),
        ({"folds": 5, "fold": 5}, r"fold must be in \[0, 4\]"),
        ({"fold": 2}, "needs folds >= 2"),
    ],
)
def test_wrong_split_options_get_specific_errors(options, message):
    arguments = {"val_fraction": 0.15, "test_fraction": 0.15, "folds": 0, "fold": 0, **options}
    with pytest.raises(ValueError, match=message):
        check_split_options(**arguments)


def test_wrong_label_fraction_is_refused():
    with pytest.raises(ValueError, match="label_fraction must be in"):
        label_subset({"a": 0}, 0.0)


def test_multilabel_strata_are_the_rarest_positive_label():
    studies = {
        "a": (1.0, 0.0, 0.0),  # label 0: 3 positive studies, label 1: 2, label 2: 1
        "b": (1.0, 1.0, 0.0),
        "c": (1.0, 1.0, 1.0),
        "d": (0.0, 0.0, 0.0),  # nothing positive: a stratum of its own (3)
        "e": (-1.0, 0.0, -1.0),  # unknown is not positive
    }
    assert multilabel_strata(studies) == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 3}
    assert multilabel_strata({"x": (1.0, 1.0), "y": (1.0, 1.0)}) == {"x": 0, "y": 0}  # ties: lower index
