"""What corex_eval's metrics and files mean, for the report, the summary table and ``corex compare``.

Light: no torch at import (``corex --help`` and ``corex plugins`` read these); the functions that
recompute a metric from predictions import their implementation when called.
"""

from __future__ import annotations

from typing import Any

from corex.metrics import Metric


def _weighted(name: str):
    """``name`` of :func:`corex_eval.classification.weighted_metrics` on numpy arrays."""

    def score(probabilities: Any, labels: Any, weights: Any) -> Any:
        import torch

        from corex_eval.classification import weighted_metrics

        return weighted_metrics(torch.as_tensor(probabilities), torch.as_tensor(labels), torch.as_tensor(weights))[name].numpy()

    score.__name__ = f"weighted_{name}"
    return score


def _weighted_study_map(probabilities: Any, labels: Any, weights: Any) -> Any:
    import torch

    from corex_eval.average_precision import study_map

    return study_map(torch.as_tensor(probabilities), torch.as_tensor(labels), torch.as_tensor(weights)).numpy()


METRICS = (
    # classification
    Metric("macro_f1", "macro-F1", headline=True, recompute=_weighted("macro_f1"), predictions="predictions.csv",
           description="F1 averaged over classes, each class counting equally"),
    Metric("accuracy", "accuracy", headline=True, recompute=_weighted("accuracy"), predictions="predictions.csv", description="share of studies predicted right"),
    Metric("balanced_accuracy", "balanced accuracy", headline=True, recompute=_weighted("balanced_accuracy"), predictions="predictions.csv",
           description="recall averaged over the classes present"),
    Metric("auroc", "macro AUROC", headline=True, recompute=_weighted("auroc"), predictions="predictions.csv", description="one-vs-rest AUROC averaged over classes"),
    Metric("study_map", "study-level mAP", headline=True, recompute=_weighted_study_map, predictions="predictions.csv",
           description="the SIIM-FISABIO-RSNA challenge's study score: mean over classes of the VOC 2010 AP"),
    Metric("ece", "ECE", higher_is_better=False, headline=True, description="expected calibration error of the top-class confidence"),
    Metric("ece/calibrated", "ECE after temperature scaling", higher_is_better=False, headline=True),
    Metric("brier", "Brier score", higher_is_better=False, headline=True, bounds=(0.0, 2.0)),
    Metric("brier/calibrated", "Brier score after temperature scaling", higher_is_better=False, bounds=(0.0, 2.0)),
    Metric("temperature", "fitted temperature", higher_is_better=None, bounds=None),
    Metric("n", "scored studies", higher_is_better=None, bounds=None),
    Metric("f1/*", "F1 of a class"),
    Metric("auroc/*", "AUROC of a class"),
    Metric("ap/*", "average precision of a class"),
    # segmentation
    Metric("dice", "Dice", headline=True, description="mean Dice over annotated images; an empty mask predicted empty counts 1"),
    Metric("dice/positive", "Dice on images with an opacity", headline=True),
    Metric("iou", "IoU"),
    Metric("iou/positive", "IoU on images with an opacity"),
    Metric("fp_area/negative", "opacity area predicted on images without one", higher_is_better=False),
    Metric("n_masks", "annotated images", higher_is_better=None, bounds=None),
    Metric("n_masks/positive", "images with an opacity", higher_is_better=None, bounds=None),
    # localization
    Metric("pointing_game", "pointing game", headline=True, description="share of images whose saliency maximum lies in a box"),
    Metric("saliency_in_mask", "saliency inside the boxes"),
    Metric("mask_area", "box area (a uniform map's pointing-game hit rate)", higher_is_better=None),
    Metric("n_localized", "images with boxes scored", higher_is_better=None, bounds=None),
    Metric("pointing_game/prior", "pointing game of the training boxes' fixed point",
           description="share of images whose box holds the one pixel inside the most training boxes"),
    Metric("pointing_game/vs_prior", "pointing game minus the fixed point's", bounds=(-1.0, 1.0)),
    Metric("deletion_auc", "deletion AUC (RISE)", higher_is_better=False,
           description="true-class probability as the most salient pixels are removed first, area over the share removed"),
    Metric("insertion_auc", "insertion AUC (RISE)", description="true-class probability as the most salient pixels are put back first"),
    Metric("deletion_auc/random", "deletion AUC of a random pixel order", higher_is_better=None),
    Metric("insertion_auc/random", "insertion AUC of a random pixel order", higher_is_better=None),
    Metric("deletion_auc/vs_random", "deletion AUC minus a random order's", higher_is_better=False, bounds=(-1.0, 1.0)),
    Metric("insertion_auc/vs_random", "insertion AUC minus a random order's", bounds=(-1.0, 1.0)),
    # selective prediction (classification)
    Metric("selective/aurc", "AURC (risk-coverage)", higher_is_better=False,
           description="area under the risk-coverage curve of the calibrated top-class probability"),
    Metric("selective/e_aurc", "excess AURC over an oracle ranking", higher_is_better=False),
    Metric("selective/accuracy_at_90", "accuracy on the 90% most confident studies"),
    Metric("selective/accuracy_at_80", "accuracy on the 80% most confident studies"),
    Metric("selective/coverage_at_target", "share of studies answered at the target accuracy"),
    # subgroups
    Metric("subgroups/examined", "subgroups examined", higher_is_better=None, bounds=None),
    Metric("subgroups/tests", "subgroup tests corrected for", higher_is_better=None, bounds=None),
    Metric("subgroups/worse", "subgroups worse than the rest beyond chance", higher_is_better=False, bounds=None),
    Metric("subgroup/*", "a metric on a subgroup, or its difference from the rest", bounds=None),
    # multilabel
    Metric("multilabel/auroc", "macro AUROC over findings", headline=True,
           description="AUROC of each finding over its known labels, averaged over findings with a positive and a negative"),
    Metric("multilabel/ap", "macro AP over findings", headline=True,
           description="average precision (scikit-learn's) of each finding, averaged over findings with a positive and a negative"),
    Metric("multilabel/f1", "macro F1 over findings", description="F1 of each finding at its threshold (F1-best on validation)"),
    Metric("multilabel/labels", "findings in the macro averages", higher_is_better=None, bounds=None),
    Metric("multilabel/n", "scored studies", higher_is_better=None, bounds=None),
    Metric("multilabel/auroc/*", "AUROC of a finding"),
    Metric("multilabel/ap/*", "average precision of a finding"),
    Metric("multilabel/f1/*", "F1 of a finding at its threshold"),
    # knn
    Metric("knn/macro_f1", "kNN macro-F1", headline=True, description="macro-F1 of a weighted kNN vote on the encoder's pooled features"),
    Metric("knn/accuracy", "kNN accuracy"),
    Metric("knn/balanced_accuracy", "kNN balanced accuracy"),
    Metric("knn/auroc", "kNN macro AUROC", headline=True,
           description="one-vs-rest AUROC of the kNN vote probabilities (per-finding scores on multi-label data), averaged"),
    Metric("knn/ap", "kNN macro AP", description="average precision of the kNN per-finding scores, averaged (multi-label data)"),
    Metric("knn/auroc/*", "kNN AUROC of a finding"),
    Metric("knn/ap/*", "kNN average precision of a finding"),
    Metric("knn/n", "studies scored by kNN", higher_is_better=None, bounds=None),
    Metric("knn/n_train", "training images in the kNN bank", higher_is_better=None, bounds=None),
)

