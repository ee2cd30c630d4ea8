"""The promises of corex_cxr.splits at their edges (issue 23: the survivors of mutation testing):
the option ranges, largest-remainder apportioning, exact sizes, k-fold deals for every fold count,
the smallest label subset, and the default seeds."""

from __future__ import annotations

from collections import Counter

import pytest
from corex_cxr.splits import assign_splits, check_split_options, label_subset


def check(**options) -> None:
    check_split_options(**{"val_fraction": 0.15, "test_fraction": 0.15, "folds": 0, "fold": 0, **options})


@pytest.mark.parametrize("key", ["val_fraction", "test_fraction"])
def test_a_fraction_may_be_zero_but_not_one_or_more(key):
    check(**{key: 0.0})
    for value in (1.0, 1.5, -0.01):
        # With folds the sum check is off: the fraction's own range must refuse it.
        with pytest.raises(ValueError, match=rf"{key} must be in \[0, 1\), got {value}"):
            check(**{key: value, "folds": 2})


def test_a_zero_validation_fraction_gives_no_validation_patients():
    strata = {f"p{i:02d}": i % 2 for i in range(20)}
    splits = Counter(assign_splits(strata, val_fraction=0.0, test_fraction=0.2).values())
    assert splits == {"train": 16, "test": 4}


def test_sizes_are_exact_and_apportioned_by_largest_remainder():
    # 10 patients of class 0 and 3 of class 1, 15% to test: round(1.95) = 2 patients; class 0's share
    # 1.5 has the larger remainder (0.5 against 0.45), so both go to class 0.
    strata = {**{f"a{i}": 0 for i in range(10)}, **{f"b{i}": 1 for i in range(3)}}
    splits = assign_splits(strata, val_fraction=0.0, test_fraction=0.15)
    assert Counter(strata[p] for p, s in splits.items() if s == "test") == {0: 2}
    # An exact share is taken as it is, never one more.
    one = {f"p{i}": 0 for i in range(10)}
    assert Counter(assign_splits(one, val_fraction=0.3, test_fraction=0.2).values()) == {"train": 5, "val": 3, "test": 2}


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_every_fold_count_deals_equal_folds_that_partition_the_non_test_patients(folds):
    strata = {f"p{i:02d}": i % 3 for i in range(31)}
    test = {p for p, s in assign_splits(strata, test_fraction=0.2, folds=folds, fold=0).items() if s == "test"}
    val_of = [{p for p, s in assign_splits(strata, test_fraction=0.2, folds=folds, fold=k).items() if s == "val"} for k in range(folds)]
    rest = set(strata) - test
    assert set().union(*val_of) == rest and sum(len(v) for v in val_of) == len(rest)  # each patient in exactly one fold
    assert max(map(len, val_of)) - min(map(len, val_of)) <= 1


def test_the_default_seeds_are_zero():
    strata = {f"p{i:02d}": i % 4 for i in range(40)}
    assert assign_splits(strata) == assign_splits(strata, seed=0)
    labels = {f"s{i:02d}": i % 4 for i in range(40)}
    assert label_subset(labels, 0.3) == label_subset(labels, 0.3, seed=0)
    assert label_subset(labels, 0.3) != label_subset(labels, 0.3, seed=1)


def test_the_smallest_label_subset_takes_one_study_per_class_and_a_fraction_above_one_is_refused():
    labels = {f"s{i:02d}": i % 2 for i in range(20)}
    chosen = label_subset(labels, 0.05)  # ceil(0.5) = 1 of the 10 studies of each class
    assert Counter(labels[s] for s in chosen) == {0: 1, 1: 1}
    for fraction in (0.0, 1.5, 2.0):
        with pytest.raises(ValueError, match=r"label_fraction must be in \(0, 1\]"):
            label_subset(labels, fraction)
