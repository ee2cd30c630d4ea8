"""corex_eval: the built-in evaluators, built on torchmetrics.

* ``classification``: study-level (or image-level) accuracy, balanced accuracy, macro-F1, AUROC,
  per-class F1 and AUROC, calibration (ECE, Brier), bootstrap 95% intervals; confusion matrix,
  reliability diagram and per-study predictions as artefacts.
* ``segmentation``: per-image Dice and IoU of the opacity masks, over all annotated images and over
  those with an opacity; a gallery of predicted outlines.

* ``localization``: where the classifier looks: Grad-CAM of the true class against the opacity
  masks (pointing game, share of saliency inside the mask), with intervals and an overlay gallery.
  It sets ``needs_model``, so the engine hands it the model as well as the outputs.
"""

from __future__ import annotations

from corex import hookimpl
from corex_eval.classification import ClassificationEvaluator
from corex_eval.localization import LocalizationEvaluator
from corex_eval.segmentation import SegmentationEvaluator


@hookimpl
def corex_evaluators():
    return {
        "classification": ClassificationEvaluator,
        "segmentation": SegmentationEvaluator,
        "localization": LocalizationEvaluator,
    }


__all__ = ["ClassificationEvaluator", "LocalizationEvaluator", "SegmentationEvaluator", "corex_evaluators"]
