"""Segmentation evaluator: per-image Dice and IoU of the opacity masks, false-positive area."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchmetrics.functional.segmentation as tms
from matplotlib.lines import Line2D
from torch import Tensor

from corex_eval.artefacts import save_gallery
from corex_eval.bootstrap import cluster_index, percentile_intervals, resample_blocks

GALLERY_SIZE = 8


class SegmentationEvaluator:
    """Score the mask logits ``(B, 1, H, W)`` of one segmentation head against the batch's ``mask``.

    A pixel is predicted as opacity when ``sigmoid(logit) > threshold``. Only samples with
    ``has_mask`` are scored: an unannotated image has no target, whereas a negative study with no
    boxes is a real, empty annotation and is scored.

    Metrics (:meth:`compute`):

    * ``dice`` and ``iou``: per-image Dice ``2|P∩T| / (|P|+|T|)`` and IoU ``|P∩T| / |P∪T|``
      averaged over images. An image whose target and prediction are both empty scores 1 (a
      correct "no opacity"); torchmetrics leaves that case undefined, so it is set explicitly.
      With many negative studies these means are inflated by such easy 1s: read them with the
      next two.
    * ``dice/positive`` and ``iou/positive``: the same means over images whose target is not
      empty: how well opacities are outlined.
    * ``fp_area/negative``: over images whose target is empty, the mean share of the image
      predicted as opacity (0 is right; 0.1 means a tenth of a clear radiograph marked). Left
      out when every scored image has an opacity.
    * ``n_masks`` and ``n_masks/positive``: how many images were scored (``n`` is left to the
      classification evaluator, so both fit in one stage without a name clash).

    :meth:`intervals` gives 95% percentile-bootstrap intervals of ``dice``, ``dice/positive`` and
    ``fp_area/negative`` (``bootstrap`` resamples with ``seed``; 0 disables them). A resample
    draws patients (``patient_id``; else studies, ``study_id``; else images) with replacement
    and takes all their images, so the images of one patient are never treated as independent.

    :meth:`save` draws the first few scored images with the target (green) and predicted (red)
    outlines, their class (when the core supplies ``class_names``) and the split; only those few
    are kept in memory.
    """

    def __init__(
        self,
        *,
        head: str = "segmentation",
        threshold: float = 0.5,
        bootstrap: int = 1000,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        split: str = "test",
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
        if bootstrap < 0:
            raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}.")
        self.head = head
        self.threshold = threshold
        self.bootstrap = bootstrap
        self.seed = seed
        self.class_names = None if class_names is None else list(class_names)
        self.split = split
        self.reset()

    def reset(self) -> None:
        self._dice: list[Tensor] = []
        self._iou: list[Tensor] = []
        self._positive: list[Tensor] = []
        self._predicted_area: list[Tensor] = []
        self._clusters: list[str] = []
        self._gallery: list[dict[str, Any]] = []

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        if self.head not in outputs:
            raise ValueError(f"head {self.head!r} is not among the outputs {sorted(outputs)}.")
        logits = outputs[self.head].detach().float().cpu()
        if logits.shape != batch["mask"].shape:
            shape, expected = tuple(logits.shape), tuple(batch["mask"].shape)
            raise ValueError(f"head {self.head!r} gave shape {shape}; the masks have {expected}.")
        annotated = batch["has_mask"].detach().bool().cpu()
        if not annotated.any():
            return
        predicted = (torch.sigmoid(logits[annotated]) > self.threshold).long()
        target = (batch["mask"].detach().cpu()[annotated] > 0.5).long()
        dice, iou = dice_and_iou(predicted, target)
        self._dice.append(dice)
        self._iou.append(iou)
        self._positive.append(target.flatten(1).any(1))
        predicted_area = predicted.flatten(1).float().mean(1)
        self._predicted_area.append(predicted_area)
        keep = annotated.tolist()
        image_ids = [i for i, a in zip(batch["image_id"], keep, strict=True) if a]
        # Bootstrap clusters: the patient, else the study, else the image itself.
        key = next((k for k in ("patient_id", "study_id") if batch.get(k) is not None), "image_id")
        self._clusters += [str(c) for c, a in zip(batch[key], keep, strict=True) if a]

        room = GALLERY_SIZE - len(self._gallery)
        if room <= 0:
            return
        image = batch["image"]
        images = image[annotated.to(image.device)][:room].detach().float().cpu()
        labels = batch.get("label")
        labels = None if labels is None else labels.detach().cpu()[annotated].tolist()
        for i in range(min(room, len(image_ids))):
            self._gallery.append(
                {
                    "image_id": image_ids[i],
                    "image": images[i, 0].numpy().copy(),
                    "target": target[i, 0].numpy().copy(),
                    "predicted": predicted[i, 0].numpy().copy(),
                    "dice": float(dice[i]),
                    "predicted_area": float(predicted_area[i]),
                    "class": self._class_name(None if labels is None else labels[i]),
                }
            )

    def _class_name(self, label: int | None) -> str | None:
        if label is None or label < 0 or self.class_names is None or label >= len(self.class_names):
            return None
        return self.class_names[label]

    def compute(self) -> dict[str, float]:
        if not self._dice:
            scores = {name: math.nan for name in ("dice", "iou", "dice/positive", "iou/positive")}
            return scores | {"n_masks": 0.0, "n_masks/positive": 0.0}
        dice, iou, positive = torch.cat(self._dice), torch.cat(self._iou), torch.cat(self._positive)
        area = torch.cat(self._predicted_area)
        metrics = {
            "dice": float(dice.mean()),
            "iou": float(iou.mean()),
            "dice/positive": float(dice[positive].mean()),  # nan when no target has an opacity
            "iou/positive": float(iou[positive].mean()),
            "n_masks": float(len(dice)),
            "n_masks/positive": float(positive.sum()),
        }
        if not positive.all():  # only where some scored image is clear of opacity
            metrics["fp_area/negative"] = float(area[~positive].mean())
        return metrics

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% percentile-bootstrap intervals of ``dice``, ``dice/positive`` and ``fp_area/negative``."""
        if self.bootstrap == 0 or not self._dice:
            return {}
        dice, positive = torch.cat(self._dice).double(), torch.cat(self._positive).double()
        area = torch.cat(self._predicted_area).double()
        values: dict[str, list[Tensor]] = {"dice": [], "dice/positive": [], "fp_area/negative": []}
        for counts in resample_blocks(cluster_index(self._clusters), self.bootstrap, self.seed):
            # A weighted mean over the selected images; 0/0 (none drawn) is nan and ignored.
            values["dice"].append(counts @ dice / counts.sum(1))
            values["dice/positive"].append(counts @ (dice * positive) / (counts @ positive))
            values["fp_area/negative"].append(counts @ (area * (1 - positive)) / (counts @ (1 - positive)))
        return percentile_intervals(values)

    def save(self, out_dir: Path) -> None:
        """Write ``segmentation_examples.png`` (nothing when no annotated sample was seen)."""
        if not self._gallery:
            return
        legend = [
            Line2D([], [], color="lime", label="target: the radiologists' opacity boxes"),
            Line2D([], [], color="red", label=f"prediction: sigmoid > {self.threshold:g}"),
        ]
        note = ("An image without opacity whose prediction is also empty scores Dice 1.0 by convention "
                "(nothing to find, nothing marked); plain `dice` counts these, `dice/positive` does not.")
        save_gallery(Path(out_dir) / "segmentation_examples.png", self._gallery, _draw_outlines,
                     f"Opacity segmentation, {self.split} split: first {len(self._gallery)} annotated images",
                     legend=legend, note=note)


