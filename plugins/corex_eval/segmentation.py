"""Segmentation evaluator: per-image Dice and IoU of the opacity masks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchmetrics.functional.segmentation as tms
from torch import Tensor

from corex_eval.artefacts import save_gallery

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
    * ``dice/positive`` and ``iou/positive``: the same means over images whose target is not
      empty. Correct empty predictions on negative studies inflate the plain means, so these are
      the figures that say how well opacities are outlined.
    * ``n_masks`` and ``n_masks/positive``: how many images were scored (``n`` is left to the
      classification evaluator, so both fit in one stage without a name clash).

    :meth:`save` draws the first few scored images with the target (green) and predicted (red)
    outlines; only those few are kept in memory.
    """

    def __init__(self, *, head: str = "segmentation", threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
        self.head = head
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._dice: list[Tensor] = []
        self._iou: list[Tensor] = []
        self._positive: list[Tensor] = []
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

        room = GALLERY_SIZE - len(self._gallery)
        if room <= 0:
            return
        image_ids = [i for i, a in zip(batch["image_id"], annotated.tolist(), strict=True) if a]
        image = batch["image"]
        images = image[annotated.to(image.device)][:room].detach().float().cpu()
        for i in range(min(room, len(image_ids))):
            self._gallery.append(
                {
                    "image_id": image_ids[i],
                    "image": images[i, 0].numpy().copy(),
                    "target": target[i, 0].numpy().copy(),
                    "predicted": predicted[i, 0].numpy().copy(),
                    "dice": float(dice[i]),
                }
            )

    def compute(self) -> dict[str, float]:
        if not self._dice:
            scores = {name: math.nan for name in ("dice", "iou", "dice/positive", "iou/positive")}
            return scores | {"n_masks": 0.0, "n_masks/positive": 0.0}
        dice, iou, positive = torch.cat(self._dice), torch.cat(self._iou), torch.cat(self._positive)
        return {
            "dice": float(dice.mean()),
            "iou": float(iou.mean()),
            "dice/positive": float(dice[positive].mean()),  # nan when no target has an opacity
            "iou/positive": float(iou[positive].mean()),
            "n_masks": float(len(dice)),
            "n_masks/positive": float(positive.sum()),
        }

    def save(self, out_dir: Path) -> None:
        """Write ``segmentation_examples.png`` (nothing when no annotated sample was seen)."""
        if not self._gallery:
            return
        save_gallery(Path(out_dir) / "segmentation_examples.png", self._gallery, _draw_outlines,
                     "target (green) and predicted (red) opacity outlines")


def _draw_outlines(axes: Any, example: dict[str, Any]) -> str:
    for key, colour in (("target", "lime"), ("predicted", "red")):
        if example[key].any():  # contour() of a constant mask only warns
            axes.contour(example[key], levels=[0.5], colors=colour, linewidths=1)
    return f"Dice {example['dice']:.2f}"


def dice_and_iou(predicted: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image Dice and IoU of binary masks ``(B, 1, H, W)``; 1 where both masks are empty."""
    both_empty = (predicted.flatten(1).sum(1) == 0) & (target.flatten(1).sum(1) == 0)
    dice = tms.dice_score(predicted, target, num_classes=1, average="none", input_format="one-hot")[:, 0]
    iou = tms.mean_iou(predicted, target, num_classes=1, per_class=True, input_format="one-hot")[:, 0]
    # torchmetrics gives nan (Dice) and -1 (IoU) for empty-versus-empty; we count it as a match.
    return torch.where(both_empty, 1.0, dice), torch.where(both_empty, 1.0, iou)
