"""corex_eval: the built-in evaluators, built on torchmetrics.

* ``classification``: study-level (or image-level) accuracy, balanced accuracy, macro-F1, AUROC,
  per-class F1, AUROC and AP, the challenge's ``study_map``, calibration (ECE, Brier, and both after
  temperature scaling fitted on the validation split), bootstrap 95% intervals over patients;
  confusion matrix, reliability diagram, ROC and precision-recall curves, per-class table and
  per-study predictions as artefacts.
* ``segmentation``: per-image Dice and IoU of the opacity masks, over all annotated images and over
  those with an opacity, the false-positive area on images without one, intervals over patients;
  a gallery of predicted outlines.
* ``localization``: where the classifier looks: Grad-CAM of the true class against the opacity
  masks (pointing game, share of saliency inside the mask), with intervals and an overlay gallery.
  It sets ``needs_model``, so the engine hands it the model as well as the outputs.

Building blocks other plugins may use: :mod:`corex_eval.average_precision` (VOC 2010 AP and
``study_map`` under bootstrap weightings), :mod:`corex_eval.bootstrap` (the patient-cluster
bootstrap), :mod:`corex_eval.calibration` (temperature scaling, weighted ECE and Brier).
"""

from __future__ import annotations

from corex import hookimpl
from corex_eval.average_precision import average_precision, study_map
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


__all__ = ["ClassificationEvaluator", "LocalizationEvaluator", "SegmentationEvaluator", "average_precision", "corex_evaluators", "study_map"]
