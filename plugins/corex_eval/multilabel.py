"""Multi-label evaluator: per-finding AUROC, AP and F1 with patient-clustered bootstrap intervals.

NIH ChestX-ray14 and CheXpert label each radiograph with 14 findings that may co-occur, so a model
gives one probability per finding (a sigmoid per logit, :class:`corex_heads.ClassificationHead`
with ``multilabel: true``) and each finding is scored as its own binary problem. Entries of the
target that are unknown (``-1``: CheXpert's uncertain labels under ``uncertain: ignore``) are left
out of that finding's scores, never counted as negatives.

The building blocks (:func:`label_auroc`, :func:`label_ap`, :func:`label_f1`,
:func:`best_f1_thresholds`) take ``(R, N)`` weightings, so a bootstrap's resamples are scored at
once, as in :mod:`corex_eval.classification`; the ``knn`` evaluator reuses them for its per-label
scores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from corex.errors import CorexError
from corex_eval.artefacts import number, slug, write_csv
from corex_eval.average_precision import precision_recall_steps
from corex_eval.bootstrap import cluster_index, percentile_intervals, resample_blocks
from corex_eval.classification import weighted_auroc

PREFIX = "multilabel"
DEFAULT_THRESHOLD = 0.5


# -- per-label scores under weightings ------------------------------------------------------------


def _ones(n: int) -> Tensor:
    return torch.ones(1, n, dtype=torch.float64)


def defined_labels(labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """``(R, L)`` bool: whether each label has a known positive *and* a known negative under each weighting
    (the labels the macro averages run over)."""
    weights = _ones(len(labels)) if weights is None else weights.double()
    positive = weights @ (labels == 1).double()
    negative = weights @ (labels == 0).double()
    return (positive > 0) & (negative > 0)


def label_auroc(probabilities: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """AUROC of each label over its known entries, ``(R, L)``: the weighted Mann-Whitney count of
    :func:`corex_eval.classification.weighted_auroc` (ties count one half). ``nan`` where a label has no
    known positive or no known negative."""
    weights = _ones(len(labels)) if weights is None else weights.double()
    columns = []
    for c in range(labels.shape[1]):
        known = labels[:, c] >= 0
        if not bool(known.any()):
            columns.append(torch.full((weights.shape[0],), math.nan, dtype=torch.float64))
            continue
        target = (labels[known, c] == 1).double()[:, None]
        columns.append(weighted_auroc(probabilities[known, c][:, None], target, weights[:, known])[:, 0])
    return torch.stack(columns, 1)


def label_ap(probabilities: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Average precision of each label over its known entries, ``(R, L)``, as scikit-learn's
    ``average_precision_score`` computes it: ``sum_n (R_n - R_{n-1}) * P_n`` over the distinct
    thresholds, without VOC's precision envelope (the usual figure for NIH ChestX-ray14 and CheXpert;
    ``corex_eval.average_precision`` has the enveloped one the SIIM challenge used). ``nan`` where a
    label has no known positive."""
    weights = _ones(len(labels)) if weights is None else weights.double()
    columns = []
    for c in range(labels.shape[1]):
        known = labels[:, c] >= 0
        if not bool(known.any()):
            columns.append(torch.full((weights.shape[0],), math.nan, dtype=torch.float64))
            continue
        recall, precision, _ = precision_recall_steps(probabilities[known, c], labels[known, c] == 1, weights[:, known])
        step = torch.diff(recall, dim=1, prepend=torch.zeros_like(recall[:, :1]))
        ap = (step * precision).sum(1)
        columns.append(torch.where(recall[:, -1].isnan(), torch.nan, ap))
    return torch.stack(columns, 1)


def label_counts(probabilities: Tensor, labels: Tensor, thresholds: Tensor, weights: Tensor | None = None) -> dict[str, Tensor]:
    """True positives, false positives and false negatives ``(R, L)`` of ``probability >= threshold``
    over the known entries."""
    weights = _ones(len(labels)) if weights is None else weights.double()
    predicted = probabilities >= thresholds.to(probabilities.dtype)
    positive, negative = labels == 1, labels == 0
    return {"tp": weights @ (predicted & positive).double(), "fp": weights @ (predicted & negative).double(),
            "fn": weights @ (~predicted & positive).double()}


