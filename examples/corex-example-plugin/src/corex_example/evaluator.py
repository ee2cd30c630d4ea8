"""Per-class sensitivity at a fixed specificity: how many cases a screening threshold would catch.

A deployment fixes an operating point, often by the share of healthy cases it may flag; for each
class (one against the rest) this evaluator finds the threshold on that class's softmax
probability that keeps at least ``specificity`` of the other classes' studies below it, and
reports the share of the class's own studies above it. It is the highest point of the ROC curve
with a false-positive rate of at most ``1 - specificity``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from corex.rundir import atomic_path

# Float slack when comparing a count of negatives with specificity * count.
_EPS = 1e-9


class SensitivityAtSpecificity:
    """Streaming evaluator (:class:`corex.interfaces.Evaluator`) over one classification head.

    ``update`` keeps the softmax probabilities of the labelled samples (``label >= 0``);
    ``compute`` returns, with ``S = round(100 * specificity)``:

    * ``sens_at_specS/<class>``: that class's sensitivity at the operating point;
    * ``sens_at_specS``: their mean over the classes that have both positives and negatives
      (a class without either gives NaN and is left out of the mean).

    ``save(out_dir)`` writes ``sens_at_specS.csv`` with each class's threshold, sensitivity,
    achieved specificity and counts: the numbers a deployment would configure.
    """

    def __init__(self, *, head: str = "classification", specificity: float = 0.9, class_names: Sequence[str] | None = None):
        if not 0.0 < specificity < 1.0:
            raise ValueError(f"specificity must lie strictly between 0 and 1, got {specificity}.")
        self.head = head
        self.specificity = specificity
        self.class_names = None if class_names is None else list(class_names)
        self.name = f"sens_at_spec{100 * specificity:g}"
        self.reset()

    def reset(self) -> None:
        self._probabilities: list[Tensor] = []
        self._labels: list[Tensor] = []

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        logits = outputs[self.head].detach().float().cpu()  # a missing head: corex names it
        labels = batch["label"].detach().cpu().long()
        known = labels >= 0
        self._probabilities.append(torch.softmax(logits[known], dim=1))
        self._labels.append(labels[known])

    def operating_points(self) -> list[dict[str, Any]]:
        """One row per class: threshold, sensitivity, achieved specificity, positives, negatives."""
        if not self._probabilities:
            return []
        probabilities, labels = torch.cat(self._probabilities), torch.cat(self._labels)
        names = self.class_names or [f"class{k}" for k in range(probabilities.shape[1])]
        return [self._operating_point(names[k], probabilities[:, k], labels == k) for k in range(probabilities.shape[1])]

    def _operating_point(self, name: str, scores: Tensor, is_positive: Tensor) -> dict[str, Any]:
        positives, negatives = scores[is_positive], scores[~is_positive]
        row = {"class": name, "positives": len(positives), "negatives": len(negatives)}
        if len(positives) == 0 or len(negatives) == 0:
            return row | {"threshold": math.nan, "sensitivity": math.nan, "specificity": math.nan}
        # At most this many negatives may score above the threshold.
        allowed = math.floor(len(negatives) * (1.0 - self.specificity) + _EPS)
        if allowed >= len(negatives):
            cut = -math.inf
        else:
            # Flag what scores above the (allowed+1)-th highest negative: ties with it stay unflagged.
            cut = float(torch.sort(negatives, descending=True).values[allowed])
        return row | {
            "threshold": cut,
            "sensitivity": float((positives > cut).double().mean()),
            "specificity": float((negatives <= cut).double().mean()),
        }

    def compute(self) -> dict[str, float]:
        points = self.operating_points()
        metrics = {f"{self.name}/{p['class']}": p["sensitivity"] for p in points}
        defined = [p["sensitivity"] for p in points if not math.isnan(p["sensitivity"])]
        metrics[self.name] = sum(defined) / len(defined) if defined else math.nan
        return metrics

    def save(self, out_dir: Path) -> None:
        points = self.operating_points()
        if not points:
            return
        with atomic_path(Path(out_dir) / f"{self.name}.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["class", "threshold", "sensitivity", "specificity", "positives", "negatives"])
            writer.writeheader()
            writer.writerows(points)
