"""Average precision as the SIIM-FISABIO-RSNA COVID-19 challenge scored it, and ``study_map``.

The challenge (Kaggle, 2021) scored with "standard PASCAL VOC 2010 mean Average Precision (mAP)
at IoU > 0.5". A study-level prediction was submitted as one whole-image box per class with that
class's confidence (``typical 0.7 0 0 1 1``), so every box overlaps its study's ground-truth box
and the IoU test always passes: the study-level AP of a class is the VOC AP of ranking the studies
by that class's probability, a study of that class being a true positive.

PASCAL VOC 2010 AP ("all-point interpolation", Everingham et al., VOC 2010 development kit):
walk down the ranking, compute precision and recall after each prediction, replace each precision
by the highest precision at any equal or higher recall (the monotone *envelope*), and take the
area under that step curve: ``AP = sum_n (R_n - R_{n-1}) * max_{m >= n} P_m``. VOC 2010 replaced
the 11-point interpolation of VOC 2007 by this, and the challenge named VOC 2010, so 11 points are
*not* used here.

Two differences from ``sklearn.metrics.average_precision_score``, which computes
``sum_n (R_n - R_{n-1}) * P_n`` without the envelope:

* the envelope can only raise precision, so VOC AP >= scikit-learn's AP; they are equal when the
  precision never rises further down the ranking (for instance when every positive ranks above
  every negative, or positives come in one block);
* tied scores: here, as in scikit-learn, studies with equal scores form one threshold (one point
  of the curve), so the result does not depend on the order in which studies arrive. The VOC code
  sorts the detections and walks them one by one, so with ties its result depends on the sort.
  Softmax probabilities of a trained model are rarely tied exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def precision_recall_steps(scores: Tensor, positive: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Recall, precision and VOC's precision envelope after each threshold, each ``(R, G)``.

    Thresholds run from the highest score down; tied scores form one threshold (``G`` distinct
    scores). ``weights`` ``(R, N)`` weigh the samples (``None``: one weighting of ones). Recall is
    ``nan`` in a weighting without positives.
    """
    if weights is None:
        weights = torch.ones(1, len(scores), dtype=torch.float64)
    order = scores.argsort(descending=True, stable=True)
    score = scores[order]
    is_positive = positive[order].double()
    w = weights.double()[:, order]
    true_positive = (w * is_positive).cumsum(1)
    false_positive = (w * (1 - is_positive)).cumsum(1)
    # A group of tied scores is one threshold: keep the counts after its last member.
    last_of_group = torch.ones(len(score), dtype=torch.bool)
    last_of_group[:-1] = score[1:] != score[:-1]
    true_positive, false_positive = true_positive[:, last_of_group], false_positive[:, last_of_group]
    recall = true_positive / true_positive[:, -1:]
    # 0/0 only before the first sample with weight; recall does not move there, so 0 is harmless.
    precision = (true_positive / (true_positive + false_positive)).nan_to_num(0.0)
    envelope = precision.flip(1).cummax(1).values.flip(1)
    return recall, precision, envelope


def average_precision(scores: Tensor, positive: Tensor, weights: Tensor | None = None) -> Tensor:
    """PASCAL VOC 2010 (all-point, enveloped) average precision of one class.

    ``scores`` ``(N,)`` rank the samples (higher means more likely positive); ``positive``
    ``(N,)`` says which samples are of the class. ``weights`` ``(R, N)`` weigh each sample in each
    of ``R`` weightings (bootstrap draw counts; ``None`` is one weighting of ones). Returns ``(R,)``
    (a 0-d tensor when ``weights`` is ``None``): ``nan`` where a weighting has no positive.
    """
    recall, _, envelope = precision_recall_steps(scores, positive, weights)
    recall_step = torch.diff(recall, dim=1, prepend=torch.zeros_like(recall[:, :1]))
    ap = (recall_step * envelope).sum(1)
    ap = torch.where(recall[:, -1].isnan(), torch.nan, ap)
    return ap[0] if weights is None else ap


def average_precision_per_class(probabilities: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """One-vs-rest :func:`average_precision` of every class: ``(K,)``, or ``(R, K)`` with ``weights``."""
    columns = [
        average_precision(probabilities[:, c], labels == c, weights) for c in range(probabilities.shape[1])
    ]
    return torch.stack(columns, -1)


def study_map(probabilities: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """The challenge's study-level score: the mean over classes of :func:`average_precision`.

    A class with no positive study has no AP and is left out of the mean (``nan`` if none has one).
    """
    return average_precision_per_class(probabilities, labels, weights).nanmean(-1)