def label_f1(probabilities: Tensor, labels: Tensor, thresholds: Tensor, weights: Tensor | None = None) -> Tensor:
    """F1 of each label at its threshold (``probability >= threshold`` is positive), over the known
    entries, ``(R, L)``; ``nan`` where a label has neither a positive nor a predicted positive."""
    counts = label_counts(probabilities, labels, thresholds, weights)
    return 2 * counts["tp"] / (2 * counts["tp"] + counts["fp"] + counts["fn"])


def macro(values: Tensor, defined: Tensor) -> Tensor:
    """The mean over the labels ``defined`` (``(R, L)`` each), ``nan`` in a row where none is."""
    values = torch.where(defined, values, torch.nan)
    return values.nanmean(1)


def best_f1_thresholds(probabilities: Tensor, labels: Tensor, fallback: float = DEFAULT_THRESHOLD) -> tuple[Tensor, list[bool]]:
    """Per label, the threshold maximising F1 over its known entries, and whether it was fitted.

    The candidates are the label's distinct scores (a sample is positive when its probability is at
    least the threshold); among equal F1s the highest threshold wins (the fewest positive calls).
    A label without a known positive keeps ``fallback``.
    """
    thresholds, fitted = [], []
    for c in range(labels.shape[1]):
        known = labels[:, c] >= 0
        scores, positive = probabilities[known, c].double(), (labels[known, c] == 1).double()
        if not bool(positive.any()):
            thresholds.append(fallback)
            fitted.append(False)
            continue
        order = scores.argsort(descending=True, stable=True)
        score, hit = scores[order], positive[order]
        true_positive, called = hit.cumsum(0), torch.arange(1, len(score) + 1, dtype=torch.float64)
        last_of_group = torch.ones(len(score), dtype=torch.bool)
        last_of_group[:-1] = score[1:] != score[:-1]
        f1 = 2 * true_positive / (called + positive.sum())
        f1, candidates = f1[last_of_group], score[last_of_group]
        thresholds.append(float(candidates[int(f1.argmax())]))
        fitted.append(True)
    return torch.tensor(thresholds, dtype=torch.float64), fitted


# -- the evaluator --------------------------------------------------------------------------------


