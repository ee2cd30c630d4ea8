"""Classification evaluator: study-level scores, per-class behaviour, calibration, bootstrap CIs.

The paper's four classes (negative for pneumonia, typical, indeterminate and atypical appearance
of COVID-19) are imbalanced and the last three are hard to tell apart, so accuracy alone hides
what matters for deployment. This evaluator reports balanced accuracy and macro-F1 next to
accuracy, F1, AUROC and average precision per class, the challenge's own score (``study_map``),
how well the confidences are calibrated (before and after temperature scaling), and bootstrap 95%
intervals for the headline figures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torchmetrics.functional.classification as tmf
from torch import Tensor
from torch.nn.functional import one_hot

from corex.rundir import write_json
from corex_eval.artefacts import number, slug, write_csv
from corex_eval.average_precision import average_precision_per_class
from corex_eval.bootstrap import cluster_index, percentile_intervals, resample_blocks
from corex_eval.calibration import fit_temperature, unit_probabilities, weighted_brier, weighted_ece
from corex_eval.exact import clopper_pearson
from corex_eval.figures import plot_confusion, plot_precision_recall, plot_reliability, plot_roc
from corex_eval.rules import CONFIDENCE, COVERAGES, READY_RECALL, SANE_TEMPERATURE, SETTINGS_FILE, TARGET_ACCURACY
from corex_eval.selective import aurc, coverage_at_accuracy, oracle_aurc, plot_risk_coverage, selective_accuracy

INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "study_map", "ece", "brier")
CALIBRATED_METRICS = ("ece/calibrated", "brier/calibrated")
SELECTIVE_AT = {f"selective/accuracy_at_{round(100 * share)}": share for share in COVERAGES}
SELECTIVE_INTERVALS = ("selective/aurc", "selective/e_aurc", *SELECTIVE_AT)


class ClassificationEvaluator:
    """Score the logits ``(B, K)`` of one classification head against the batch's ``label``.

    Scoring level. The SIIM-FISABIO-RSNA COVID-19 data are labelled per *study*, and the
    challenge scores one prediction per study, while a study may hold several radiographs. With
    ``level="study"`` (default) the softmax probabilities of all images of one ``study_id`` are
    averaged and each study counts once, so a study with three images does not weigh three times
    as much as a study with one. ``level="image"`` scores every image on its own.

    Metrics (:meth:`compute`), all over the scored studies (or images):

    * ``accuracy``; ``balanced_accuracy``, the mean recall over the classes present in the labels
      (as scikit-learn: a class that is only predicted is left out); ``macro_f1`` and
      ``f1/<class>``. Following torchmetrics, macro-F1 leaves out a class that appears in neither
      the targets nor the predictions.
    * ``auroc``: macro one-vs-rest AUROC, and ``auroc/<class>``. A class without positive (or
      without negative) samples has no AUROC: it is ``nan`` and left out of the macro average,
      with a warning naming it.
    * ``study_map``: the SIIM-FISABIO-RSNA challenge's study-level score, the mean over classes of
      ``ap/<class>``, each class's PASCAL VOC 2010 average precision (all-point interpolation with
      the monotone precision envelope; see :mod:`corex_eval.average_precision` for why, and how it
      differs from scikit-learn's). A class without a positive has no AP and is left out.
    * ``ece``: expected calibration error of the top-class confidence over ``calibration_bins``
      equal-width bins (Guo et al. 2017; 15 bins is their default).
    * ``brier``: multi-class Brier score, the mean over samples of ``sum_k (p_k - y_k)^2``
      (0 is perfect, 2 the worst).
    * ``n``: the number of scored studies (or images).
    * After temperature scaling, only when :meth:`calibration_update` was fed labelled data:
      ``temperature``, ``ece/calibrated`` and ``brier/calibrated``.

    ``<class>`` is the class name in lower case with other characters replaced by ``_``
    (``f1/typical``). Samples with ``label == -1`` are skipped.

    Temperature scaling. The engine feeds the validation split through :meth:`calibration_update`
    before an evaluate stage on another split; one temperature ``T`` is then fitted by minimising
    the negative log-likelihood of the validation studies' labels (study probability = mean of
    its images' ``softmax(logits / T)``, as scored) and applied to the scored split. It changes no
    prediction, only the confidences. :meth:`reset` keeps the calibration data, so one fit serves
    the whole stage; :meth:`reset_calibration` drops it.

    :meth:`intervals` gives 95% percentile-bootstrap intervals of ``accuracy``,
    ``balanced_accuracy``, ``macro_f1``, ``auroc``, ``study_map``, ``ece`` and ``brier`` (and the
    calibrated ECE and Brier, with ``T`` held at its fitted value), ``bootstrap`` resamples with a
    fixed ``seed``; ``bootstrap=0`` disables them. A resample draws *patients* (``patient_id``)
    with replacement and takes all their studies, as a patient's studies are not independent;
    without patient ids each study is its own patient.

    Selective prediction (:mod:`corex_eval.selective`), from the calibrated probabilities when a
    temperature was fitted within ``SANE_TEMPERATURE`` (else the raw ones): ``selective/aurc``, the
    area under the risk-coverage curve of the top-class probability, ``selective/e_aurc`` its
    excess over an oracle that ranks every error last, ``selective/accuracy_at_90`` and ``_80``,
    the accuracy among the 90% (80%) most confident studies, and ``selective/coverage_at_target``,
    the largest share of studies that can be answered at ``target_accuracy``.

    The deploy-readiness verdict's options, ``ready_recall`` (the bar every class's recall must
    reach) and ``confidence`` (the level of the exact Clopper-Pearson recall intervals in
    ``per_class.csv``), are written to ``classification.json`` with ``target_accuracy``, so that
    the findings quote the settings the run used.

    ``split`` (supplied by the core) only labels the figures.
    """

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        head: str = "classification",
        level: Literal["study", "image"] = "study",
        bootstrap: int = 1000,
        calibration_bins: int = 15,
        seed: int = 0,
        split: str = "test",
        ready_recall: float = READY_RECALL,
        confidence: float = CONFIDENCE,
        target_accuracy: float = TARGET_ACCURACY,
    ) -> None:
        slugs = [slug(name) for name in class_names]
        if len(slugs) < 2:
            raise ValueError(f"class_names needs at least 2 classes, got {list(class_names)!r}.")
        if "" in slugs or len(set(slugs)) != len(slugs):
            raise ValueError(f"class_names {list(class_names)!r} give clashing metric names {slugs!r}.")
        if level not in ("study", "image"):
            raise ValueError(f"level must be 'study' or 'image', got {level!r}.")
        if bootstrap < 0:
            raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}.")
        if calibration_bins < 1:
            raise ValueError(f"calibration_bins must be at least 1, got {calibration_bins}.")
        if not 0.0 < ready_recall <= 1.0:
            raise ValueError(f"ready_recall must lie in (0, 1], got {ready_recall}.")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}.")
        if not 0.0 < target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy must lie in (0, 1], got {target_accuracy}.")
        self.class_names = list(class_names)
        self.slugs = slugs
        self.head = head
        self.level = level
        self.bootstrap = bootstrap
        self.calibration_bins = calibration_bins
        self.seed = seed
        self.split = split
        self.ready_recall = ready_recall
        self.confidence = confidence
        self.target_accuracy = target_accuracy
        self.reset()
        self.reset_calibration()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset(self) -> None:
        """Forget the scored data (the calibration data stay: see :meth:`reset_calibration`)."""
        self._scored = _Store()

    def reset_calibration(self) -> None:
        self._calibration = _Store()
        self._temperature: float | None = None

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        self._scored.add(*self._read(batch, outputs), batch)

    def calibration_update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        """Collect held-out (validation) logits to fit the temperature on."""
        self._calibration.add(*self._read(batch, outputs), batch)
        self._temperature = None

    def _read(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.head not in outputs:
            raise ValueError(f"head {self.head!r} is not among the outputs {sorted(outputs)}.")
        logits = outputs[self.head].detach().float().cpu()
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            shape, expected = tuple(logits.shape), f"(B, {self.num_classes})"
            raise ValueError(f"head {self.head!r} gave shape {shape}; expected {expected} logits.")
        labels = batch["label"].detach().long().cpu()
        if ((labels < -1) | (labels >= self.num_classes)).any():
            raise ValueError(f"labels must lie in -1..{self.num_classes - 1}, got {labels.tolist()}.")
        return logits, labels

    # -- the scored units -------------------------------------------------------------------------

    def _units(self, store: _Store) -> _Units:
        """Group a store's images into the scored units (studies, or images at image level)."""
        if not store.study_ids:
            return _Units([], torch.empty(0, self.num_classes), torch.empty(0, dtype=torch.long),
                          torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), None)
        logits, labels = torch.cat(store.logits), torch.cat(store.labels)
        keys = store.image_ids if self.level == "image" else store.study_ids
        unit = cluster_index(keys)
        count = int(unit.max()) + 1
        ids = list(dict.fromkeys(keys))
        unit_labels = torch.empty(count, dtype=torch.long).scatter_(0, unit, labels)
        disagree = (unit_labels[unit] != labels).nonzero().flatten().tolist()
        if disagree:
            raise ValueError(f"study {store.study_ids[disagree[0]]!r} has images with different labels.")
        first_image = torch.full((count,), len(unit), dtype=torch.long).scatter_reduce(
            0, unit, torch.arange(len(unit)), reduce="amin")
        patients = None if store.patient_ids is None else [store.patient_ids[i] for i in first_image.tolist()]
        # Bootstrap clusters: a unit's patient, else its study (the images of a study go together).
        cluster_keys = patients or [store.study_ids[i] for i in first_image.tolist()]
        return _Units(ids, logits, unit, unit_labels, cluster_index(cluster_keys), patients)

    def scored(self, temperature: float = 1.0) -> tuple[list[str], Tensor, Tensor]:
        """The scored units: their ids, probabilities ``(N, K)`` and labels ``(N,)``.

        At study level, the mean probabilities of each study's images, in order of first sight;
        ``temperature`` divides the logits first.
        """
        units = self._units(self._scored)
        return units.ids, units.probabilities(temperature), units.labels

    @property
    def temperature(self) -> float | None:
        """The temperature fitted on the calibration data, ``None`` without labelled ones."""
        if self._temperature is None:
            units = self._units(self._calibration)
            if units.ids:
                self._temperature = fit_temperature(units.logits, units.unit, units.labels)
        return self._temperature

    @property
    def temperature_problem(self) -> str | None:
        """Why the fitted temperature is no calibration, or ``None``: ``"no validation error"`` (the
        likelihood rises as ``T`` falls to 0, so the fit stopped at an arbitrary ``T``), ``"too high"``
        or ``"too low"`` (outside ``SANE_TEMPERATURE``)."""
        temperature = self.temperature
        if temperature is None:
            return None
        units = self._units(self._calibration)
        if (units.logits.argmax(1) == units.labels[units.unit]).all():
            return "no validation error"
        if temperature > SANE_TEMPERATURE[1]:
            return "too high"
        if temperature < SANE_TEMPERATURE[0]:
            return "too low"
        return None

    @property
    def selective_temperature(self) -> float | None:
        """The temperature selective prediction ranks by: the fitted one unless it is no calibration
        (:attr:`temperature_problem`), else ``None`` (raw probabilities)."""
        return None if self.temperature is None or self.temperature_problem else self.temperature

    def _selective(self, probabilities: Tensor, labels: Tensor) -> dict[str, float]:
        confidence, predicted = probabilities.max(1)
        correct = predicted == labels
        area = float(aurc(confidence, correct))
        metrics = {"selective/aurc": area, "selective/e_aurc": area - float(oracle_aurc(correct))}
        metrics |= {name: float(selective_accuracy(confidence, correct, share)) for name, share in SELECTIVE_AT.items()}
        metrics["selective/coverage_at_target"] = coverage_at_accuracy(confidence, correct, self.target_accuracy)
        return metrics

    # -- metrics ----------------------------------------------------------------------------------

    def compute(self) -> dict[str, float]:
        units = self._units(self._scored)
        temperature = self.temperature
        calibrated = {} if temperature is None else {"temperature": temperature}
        if not units.ids:
            empty = {name: math.nan for name in self._metric_names()} | {"n": 0.0}
            empty |= {name: math.nan for name in (*SELECTIVE_INTERVALS, "selective/coverage_at_target")}
            return empty | {name: math.nan for name in CALIBRATED_METRICS if calibrated} | calibrated
        probabilities, labels = units.probabilities(), units.labels
        k = self.num_classes
        f1 = tmf.multiclass_f1_score(probabilities, labels, k, average=None)
        auroc = self._auroc_per_class(probabilities, labels)
        ap = average_precision_per_class(probabilities, labels)
        metrics = {
            "accuracy": tmf.multiclass_accuracy(probabilities, labels, k, average="micro"),
            # The mean recall over the classes present in the labels (as scikit-learn): a class only
            # predicted has no recall, rather than a recall of 0.
            "balanced_accuracy": tmf.multiclass_recall(probabilities, labels, k, average=None)[torch.bincount(labels, minlength=k) > 0].mean(),
            "macro_f1": tmf.multiclass_f1_score(probabilities, labels, k, average="macro"),
            **{f"f1/{name}": value for name, value in zip(self.slugs, f1)},
            "auroc": auroc.nanmean(),
            **{f"auroc/{name}": value for name, value in zip(self.slugs, auroc)},
            "study_map": ap.nanmean(),
            **{f"ap/{name}": value for name, value in zip(self.slugs, ap)},
            "ece": tmf.multiclass_calibration_error(probabilities, labels, k, self.calibration_bins),
            "brier": (probabilities - one_hot(labels, k)).pow(2).sum(1).mean(),
        }
        if temperature is not None:
            tempered = units.probabilities(temperature)
            metrics["ece/calibrated"] = tmf.multiclass_calibration_error(tempered, labels, k, self.calibration_bins)
            metrics["brier/calibrated"] = (tempered - one_hot(labels, k)).pow(2).sum(1).mean()
        metrics |= self._selective(units.probabilities(self.selective_temperature or 1.0), labels)
        return {name: float(value) for name, value in metrics.items()} | {"n": float(len(units.ids))} | calibrated

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% percentile-bootstrap intervals, resampling patients (each with all its studies)."""
        units = self._units(self._scored)
        if self.bootstrap == 0 or not units.ids:
            return {}
        probabilities, labels = units.probabilities(), units.labels
        temperature = self.temperature
        tempered = None if temperature is None else units.probabilities(temperature)
        confidence, predicted = units.probabilities(self.selective_temperature or 1.0).max(1)
        correct = predicted == labels
        values: dict[str, list[Tensor]] = {}
        for counts in resample_blocks(units.clusters, self.bootstrap, self.seed):
            block = weighted_metrics(probabilities, labels, counts)
            block["study_map"] = average_precision_per_class(probabilities, labels, counts).nanmean(-1)
            block["ece"] = weighted_ece(probabilities, labels, counts, self.calibration_bins)
            block["brier"] = weighted_brier(probabilities, labels, counts)
            if tempered is not None:
                block["ece/calibrated"] = weighted_ece(tempered, labels, counts, self.calibration_bins)
                block["brier/calibrated"] = weighted_brier(tempered, labels, counts)
            block["selective/aurc"] = aurc(confidence, correct, counts)
            block["selective/e_aurc"] = block["selective/aurc"] - oracle_aurc(correct, counts)
            for name, share in SELECTIVE_AT.items():
                block[name] = selective_accuracy(confidence, correct, share, counts)
            for name, value in block.items():
                values.setdefault(name, []).append(value)
        return percentile_intervals(values)

    # -- artefacts --------------------------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        """Write ``confusion_matrix.png``, ``reliability.png``, ``roc.png``, ``pr.png``,
        ``risk_coverage.png``, ``per_class.csv``, ``predictions.csv`` and the settings the findings
        read, ``classification.json``, to ``out_dir`` (nothing when no labelled sample was seen)."""
        units = self._units(self._scored)
        if not units.ids:
            return
        out_dir = Path(out_dir)
        probabilities, labels, ids = units.probabilities(), units.labels, units.ids
        predicted = probabilities.argmax(1)
        where = f"{self.split} split, {self.level} level"
        k = self.num_classes
        auroc = self._auroc_per_class(probabilities, labels)
        ap = average_precision_per_class(probabilities, labels)
        plot_confusion(predicted, labels, self.class_names, where, self.level, out_dir / "confusion_matrix.png")
        ece = float(tmf.multiclass_calibration_error(probabilities, labels, k, self.calibration_bins))
        calibrated = None
        if self.temperature is not None:
            tempered = units.probabilities(self.temperature)
            ece_after = float(tmf.multiclass_calibration_error(tempered, labels, k, self.calibration_bins))
            calibrated = (tempered, ece_after, self.temperature)
        plot_reliability(probabilities, labels, self.calibration_bins, ece, where, self.level,
                         out_dir / "reliability.png", calibrated)
        plot_roc(probabilities, labels, self.class_names, auroc, where, out_dir / "roc.png")
        plot_precision_recall(probabilities, labels, self.class_names, ap, where, out_dir / "pr.png")
        selective_temperature = self.selective_temperature
        ranked = units.probabilities(selective_temperature or 1.0)
        ranking = ("calibrated probabilities, T = " + f"{selective_temperature:.2f}" if selective_temperature is not None
                   else "uncalibrated probabilities")
        plot_risk_coverage(ranked.max(1).values, ranked.argmax(1) == labels, where, self.level, ranking, COVERAGES,
                           self.target_accuracy, out_dir / "risk_coverage.png")

        per_class = [
            tmf.multiclass_precision(predicted, labels, k, average=None),
            tmf.multiclass_recall(predicted, labels, k, average=None),
            tmf.multiclass_f1_score(predicted, labels, k, average=None),
            auroc,
        ]
        support = torch.bincount(labels, minlength=k)
        recalled = torch.bincount(labels[predicted == labels], minlength=k)
        exact = [clopper_pearson(int(recalled[c]), int(support[c]), self.confidence) for c in range(k)]
        # New columns go at the end: the recalled count and the exact interval of the recall.
        write_csv(
            out_dir / "per_class.csv",
            ["class", "precision", "recall", "f1", "auroc", "support", "ap", "recalled", "recall_low", "recall_high"],
            [
                [name, *(number(column[c]) for column in per_class), int(support[c]), number(ap[c]), int(recalled[c]),
                 number(exact[c][0]), number(exact[c][1])]
                for c, name in enumerate(self.class_names)
            ],
        )
        write_json(out_dir / SETTINGS_FILE, {
            "level": self.level, "ready_recall": self.ready_recall, "confidence": self.confidence,
            "recall_interval": "Clopper-Pearson (exact)", "target_accuracy": self.target_accuracy,
            "coverages": list(COVERAGES), "temperature": self.temperature, "sane_temperature": list(SANE_TEMPERATURE),
            "temperature_problem": self.temperature_problem,
            "selective_ranking": ranking,
        })
        # New columns go at the end, so readers of earlier files keep working.
        header = [f"{self.level}_id", "label", "predicted", *(f"p_{name}" for name in self.slugs)]
        extra = [] if units.patients is None else [[patient] for patient in units.patients]
        if units.patients is not None:
            header.append("patient_id")
        write_csv(
            out_dir / "predictions.csv",
            header,
            [
                [unit, self.class_names[y], self.class_names[p], *map(number, row.tolist()), *(extra[i] if extra else [])]
                for i, (unit, y, p, row) in enumerate(zip(ids, labels.tolist(), predicted.tolist(), probabilities))
            ],
        )

    # -- helpers ----------------------------------------------------------------------------------

    def _metric_names(self) -> list[str]:
        return [
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            *(f"f1/{name}" for name in self.slugs),
            "auroc",
            *(f"auroc/{name}" for name in self.slugs),
            "study_map",
            *(f"ap/{name}" for name in self.slugs),
            "ece",
            "brier",
        ]

    def _auroc_per_class(self, probabilities: Tensor, labels: Tensor) -> Tensor:
        """One-vs-rest AUROC per class (torchmetrics), ``nan`` where a class has no positives or
        no negatives (torchmetrics would report 0 there and drag the macro average down)."""
        auroc = torch.full((self.num_classes,), math.nan)
        missing = []
        for c, name in enumerate(self.class_names):
            positive = labels == c
            if positive.all() or not positive.any():
                missing.append(name)
            else:
                auroc[c] = tmf.binary_auroc(probabilities[:, c], positive.long())
        if missing:
            message = f"AUROC leaves out {missing}: each has no positive or no negative {self.level}."
            warnings.warn(message, stacklevel=3)
        return auroc


class _Store:
    """Per-image logits, labels and ids of the labelled images seen so far."""

    def __init__(self) -> None:
        self.logits: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.study_ids: list[str] = []
        self.image_ids: list[str] = []
        self.patient_ids: list[str] | None = []  # None once a batch came without them

    def add(self, logits: Tensor, labels: Tensor, batch: Mapping[str, Any]) -> None:
        labelled = labels >= 0
        keep = labelled.tolist()
        self.logits.append(logits[labelled])
        self.labels.append(labels[labelled])
        self.study_ids += [s for s, k in zip(batch["study_id"], keep, strict=True) if k]
        self.image_ids += [i for i, k in zip(batch["image_id"], keep, strict=True) if k]
        patients = batch.get("patient_id")
        if patients is None or self.patient_ids is None:
            self.patient_ids = None
        else:
            self.patient_ids += [str(p) for p, k in zip(patients, keep, strict=True) if k]


class _Units:
    """The scored units of a store: per-image logits and the unit of each image, per-unit labels,
    bootstrap clusters (patients) and patient ids (``None`` when the batches had none)."""

    def __init__(self, ids: list[str], logits: Tensor, unit: Tensor, labels: Tensor, clusters: Tensor,
                 patients: list[str] | None) -> None:
        self.ids, self.logits, self.unit, self.labels = ids, logits, unit, labels
        self.clusters, self.patients = clusters, patients

    def probabilities(self, temperature: float = 1.0) -> Tensor:
        if not self.ids:
            return torch.empty(0, self.logits.shape[1])
        return unit_probabilities(self.logits, self.unit, len(self.ids), temperature)


def weighted_metrics(probabilities: Tensor, labels: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """Accuracy, balanced accuracy, macro-F1 and macro AUROC for many weightings at once.

    ``weights`` is ``(R, N)``: row ``r`` says how often each of the ``N`` samples counts (a
    bootstrap resample's draw counts; a row of ones gives the plain metrics). Returns ``(R,)``
    tensors with the same conventions as :meth:`ClassificationEvaluator.compute`. Plain tensor
    algebra, so 1000 resamples cost about as much as a few evaluations.
    """
    weights = weights.double()
    num_classes = probabilities.shape[1]
    target = one_hot(labels, num_classes).double()
    hit = one_hot(probabilities.argmax(1), num_classes).double()
    support, predicted, true_positive = weights @ target, weights @ hit, weights @ (target * hit)
    false_positive, false_negative = predicted - true_positive, support - true_positive
    # torchmetrics' macro convention: a class absent from targets and predictions is left out.
    seen = (support + predicted > 0).double()
    recall = (true_positive / support).nan_to_num(0.0)
    present = (support > 0).double()  # balanced accuracy: recall over the classes present in the labels
    f1 = (2 * true_positive / (2 * true_positive + false_positive + false_negative)).nan_to_num(0.0)
    return {
        "accuracy": true_positive.sum(1) / weights.sum(1),
        "balanced_accuracy": (recall * present).sum(1) / present.sum(1),
        "macro_f1": (f1 * seen).sum(1) / seen.sum(1),
        "auroc": weighted_auroc(probabilities, target, weights).nanmean(1),
    }


def weighted_auroc(probabilities: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """One-vs-rest AUROC of each class under each weighting, ``(R, K)``.

    AUROC is the chance that a random positive scores above a random negative, ties counting one
    half (Mann-Whitney U). Sorting each class's scores once, the weight of negatives below every
    score is a cumulative sum, so each weighting costs O(N). ``nan`` where a weighting has no
    positive or no negative of the class.
    """
    weights, target = weights.double(), target.double()
    rows = weights.shape[0]
    columns = []
    for c in range(probabilities.shape[1]):
        order = probabilities[:, c].argsort()
        score, positive = probabilities[order, c], target[order, c]
        # Equal scores share a tie group; groups are numbered in increasing score.
        new_group = torch.cat([torch.zeros(1, dtype=torch.long), (score[1:] > score[:-1]).long()])
        tie_group = new_group.cumsum(0)
        w = weights[:, order]
        w_positive, w_negative = w * positive, w * (1 - positive)
        negative_in_group = torch.zeros(rows, int(tie_group[-1]) + 1, dtype=w.dtype)
        negative_in_group.index_add_(1, tie_group, w_negative)
        negative_below = negative_in_group.cumsum(1) - negative_in_group
        credit = (negative_below + 0.5 * negative_in_group)[:, tie_group]
        pairs = w_positive.sum(1) * w_negative.sum(1)
        columns.append((w_positive * credit).sum(1) / pairs)
    return torch.stack(columns, 1)
