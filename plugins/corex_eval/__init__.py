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

This module imports no torch or torchmetrics: ``corex --help`` and ``corex plugins`` load it to
read the factories' signatures, and each factory imports its evaluator when a run builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from corex import hookimpl
from corex.interfaces import Evaluator
from corex.lazy import lazy_exports


def classification_evaluator(
    *,
    class_names: Sequence[str],
    head: str = "classification",
    level: Literal["study", "image"] = "study",
    bootstrap: int = 1000,
    calibration_bins: int = 15,
    seed: int = 0,
    split: str = "test",
) -> Evaluator:
    """Classification metrics, calibration and figures (see :class:`corex_eval.classification.ClassificationEvaluator`)."""
    from corex_eval.classification import ClassificationEvaluator

    return ClassificationEvaluator(class_names=class_names, head=head, level=level, bootstrap=bootstrap,
                                   calibration_bins=calibration_bins, seed=seed, split=split)


def segmentation_evaluator(
    *,
    head: str = "segmentation",
    threshold: float = 0.5,
    bootstrap: int = 1000,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    split: str = "test",
) -> Evaluator:
    """Dice, IoU and false-positive area of the opacity masks (see :class:`corex_eval.segmentation.SegmentationEvaluator`)."""
    from corex_eval.segmentation import SegmentationEvaluator

    return SegmentationEvaluator(head=head, threshold=threshold, bootstrap=bootstrap, seed=seed,
                                 class_names=class_names, split=split)


def localization_evaluator(
    *,
    class_names: Sequence[str],
    head: str = "classification",
    level: int = -1,
    max_examples: int = 8,
    bootstrap: int = 1000,
    seed: int = 0,
    split: str = "test",
) -> Evaluator:
    """Grad-CAM of the true class against the opacity masks (see :class:`corex_eval.localization.LocalizationEvaluator`)."""
    from corex_eval.localization import LocalizationEvaluator

    return LocalizationEvaluator(class_names=class_names, head=head, level=level, max_examples=max_examples,
                                 bootstrap=bootstrap, seed=seed, split=split)


@hookimpl
def corex_evaluators():
    return {
        "classification": classification_evaluator,
        "segmentation": segmentation_evaluator,
        "localization": localization_evaluator,
    }


@hookimpl
def corex_metrics():
    from corex_eval.declared import METRICS

    return METRICS


@hookimpl
def corex_artefacts():
    from corex_eval.declared import ARTEFACTS

    return ARTEFACTS


@hookimpl
def corex_findings(run_dir, stage, result):
    from corex_eval.findings import stage_findings

    return stage_findings(run_dir, stage, result)


__getattr__ = lazy_exports(__name__, {
    "ClassificationEvaluator": "corex_eval.classification",
    "SegmentationEvaluator": "corex_eval.segmentation",
    "LocalizationEvaluator": "corex_eval.localization",
    "average_precision": "corex_eval.average_precision",
    "study_map": "corex_eval.average_precision",
    "slug": "corex_eval.artefacts",
    "save_figure": "corex_eval.artefacts",
    "write_csv": "corex_eval.artefacts",
    "weighted_metrics": "corex_eval.classification",
    "grad_cam": "corex_eval.localization",
    "stage_findings": "corex_eval.findings",
    "READY_RECALL": "corex_eval.findings",
})
__all__ = [
    "ClassificationEvaluator",
    "LocalizationEvaluator",
    "SegmentationEvaluator",
    "READY_RECALL",
    "average_precision",
    "classification_evaluator",
    "corex_artefacts",
    "corex_evaluators",
    "corex_findings",
    "corex_metrics",
    "grad_cam",
    "localization_evaluator",
    "save_figure",
    "segmentation_evaluator",
    "slug",
    "stage_findings",
    "study_map",
    "weighted_metrics",
    "write_csv",
]