class MultilabelEvaluator:
    """Score the ``(B, L)`` logits of a multi-label classification head against the batch's ``labels``.

    Every finding is a binary problem: its probability is ``sigmoid(logit)`` and its target the
    batch's ``labels`` column (1 positive, 0 negative, -1 unknown: left out of that finding only).

    Scoring level: with ``level="study"`` (default) the probabilities of a study's images are
    averaged and each study counts once (a study's images must carry the same labels); NIH
    ChestX-ray14 makes every image its own study, CheXpert's frontal and lateral views of one study
    share it. ``level="image"`` scores every image.

    Metrics (:meth:`compute`), each finding named by :func:`~corex.metrics.slug` of its class name:

    * ``multilabel/auroc/<label>``, ``multilabel/ap/<label>`` (scikit-learn's average precision) and
      ``multilabel/f1/<label>`` at the label's threshold;
    * ``multilabel/auroc``, ``multilabel/ap``, ``multilabel/f1``: their means over the labels with at
      least one known positive and one known negative among the scored units (others are left out,
      with a warning naming them); ``multilabel/labels`` counts those labels;
    * ``multilabel/n``: the scored studies (or images).

    Thresholds: with ``threshold`` unset, each label's is the one that maximises its F1 on the
    validation split (streamed through :meth:`calibration_update` by the engine before an evaluate
    stage on another split), 0.5 for a label without a validation positive, or for every label when
    no validation data came (a train stage's validation, an evaluate stage on ``val``). A number
    fixes every label's threshold. They are written to ``multilabel_per_label.csv``.
    :meth:`reset` keeps the validation data; :meth:`reset_calibration` drops it.

    :meth:`intervals`: 95% percentile-bootstrap intervals of the three macro averages and of each
    label's AUROC and AP, ``bootstrap`` resamples of *patients* (each with all its studies, as in
    :mod:`corex_eval.bootstrap`) with a fixed ``seed``; thresholds stay at their fitted values.
    """

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        head: str = "classification",
        level: Literal["study", "image"] = "study",
        threshold: float | None = None,
        bootstrap: int = 1000,
        seed: int = 0,
        split: str = "test",
    ) -> None:
        slugs = [slug(name) for name in class_names]
        if not slugs:
            raise ValueError("class_names is empty: the multilabel evaluator needs the data's label names.")
        if "" in slugs or len(set(slugs)) != len(slugs):
            raise ValueError(f"class_names {list(class_names)!r} give clashing metric names {slugs!r}.")
        if level not in ("study", "image"):
            raise ValueError(f"level must be 'study' or 'image', got {level!r}.")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1 (or be unset: fitted on validation), got {threshold}.")
        if bootstrap < 0:
            raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}.")
        self.class_names = list(class_names)
        self.slugs = slugs
        self.head = head
        self.level = level
        self.threshold = threshold
        self.bootstrap = bootstrap
        self.seed = seed
        self.split = split
        self.reset()
        self.reset_calibration()

    def reset(self) -> None:
        """Forget the scored data (the validation data stay: see :meth:`reset_calibration`)."""
        self._scored = LabelStore(len(self.class_names))

    def reset_calibration(self) -> None:
        self._calibration = LabelStore(len(self.class_names))
        self._thresholds: tuple[Tensor, list[str]] | None = None

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        self._scored.add(self._probabilities(outputs), batch)

    def calibration_update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        """Collect validation probabilities to choose each label's threshold on."""
        self._calibration.add(self._probabilities(outputs), batch)
        self._thresholds = None

    def _probabilities(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self.head not in outputs:
            raise ValueError(f"head {self.head!r} is not among the outputs {sorted(outputs)}.")
        logits = outputs[self.head].detach().float().cpu()
        if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
            raise ValueError(f"head {self.head!r} gave shape {tuple(logits.shape)}; expected (B, {len(self.class_names)}) logits, "
                             "one per label.")
        return torch.sigmoid(logits)

    # -- thresholds -------------------------------------------------------------------------------

    @property
    def thresholds(self) -> tuple[Tensor, list[str]]:
        """Each label's threshold and where it comes from (``validation F1``, ``fixed``, ``default``)."""
        if self._thresholds is None:
            count = len(self.class_names)
            if self.threshold is not None:
                self._thresholds = torch.full((count,), self.threshold, dtype=torch.float64), ["fixed"] * count
            else:
                units = self._calibration.units(self.level)
                if units.ids:
                    values, fitted = best_f1_thresholds(units.probabilities, units.labels)
                    self._thresholds = values, ["validation F1" if f else "default" for f in fitted]
                else:
                    self._thresholds = torch.full((count,), DEFAULT_THRESHOLD, dtype=torch.float64), ["default"] * count
        return self._thresholds

    # -- metrics ----------------------------------------------------------------------------------

    def compute(self) -> dict[str, float]:
        units = self._scored.units(self.level)
        names = self._metric_names()
        if not units.ids:
            return dict.fromkeys(names, math.nan) | {f"{PREFIX}/labels": 0.0, f"{PREFIX}/n": 0.0}
        scores = score_labels(units.probabilities, units.labels, self.thresholds[0])
        defined = scores.pop("defined")[0]
        missing = [name for name, d in zip(self.class_names, defined.tolist()) if not d]
        if missing:
            warnings.warn(f"multilabel: the macro averages leave out {missing}: each has no known positive or no known "
                          f"negative {self.level} in this split.", stacklevel=2)
        metrics: dict[str, float] = {}
        for metric in ("auroc", "ap", "f1"):
            metrics[f"{PREFIX}/{metric}"] = float(scores[metric][0])
        for metric in ("auroc", "ap", "f1"):
            per_label = scores[f"{metric}/*"][0].tolist()
            metrics.update({f"{PREFIX}/{metric}/{s}": float(v) for s, v in zip(self.slugs, per_label)})
        return metrics | {f"{PREFIX}/labels": float(defined.sum()), f"{PREFIX}/n": float(len(units.ids))}

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% percentile-bootstrap intervals, resampling patients (each with all its studies)."""
        units = self._scored.units(self.level)
        if self.bootstrap == 0 or not units.ids:
            return {}
        thresholds = self.thresholds[0]
        values: dict[str, list[Tensor]] = {}
        for counts in resample_blocks(units.clusters, self.bootstrap, self.seed):
            scores = score_labels(units.probabilities, units.labels, thresholds, counts)
            for metric in ("auroc", "ap", "f1"):
                values.setdefault(f"{PREFIX}/{metric}", []).append(scores[metric])
            for metric in ("auroc", "ap"):
                for c, name in enumerate(self.slugs):
                    values.setdefault(f"{PREFIX}/{metric}/{name}", []).append(scores[f"{metric}/*"][:, c])
        return percentile_intervals(values)

    def _metric_names(self) -> list[str]:
        return [*(f"{PREFIX}/{m}" for m in ("auroc", "ap", "f1")),
                *(f"{PREFIX}/{m}/{s}" for m in ("auroc", "ap", "f1") for s in self.slugs)]

    # -- artefacts --------------------------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        """Write ``multilabel_per_label.csv`` (counts, AUROC, AP, threshold and where it comes from,
        precision, recall and F1 at it, per label) and ``multilabel_predictions.csv`` (per study or
        image: every label's probability and target, empty where unknown)."""
        units = self._scored.units(self.level)
        if not units.ids:
            return
        out_dir = Path(out_dir)
        probabilities, labels = units.probabilities, units.labels
        thresholds, sources = self.thresholds
        auroc, ap = label_auroc(probabilities, labels)[0], label_ap(probabilities, labels)[0]
        counts = {k: v[0] for k, v in label_counts(probabilities, labels, thresholds).items()}
        precision = counts["tp"] / (counts["tp"] + counts["fp"])
        recall = counts["tp"] / (counts["tp"] + counts["fn"])
        f1 = 2 * counts["tp"] / (2 * counts["tp"] + counts["fp"] + counts["fn"])
        rows = []
        for c, name in enumerate(self.class_names):
            column = labels[:, c]
            rows.append([name, int((column == 1).sum()), int((column == 0).sum()), int((column < 0).sum()),
                         number(auroc[c]), number(ap[c]), number(thresholds[c]), sources[c],
                         number(precision[c]), number(recall[c]), number(f1[c])])
        write_csv(out_dir / "multilabel_per_label.csv",
                  ["label", "positives", "negatives", "unknown", "auroc", "ap", "threshold", "threshold_from", "precision",
                   "recall", "f1"], rows)
        header = [f"{self.level}_id", *(f"p_{s}" for s in self.slugs), *(f"y_{s}" for s in self.slugs)]
        if units.patients is not None:
            header.append("patient_id")
        write_csv(out_dir / "multilabel_predictions.csv", header, [
            [unit, *map(number, probabilities[i].tolist()), *("" if y < 0 else int(y) for y in labels[i].tolist()),
             *([units.patients[i]] if units.patients is not None else [])]
            for i, unit in enumerate(units.ids)
        ])


def score_labels(probabilities: Tensor, labels: Tensor, thresholds: Tensor, weights: Tensor | None = None) -> dict[str, Tensor]:
    """Per-label AUROC, AP and F1 (``"auroc/*"`` ... ``(R, L)``), their macro averages over the
    labels defined in each weighting (``"auroc"`` ... ``(R,)``), and ``"defined"`` ``(R, L)``."""
    defined = defined_labels(labels, weights)
    scores = {"auroc/*": label_auroc(probabilities, labels, weights), "ap/*": label_ap(probabilities, labels, weights),
              "f1/*": label_f1(probabilities, labels, thresholds, weights)}
    return {**scores, **{name[:-2]: macro(value, defined) for name, value in scores.items()}, "defined": defined}


class LabelStore:
    """Per-image probabilities ``(N, L)``, targets ``(N, L)`` and ids, grouped into scored units on demand."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.probabilities: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.study_ids: list[str] = []
        self.image_ids: list[str] = []
        self.patient_ids: list[str] | None = []  # None once a batch came without them

    def add(self, probabilities: Tensor, batch: Mapping[str, Any]) -> None:
        labels = read_labels(batch, self.count)
        self.probabilities.append(probabilities.double())
        self.labels.append(labels)
        self.study_ids += [str(s) for s in batch["study_id"]]
        self.image_ids += [str(i) for i in batch["image_id"]]
        patients = batch.get("patient_id")
        if patients is None or self.patient_ids is None:
            self.patient_ids = None
        else:
            self.patient_ids += [str(p) for p in patients]

    def units(self, level: str) -> Units:
        """The scored units: mean probabilities of each study's images (each image at image level), in
        order of first sight, their targets, bootstrap clusters (patients, else studies) and patients."""
        if not self.study_ids:
            return Units([], torch.empty(0, self.count, dtype=torch.float64), torch.empty(0, self.count), torch.empty(0, dtype=torch.long), None)
        probabilities, labels = torch.cat(self.probabilities), torch.cat(self.labels)
        keys = self.image_ids if level == "image" else self.study_ids
        unit = cluster_index(keys)
        count = int(unit.max()) + 1
        first = torch.full((count,), len(unit), dtype=torch.long).scatter_reduce(0, unit, torch.arange(len(unit)), reduce="amin")
        unit_labels = labels[first]
        disagree = (unit_labels[unit] != labels).any(1).nonzero().flatten().tolist()
        if disagree:
            raise ValueError(f"study {self.study_ids[disagree[0]]!r} has images with different labels; score at level: image.")
        sizes = torch.bincount(unit, minlength=count).double()
        mean = torch.zeros(count, self.count, dtype=torch.float64).index_add_(0, unit, probabilities) / sizes[:, None]
        patients = None if self.patient_ids is None else [self.patient_ids[i] for i in first.tolist()]
        clusters = cluster_index(patients or [self.study_ids[i] for i in first.tolist()])
        return Units(list(dict.fromkeys(keys)), mean, unit_labels, clusters, patients)


class Units:
    """Scored units: ``ids``, ``probabilities`` ``(N, L)``, ``labels`` ``(N, L)``, bootstrap ``clusters``, ``patients``."""

    def __init__(self, ids: list[str], probabilities: Tensor, labels: Tensor, clusters: Tensor, patients: list[str] | None) -> None:
        self.ids, self.probabilities, self.labels, self.clusters, self.patients = ids, probabilities, labels, clusters, patients


def read_labels(batch: Mapping[str, Any], count: int) -> Tensor:
    """The batch's multi-label targets ``(B, L)`` on the CPU, checked: 1, 0 or -1."""
    if "labels" not in batch:
        raise CorexError("this evaluator scores multi-label data, but the batches carry no 'labels' (a multi-label source "
                         "such as nih_cxr14 or chexpert gives them); use the classification evaluator for single-label data")
    labels = batch["labels"].detach().float().cpu()
    if labels.ndim != 2 or labels.shape[1] != count:
        raise ValueError(f"batch['labels'] has shape {tuple(labels.shape)}; expected (B, {count}), one column per class name.")
    if not bool(((labels == 1) | (labels == 0) | (labels == -1)).all()):
        raise ValueError("batch['labels'] must hold 1 (positive), 0 (negative) or -1 (unknown) only.")
    return labels