# What each file an evaluator writes shows; {split} is the evaluate stage's split.
ARTEFACTS = {
    "confusion_matrix.png": "Confusion matrix on the {split} split: counts, and shares of each true class (rows; recall on the "
                            "diagonal). Off-diagonal cells are the confusions a clinician would see.",
    "roc.png": "ROC curves on the {split} split, one per class against the rest: how true-positive and false-positive rates "
               "trade off as the decision threshold moves.",
    "pr.png": "Precision-recall curves on the {split} split, one per class: how many flagged studies are right (precision) "
              "against how many of the class are found (recall).",
    "reliability.png": "Reliability diagram on the {split} split: accuracy per bin of top-class confidence against the "
                       "diagonal of perfect calibration, with how many predictions fall in each bin.",
    "segmentation_examples.png": "Segmentation gallery from the {split} split: the target opacity outline (green) and the "
                                 "predicted one (red), with each image's Dice.",
    "saliency_examples.png": "Saliency gallery from the {split} split: Grad-CAM of the true class (colour, blue low to red "
                             "high) over the image, box outlines in green; a hit means the saliency maximum lies inside a box.",
    "per_class.csv": "Per class on the {split} split: support, precision, recall, F1, AUROC and AP, the recalled count and "
                     "the recall's exact (Clopper-Pearson) interval.",
    "predictions.csv": "One row per scored study of the {split} split: its label, the predicted class and every class's probability.",
    "multilabel_per_label.csv": "Per finding on the {split} split: positives, negatives and unknown labels, AUROC, AP, the "
                                "decision threshold and where it comes from (F1-best on validation, fixed or the default "
                                "0.5), and precision, recall and F1 at it.",
    "multilabel_predictions.csv": "One row per scored study of the {split} split: every finding's probability and its label "
                                  "(empty where unknown).",
    "knn_predictions.csv": "One row per scored study of the {split} split: its label, the kNN prediction and every class's "
                           "vote share (for multi-label data: every finding's score and label).",
    "risk_coverage.png": "Risk-coverage curve on the {split} split: the error rate among the studies answered when the least "
                         "confident are referred, against the share answered, for the model and for an oracle that ranks every "
                         "error last; the 90% and 80% coverages marked.",
    "subgroups.png": "Subgroups of the {split} split by DICOM header value: each subgroup's macro-F1, balanced accuracy, accuracy "
                     "and AUROC minus the rest of the split's, with 95% patient-bootstrap intervals; red where worse beyond "
                     "chance after the multiplicity correction.",
    "subgroups.csv": "Per subgroup and metric on the {split} split: size, the subgroup's value and interval, the rest's, the "
                     "paired difference and its interval, the p-value and its corrected value, and whether it is worse beyond chance.",
}
