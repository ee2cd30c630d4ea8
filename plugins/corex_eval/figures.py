"""The classification evaluator's figures: confusion matrix, reliability diagram, ROC and PR curves.

Each figure says in its title what it shows and on which data (split, study or image level), so
that it can be read on its own inside a report. Legends sit outside the axes, never on the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchmetrics.functional.classification as tmf
from matplotlib.figure import Figure
from torch import Tensor

from corex_eval.artefacts import save_figure
from corex_eval.average_precision import precision_recall_steps


def class_colours(count: int) -> list:
    """One distinct colour per class, the same in every figure."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return [palette(i % 10) for i in range(count)]


def plural(unit: str) -> str:
    return "studies" if unit == "study" else f"{unit}s"


def plot_confusion(predicted: Tensor, labels: Tensor, class_names: Sequence[str], where: str, unit: str, path: Path) -> None:
    """Counts and row-normalised rates side by side; ``where`` says which data (``"test split, study level"``)."""
    k = len(class_names)
    counts = tmf.multiclass_confusion_matrix(predicted, labels, k)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    figure = Figure(figsize=(11, 5.4), layout="constrained")
    for axes, table, title, fmt in zip(
        figure.subplots(1, 2),
        (counts, rates),
        ("counts", "share of each true class\n(recall on the diagonal)"),
        ("{:.0f}", "{:.2f}"),
    ):
        axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
        for true in range(k):
            for pred in range(k):
                colour = "white" if rates[true, pred] > 0.5 else "black"
                axes.text(pred, true, fmt.format(float(table[true, pred])), ha="center", va="center", color=colour)
        axes.set_xticks(range(k), class_names, rotation=30, ha="right")
        axes.set_yticks(range(k), class_names)
        axes.set(xlabel="predicted class", ylabel="true class", title=title)
    figure.suptitle(f"Confusion matrix: {where} ({int(counts.sum())} {plural(unit)})")
    save_figure(figure, path)


def _reliability_bins(probabilities: Tensor, labels: Tensor, bins: int):
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).double()
    # Same binning as the ECE (torchmetrics'): [lower, upper) bins, a confidence of 1 in the last.
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = (torch.bucketize(confidence.double(), edges, right=True) - 1).clamp(max=bins - 1)
    # matplotlib gets numpy arrays: it warns about tensors under numpy 2.
    count = torch.bincount(which, minlength=bins).double().numpy()
    accuracy = torch.bincount(which, correct, minlength=bins).numpy() / count.clip(min=1)
    return count, accuracy


def plot_reliability(
    probabilities: Tensor,
    labels: Tensor,
    bins: int,
    ece: float,
    where: str,
    unit: str,
    path: Path,
    calibrated: tuple[Tensor, float, float] | None = None,
) -> None:
    """Accuracy against top-class confidence per bin, with the count per bin below.

    ``calibrated`` is ``(probabilities, ece, temperature)`` after temperature scaling: drawn as a
    second series, so before and after can be compared on the same axes.
    """
    centres = (torch.arange(bins).double().numpy() + 0.5) / bins
    series = [("before scaling" if calibrated else "model", probabilities, ece, "tab:blue")]
    if calibrated:
        after, ece_after, temperature = calibrated
        series.append((f"after temperature scaling (T = {temperature:.2f})", after, ece_after, "tab:orange"))
    figure = Figure(figsize=(6.4, 6.6), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    width = 1 / bins / len(series)
    for i, (name, probs, value, colour) in enumerate(series):
        count, accuracy = _reliability_bins(probs, labels, bins)
        filled = count > 0
        offset = (i - (len(series) - 1) / 2) * width
        top.bar(centres[filled] + offset, accuracy[filled], width=width, color=colour, edgecolor="black",
                linewidth=0.5, label=f"{name}: ECE {value:.3f}")
        bottom.bar(centres + offset, count, width=width, color=colour, edgecolor="black", linewidth=0.5)
    top.set(ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1), title=f"Reliability: {where}")
    bottom.set(xlabel="top-class confidence", ylabel=f"{plural(unit)} in bin")
    figure.legend(*top.get_legend_handles_labels(), loc="outside lower center", fontsize=8, frameon=False)
    save_figure(figure, path)


def _legend_below(figure: Figure, axes) -> None:
    figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", fontsize=8, frameon=False)


def plot_roc(probabilities: Tensor, labels: Tensor, class_names: Sequence[str], auroc: Tensor, where: str, path: Path) -> None:
    """One-vs-rest ROC curve per class, AUROC in the legend."""
    figure = Figure(figsize=(5.6, 7), layout="constrained")
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (AUROC 0.5)")
    for c, (name, colour) in enumerate(zip(class_names, class_colours(len(class_names)))):
        positive = labels == c
        if positive.all() or not positive.any():
            axes.plot([], [], color=colour, label=f"{name}: no AUROC (one-sided)")
            continue
        fpr, tpr, _ = tmf.binary_roc(probabilities[:, c], positive.long())
        axes.plot(fpr.numpy(), tpr.numpy(), color=colour, linewidth=1.8, label=f"{name}: AUROC {float(auroc[c]):.3f}")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
             ylabel="true positive rate (sensitivity)", title=f"ROC, each class against the rest\n{where}")
    axes.set_aspect("equal")
    _legend_below(figure, axes)
    save_figure(figure, path)


def plot_precision_recall(
    probabilities: Tensor, labels: Tensor, class_names: Sequence[str], ap: Tensor, where: str, path: Path
) -> None:
    """Per class, precision against recall with VOC 2010's envelope (the area under it is the AP)."""
    figure = Figure(figsize=(5.6, 7), layout="constrained")
    axes = figure.subplots()
    for c, (name, colour) in enumerate(zip(class_names, class_colours(len(class_names)))):
        positive = labels == c
        if not positive.any():
            axes.plot([], [], color=colour, label=f"{name}: no AP (no positive)")
            continue
        recall, precision, envelope = (t[0].numpy() for t in precision_recall_steps(probabilities[:, c], positive))
        # Past full recall the curve only falls vertically at recall 1: stop there.
        end = int((recall >= 1).argmax()) + 1
        recall, precision, envelope = recall[:end], precision[:end], envelope[:end]
        # Start at recall 0 with the first envelope value, so the step curve encloses the AP.
        recall_points = [0.0, *recall]
        envelope_points = [envelope[0], *envelope]
        prevalence = float(positive.double().mean())
        axes.step(recall_points, envelope_points, where="pre", color=colour, linewidth=1.8,
                  label=f"{name}: AP {float(ap[c]):.3f} (chance {prevalence:.2f})")
        axes.plot(recall, precision, linestyle="none", marker=".", markersize=3, color=colour, alpha=0.6)
    axes.plot([], [], linestyle="none", marker=".", color="grey", label="raw precision at each threshold")
    axes.set(xlim=(0, 1.01), ylim=(0, 1.05), xlabel="recall", ylabel="precision (VOC 2010 envelope)",
             title=f"Precision-recall, each class against the rest\n{where}")
    _legend_below(figure, axes)
    save_figure(figure, path)
