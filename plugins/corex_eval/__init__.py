"""corex_eval: the built-in evaluators, built on torchmetrics.

* ``classification``: study-level (or image-level) accuracy, balanced accuracy, macro-F1, AUROC,
  per-class F1, AUROC and AP, the challenge's ``study_map``, calibration (ECE, Brier, and both after
  temperature scaling fitted on the validation split), selective prediction (risk-coverage, AURC),
  bootstrap 95% intervals over patients, exact recall intervals for the verdict; confusion matrix,
  reliability diagram, ROC, precision-recall and risk-coverage curves, per-class table and
  per-study predictions as artefacts.
* ``segmentation``: per-image Dice and IoU of the opacity masks, over all annotated images and over
  those with an opacity, the false-positive area on images without one, intervals over patients;
  a gallery of predicted outlines.
* ``localization``: where the classifier looks: Grad-CAM of the true class against the opacity
  masks (pointing game, share of saliency inside the mask) next to a fixed point fitted on the
  training boxes and a uniform map, and RISE's deletion and insertion curves, with intervals and an
  overlay gallery. It sets ``needs_model``, so the engine hands it the model as well as the outputs.
* ``subgroups``: the headline classification metrics per value of the DICOM header metadata,
  against the rest of the split, paired bootstrap differences, Holm-corrected; a forest plot.
* ``multilabel``: multi-label data (NIH ChestX-ray14, CheXpert): per-label AUROC, AP and F1 at
  per-label thresholds chosen on the validation split, their macro averages, intervals over patients.
* ``knn``: a weighted cosine kNN classifier on the encoder's pooled features, fitted on the training
  split (``LearnsFromTraining``): judges an encoder without fine-tuning, e.g. right after pre-training.

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
    ready_recall: float = 0.8,
    confidence: float = 0.95,
    target_accuracy: float = 0.95,
) -> Evaluator:
    """Classification metrics, calibration, selective prediction and figures (see
    :class:`corex_eval.classification.ClassificationEvaluator`)."""
    from corex_eval.classification import ClassificationEvaluator

    return ClassificationEvaluator(class_names=class_names, head=head, level=level, bootstrap=bootstrap,
                                   calibration_bins=calibration_bins, seed=seed, split=split, ready_recall=ready_recall,
                                   confidence=confidence, target_accuracy=target_accuracy)


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
    faithfulness_steps: int = 10,
) -> Evaluator:
    """Grad-CAM of the true class against the opacity masks, next to a fixed-point prior and a uniform map, and
    its deletion and insertion curves (see :class:`corex_eval.localization.LocalizationEvaluator`)."""
    from corex_eval.localization import LocalizationEvaluator

    return LocalizationEvaluator(class_names=class_names, head=head, level=level, max_examples=max_examples,
                                 bootstrap=bootstrap, seed=seed, split=split, faithfulness_steps=faithfulness_steps)


def multilabel_evaluator(
    *,
    class_names: Sequence[str],
    head: str = "classification",
    level: Literal["study", "image"] = "study",
    threshold: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    split: str = "test",
) -> Evaluator:
    """Per-label AUROC, AP and F1 of multi-label data (see :class:`corex_eval.multilabel.MultilabelEvaluator`)."""
    from corex_eval.multilabel import MultilabelEvaluator

    return MultilabelEvaluator(class_names=class_names, head=head, level=level, threshold=threshold, bootstrap=bootstrap,
                               seed=seed, split=split)


def knn_evaluator(
    *,
    class_names: Sequence[str],
    k: int = 20,
    temperature: float = 0.07,
    level: Literal["study", "image"] = "study",
    bootstrap: int = 1000,
    seed: int = 0,
    split: str = "test",
) -> Evaluator:
    """Weighted cosine kNN on the encoder's pooled features (see :class:`corex_eval.knn.KnnEvaluator`)."""
    from corex_eval.knn import KnnEvaluator

    return KnnEvaluator(class_names=class_names, k=k, temperature=temperature, level=level, bootstrap=bootstrap, seed=seed,
                        split=split)


def subgroups_evaluator(
    *,
    class_names: Sequence[str],
    head: str = "classification",
    level: Literal["study", "image"] = "study",
    fields: tuple[str, ...] = ("age_band", "sex", "view", "manufacturer", "modality", "portable"),
    min_studies: int = 20,
    bootstrap: int = 1000,
    alpha: float = 0.05,
    correction: Literal["holm", "bonferroni"] = "holm",
    seed: int = 0,
    split: str = "test",
) -> Evaluator:
    """Headline classification metrics per subgroup of the DICOM header metadata, against the rest of the split,
    Holm-corrected (see :class:`corex_eval.subgroups.SubgroupEvaluator`)."""
    from corex_eval.subgroups import SubgroupEvaluator

    return SubgroupEvaluator(class_names=class_names, head=head, level=level, fields=fields, min_studies=min_studies,
                             bootstrap=bootstrap, alpha=alpha, correction=correction, seed=seed, split=split)


@hookimpl
def corex_evaluators():
    return {
        "classification": classification_evaluator,
        "segmentation": segmentation_evaluator,
        "localization": localization_evaluator,
        "multilabel": multilabel_evaluator,
        "knn": knn_evaluator,
        "subgroups": subgroups_evaluator,
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
    "MultilabelEvaluator": "corex_eval.multilabel",
    "KnnEvaluator": "corex_eval.knn",
    "SubgroupEvaluator": "corex_eval.subgroups",
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
    "KnnEvaluator",
    "LocalizationEvaluator",
    "MultilabelEvaluator",
    "SegmentationEvaluator",
    "SubgroupEvaluator",
    "READY_RECALL",
    "average_precision",
    "classification_evaluator",
    "corex_artefacts",
    "corex_evaluators",
    "corex_findings",
    "corex_metrics",
    "grad_cam",
    "knn_evaluator",
    "localization_evaluator",
    "multilabel_evaluator",
    "save_figure",
    "segmentation_evaluator",
    "subgroups_evaluator",
    "slug",
    "stage_findings",
    "study_map",
    "weighted_metrics",
    "write_csv",
]
