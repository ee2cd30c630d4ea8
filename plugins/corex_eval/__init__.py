"""corex_eval: the built-in evaluators, built on torchmetrics.

* ``classification``: study-level (or image-level) accuracy, balanced accuracy, macro-F1, AUROC,
  per-class F1 and AUROC, calibration (ECE, Brier), bootstrap 95% intervals; confusion matrix,
  reliability diagram and per-study predictions as artefacts.
* ``segmentation``: per-image Dice and IoU of the opacity masks, over all annotated images and over
  those with an opacity; a gallery of predicted outlines.

Saliency (does the classifier look at the opacity?) needs the model, not only its outputs, and is
left for a later evaluator.
"""

from __future__ import annotations

from corex import hookimpl
from corex_eval.classification import ClassificationEvaluator
from corex_eval.segmentation import SegmentationEvaluator


@hookimpl
def corex_evaluators():
    return {"classification": ClassificationEvaluator, "segmentation": SegmentationEvaluator}


__all__ = ["ClassificationEvaluator", "SegmentationEvaluator", "corex_evaluators"]
