"""Classification evaluator: study-level scores, per-class behaviour, calibration, bootstrap CIs.

The paper's four classes (negative for pneumonia, typical, indeterminate and atypical appearance
of COVID-19) are imbalanced and the last three are hard to tell apart, so accuracy alone hides
what matters for deployment. This evaluator reports balanced accuracy and macro-F1 next to
accuracy, F1 and AUROC per class, how well the confidences are calibrated, and a bootstrap 95%
interval for the headline figures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torchmetrics.functional.classification as tmf
from matplotlib.figure import Figure
from torch import Tensor
from torch.nn.functional import one_hot

from corex_eval.artefacts import number, save_figure, slug, write_csv

INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


class ClassificationEvaluator:
    """Score the logits ``(B, K)`` of one classification head against the batch's ``label``.

    Scoring level. The SIIM-FISABIO-RSNA COVID-19 data are labelled per *study*, and the
    challenge scores one prediction per study, while a study may hold several radiographs. With
    ``level="study"`` (default) the softmax probabilities of all images of one ``study_id`` are
    averaged and each study counts once, so a study with three images does not weigh three times
    as much as a study with one. ``level="image"`` scores every image on its own.

    Metrics (:meth:`compute`), all over the scored studies (or images):

    * ``accuracy``; ``balanced_accuracy``, the mean recall over classes (macro recall);
      ``macro_f1`` and ``f1/<class>``. Following torchmetrics, the macro averages leave out a
      class that appears in neither the targets nor the predictions.
    * ``auroc``: macro one-vs-rest AUROC, and ``auroc/<class>``. A class without positive (or
      without negative) samples has no AUROC: it is ``nan`` and left out of the macro average,
      with a warning naming it.
    * ``ece``: expected calibration error of the top-class confidence over ``calibration_bins``
      equal-width bins (Guo et al. 2017; 15 bins is their default).
    * ``brier``: multi-class Brier score, the mean over samples of ``sum_k (p_k - y_k)^2``
      (0 is perfect, 2 the worst).
    * ``n``: the number of scored studies (or images).

    ``<class>`` is the class name in lower case with other characters replaced by ``_``
    (``f1/typical``). Samples with ``label == -1`` are skipped.

    :meth:`intervals` gives 95% percentile-bootstrap intervals of ``accuracy``,
    ``balanced_accuracy``, ``macro_f1`` and ``auroc``, resampling studies (or images)
    ``bootstrap`` times with a fixed ``seed``; ``bootstrap=0`` disables them.
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
        self.class_names = list(class_names)
        self.slugs = slugs
        self.head = head
        self.level = level
        self.bootstrap = bootstrap
        self.calibration_bins = calibration_bins
        self.seed = seed
        self.reset()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset(self) -> None:
        self._probabilities: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._study_ids: list[str] = []
        self._image_ids: list[str] = []

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        if self.head not in outputs:
            raise ValueError(f"head {self.head!r} is not among the outputs {sorted(outputs)}.")
        logits = outputs[self.head].detach().float().cpu()
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            shape, expected = tuple(logits.shape), f"(B, {self.num_classes})"
            raise ValueError(f"head {self.head!r} gave shape {shape}; expected {expected} logits.")
        labels = batch["label"].detach().long().cpu()
        if ((labels < -1) | (labels >= self.num_classes)).any():
            raise ValueError(f"labels must lie in -1..{self.num_classes - 1}, got {labels.tolist()}.")
        labelled = labels >= 0
        self._probabilities.append(torch.softmax(logits, dim=1)[labelled])
        self._labels.append(labels[labelled])
        keep = labelled.tolist()
        self._study_ids += [s for s, k in zip(batch["study_id"], keep, strict=True) if k]
        self._image_ids += [i for i, k in zip(batch["image_id"], keep, strict=True) if k]

    def scored(self) -> tuple[list[str], Tensor, Tensor]:
        """The scored units: their ids, probabilities ``(N, K)`` and labels ``(N,)``.

        At study level, the mean probabilities of each study's images, in order of first sight.
        """
        if not self._labels:
            return [], torch.empty(0, self.num_classes), torch.empty(0, dtype=torch.long)
        probabilities, labels = torch.cat(self._probabilities), torch.cat(self._labels)
        if self.level == "image":
            return list(self._image_ids), probabilities, labels
        position: dict[str, int] = {}
        study = torch.tensor([position.setdefault(s, len(position)) for s in self._study_ids])
        images_per_study = torch.bincount(study, minlength=len(position))
        mean = torch.zeros(len(position), self.num_classes).index_add_(0, study, probabilities)
        mean /= images_per_study[:, None]
        study_labels = torch.empty(len(position), dtype=torch.long).scatter_(0, study, labels)
        disagree = (study_labels[study] != labels).nonzero().flatten().tolist()
        if disagree:
            raise ValueError(f"study {self._study_ids[disagree[0]]!r} has images with different labels.")
        return list(position), mean, study_labels

    def compute(self) -> dict[str, float]:
        ids, probabilities, labels = self.scored()
        if not ids:
            return {name: math.nan for name in self._metric_names()} | {"n": 0.0}
        k = self.num_classes
        f1 = tmf.multiclass_f1_score(probabilities, labels, k, average=None)
        auroc = self._auroc_per_class(probabilities, labels)
        metrics = {
            "accuracy": tmf.multiclass_accuracy(probabilities, labels, k, average="micro"),
            "balanced_accuracy": tmf.multiclass_accuracy(probabilities, labels, k, average="macro"),
            "macro_f1": tmf.multiclass_f1_score(probabilities, labels, k, average="macro"),
            **{f"f1/{name}": value for name, value in zip(self.slugs, f1)},
            "auroc": auroc.nanmean(),
            **{f"auroc/{name}": value for name, value in zip(self.slugs, auroc)},
            "ece": tmf.multiclass_calibration_error(probabilities, labels, k, self.calibration_bins),
            "brier": (probabilities - one_hot(labels, k)).pow(2).sum(1).mean(),
        }
        return {name: float(value) for name, value in metrics.items()} | {"n": float(len(ids))}

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% percentile-bootstrap intervals, resampling the scored studies (or images)."""
        ids, probabilities, labels = self.scored()
        if self.bootstrap == 0 or not ids:
            return {}
        n = len(ids)
        generator = torch.Generator().manual_seed(self.seed)
        rows_per_chunk = max(1, 2**21 // n)  # caps each (resamples, n) float64 tensor at 16 MiB
        chunks = []
        for start in range(0, self.bootstrap, rows_per_chunk):
            rows = min(rows_per_chunk, self.bootstrap - start)
            draws = torch.randint(n, (rows, n), generator=generator)
            # A resample is how often each unit was drawn, so a chunk of resamples is scored at once.
            ones = torch.ones(draws.shape, dtype=torch.float64)
            counts = torch.zeros_like(ones).scatter_add_(1, draws, ones)
            chunks.append(weighted_metrics(probabilities, labels, counts))
        quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
        return {
            name: tuple(torch.nanquantile(torch.cat([c[name] for c in chunks]), quantiles).tolist())
            for name in INTERVAL_METRICS
        }

    def save(self, out_dir: Path) -> None:
        """Write ``confusion_matrix.png``, ``reliability.png``, ``per_class.csv`` and
        ``predictions.csv`` to ``out_dir`` (nothing when no labelled sample was seen)."""
        ids, probabilities, labels = self.scored()
        if not ids:
            return
        out_dir = Path(out_dir)
        predicted = probabilities.argmax(1)
        self._plot_confusion(predicted, labels, out_dir / "confusion_matrix.png")
        self._plot_reliability(probabilities, labels, out_dir / "reliability.png")

        k = self.num_classes
        per_class = [
            tmf.multiclass_precision(predicted, labels, k, average=None),
            tmf.multiclass_recall(predicted, labels, k, average=None),
            tmf.multiclass_f1_score(predicted, labels, k, average=None),
            self._auroc_per_class(probabilities, labels),
        ]
        support = torch.bincount(labels, minlength=k)
        write_csv(
            out_dir / "per_class.csv",
            ["class", "precision", "recall", "f1", "auroc", "support"],
            [
                [name, *(number(column[c]) for column in per_class), int(support[c])]
                for c, name in enumerate(self.class_names)
            ],
        )
        write_csv(
            out_dir / "predictions.csv",
            [f"{self.level}_id", "label", "predicted", *(f"p_{name}" for name in self.slugs)],
            [
                [unit, self.class_names[y], self.class_names[p], *map(number, row.tolist())]
                for unit, y, p, row in zip(ids, labels.tolist(), predicted.tolist(), probabilities)
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

    def _plot_confusion(self, predicted: Tensor, labels: Tensor, path: Path) -> None:
        counts = tmf.multiclass_confusion_matrix(predicted, labels, self.num_classes)
        rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
        figure = Figure(figsize=(11, 5), layout="constrained")
        for axes, table, title, fmt in zip(
            figure.subplots(1, 2),
            (counts, rates),
            ("counts", "row-normalised (recall on the diagonal)"),
            ("{:.0f}", "{:.2f}"),
        ):
            axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
            for true in range(self.num_classes):
                for pred in range(self.num_classes):
                    colour = "white" if rates[true, pred] > 0.5 else "black"
                    label = fmt.format(float(table[true, pred]))
                    axes.text(pred, true, label, ha="center", va="center", color=colour)
            ticks = range(self.num_classes)
            axes.set_xticks(ticks, self.class_names, rotation=30, ha="right")
            axes.set_yticks(ticks, self.class_names)
            axes.set(xlabel="predicted", ylabel="true", title=title)
        save_figure(figure, path)

    def _plot_reliability(self, probabilities: Tensor, labels: Tensor, path: Path) -> None:
        confidence, predicted = probabilities.max(1)
        correct = (predicted == labels).float()
        bins = self.calibration_bins
        # Same binning as torchmetrics' calibration error: [lower, upper) bins of equal width.
        edges = torch.linspace(0, 1, bins + 1)
        which = (torch.bucketize(confidence, edges, right=True) - 1).clamp(max=bins - 1)
        # matplotlib gets numpy arrays: it warns about tensors under numpy 2.
        count = torch.bincount(which, minlength=bins).float().numpy()
        accuracy = torch.bincount(which, correct, minlength=bins).numpy() / count.clip(min=1)
        centres = (torch.arange(bins).numpy() + 0.5) / bins
        filled = count > 0
        ece = tmf.multiclass_calibration_error(probabilities, labels, self.num_classes, n_bins=bins)

        figure = Figure(figsize=(5, 6), layout="constrained")
        top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        top.bar(centres[filled], accuracy[filled], width=1 / bins, edgecolor="black", label="accuracy")
        top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability (ECE {float(ece):.3f})")
        top.legend(loc="upper left")
        bottom.bar(centres, count, width=1 / bins, edgecolor="black", color="grey")
        bottom.set(xlabel="top-class confidence", ylabel=f"{self.level} count")
        save_figure(figure, path)


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
    f1 = (2 * true_positive / (2 * true_positive + false_positive + false_negative)).nan_to_num(0.0)
    return {
        "accuracy": true_positive.sum(1) / weights.sum(1),
        "balanced_accuracy": (recall * seen).sum(1) / seen.sum(1),
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
