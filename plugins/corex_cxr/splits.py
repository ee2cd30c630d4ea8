"""Patient-grouped, stratified train/val/test splits, k-fold, and nested label fractions.

* Grouping: a patient's every image lands in one split, so no patient is in two (the same chest
  seen in training and test would flatter every figure).
* Stratification: each patient gets one stratum, the most common label among their studies (ties
  go to the lower class index; patients with no labelled study form their own stratum). Within
  each stratum the patients are shuffled with the seed and cut into test, val and train;
  split sizes are apportioned over the strata by largest remainder, so every split's class
  proportions are within one patient per class of the whole's.
* k-fold (``folds > 0``): the test split is exactly the one above (same seed, same
  ``test_fraction``); the remaining patients are dealt, stratum by stratum, into ``folds`` folds
  and fold ``fold`` is the validation split; ``val_fraction`` is then unused.
* Label fractions (:func:`label_subset`): the labelled training studies of each class are
  ranked once by a seeded permutation and the first ``ceil(fraction * n)`` taken (at least one),
  so for one seed the 10% subset is inside the 50% subset: label-efficiency curves compare
  nested training sets.
* Multi-label sources (:func:`multilabel_strata`): a study's class for all of the above is its
  rarest positive label (fewest positive studies in the whole data set), or one more class for a
  study with no positive label, so rare findings are spread over the splits and kept in every
  label fraction.

Everything is a pure function of its inputs and the seed: ids are sorted before shuffling.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

SPLITS = ("train", "val", "test")
UNLABELLED = -1


def check_split_options(*, val_fraction: float, test_fraction: float, folds: int, fold: int) -> None:
    """Raise a specific ``ValueError`` for split options that are well-typed but wrong."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    if folds == 0 and val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must leave patients for training, got {val_fraction} + {test_fraction}."
        )
    if folds < 0 or folds == 1:
        raise ValueError(f"folds must be 0 (no cross-validation) or at least 2, got {folds}.")
    if folds and not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds - 1}] for folds={folds}, got {fold}.")
    if not folds and fold != 0:
        raise ValueError(f"fold={fold} needs folds >= 2 (cross-validation is off).")


def patient_stratum(study_labels: Iterable[int]) -> int:
    """The stratum of a patient: the most common label of their labelled studies, lowest on ties."""
    counts = Counter(label for label in study_labels if label != UNLABELLED)
    if not counts:
        return UNLABELLED
    return min(counts, key=lambda label: (-counts[label], label))


def multilabel_strata(study_labels: Mapping[str, Sequence[float]]) -> dict[str, int]:
    """Study id -> the index of its rarest positive label (``1.0``; the lower index on ties), or
    ``L`` (the number of labels) when it has none."""
    positives = Counter(i for labels in study_labels.values() for i, value in enumerate(labels) if value == 1.0)
    strata = {}
    for study, labels in study_labels.items():
        present = [i for i, value in enumerate(labels) if value == 1.0]
        strata[study] = min(present, key=lambda i: (positives[i], i)) if present else len(labels)
    return strata


def assign_splits(
    strata: Mapping[str, int],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 0,
    fold: int = 0,
    seed: int = 0,
) -> dict[str, str]:
    """Map every patient (``strata``: patient id -> stratum) to ``"train"``, ``"val"`` or ``"test"``."""
    check_split_options(val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, fold=fold)
    rng = random.Random(seed)
    groups: dict[int, list[str]] = {}
    for patient in sorted(strata):
        groups.setdefault(strata[patient], []).append(patient)
    order = sorted(groups)
    for stratum in order:  # shuffled before any count is decided: test does not depend on folds
        rng.shuffle(groups[stratum])

    sizes = [len(groups[stratum]) for stratum in order]
    n_test = _apportion(sizes, test_fraction)
    n_val = _apportion(sizes, val_fraction) if not folds else [0] * len(order)
    assignment: dict[str, str] = {}
    dealt = 0  # the k-fold deal continues across strata so folds stay equal in size
    for stratum, tests, vals in zip(order, n_test, n_val):
        for position, patient in enumerate(groups[stratum]):
            if position < tests:
                assignment[patient] = "test"
            elif folds:
                assignment[patient] = "val" if dealt % folds == fold else "train"
                dealt += 1
            else:
                assignment[patient] = "val" if position < tests + vals else "train"
    return assignment


def _apportion(sizes: list[int], fraction: float) -> list[int]:
    """Split ``round(fraction * sum(sizes))`` over groups in proportion (largest remainder)."""
    exact = [fraction * size for size in sizes]
    counts = [math.floor(value) for value in exact]
    missing = round(fraction * sum(sizes)) - sum(counts)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: max(missing, 0)]:
        counts[i] += 1
    return counts


def label_subset(study_labels: Mapping[str, int], fraction: float, seed: int = 0) -> set[str]:
    """A stratified, nested subset of the labelled studies (``study id -> label``).

    Per class, the studies are ranked by a permutation that depends only on ``seed`` and take
    the first ``ceil(fraction * n)`` (at least one); unlabelled studies are never chosen.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}.")
    rng = random.Random(f"label-fraction-{seed}")
    chosen: set[str] = set()
    for label in sorted(set(study_labels.values()) - {UNLABELLED}):
        studies = sorted(study for study, value in study_labels.items() if value == label)
        rng.shuffle(studies)
        take = max(1, math.ceil(fraction * len(studies) - 1e-9))  # 1e-9: 0.1 * 30 is 3.0000000000000004
        chosen.update(studies[:take])
    return chosen