def _draw_outlines(axes: Any, example: dict[str, Any]) -> str:
    for key, colour in (("target", "lime"), ("predicted", "red")):
        if example[key].any():  # contour() of a constant mask only warns
            axes.contour(example[key], levels=[0.5], colors=colour, linewidths=1.2)
    name = f"{example['class']}: " if example.get("class") else ""
    if example["target"].any():
        return f"{name}Dice {example['dice']:.2f}"
    if not example["predicted"].any():
        return f"{name}no opacity, none predicted\nDice 1.0 (empty = empty)"
    return f"{name}no opacity, {example['predicted_area']:.1%} marked\nDice 0 (false positive)"


def dice_and_iou(predicted: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image Dice and IoU of binary masks ``(B, 1, H, W)``; 1 where both masks are empty."""
    both_empty = (predicted.flatten(1).sum(1) == 0) & (target.flatten(1).sum(1) == 0)
    dice = tms.dice_score(predicted, target, num_classes=1, average="none", input_format="one-hot")[:, 0]
    iou = tms.mean_iou(predicted, target, num_classes=1, per_class=True, input_format="one-hot")[:, 0]
    # torchmetrics gives nan (Dice) and -1 (IoU) for empty-versus-empty; we count it as a match.
    return torch.where(both_empty, 1.0, dice), torch.where(both_empty, 1.0, iou)
