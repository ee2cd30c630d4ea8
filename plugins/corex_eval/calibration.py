"""Calibration: ECE and Brier under bootstrap weightings, and temperature scaling.

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) divides
every logit by one number ``T`` fitted on held-out data by minimising the negative log-likelihood.
It never changes which class is predicted (so accuracy, F1 and the confusion matrix stay the
same), only how confident the probabilities are: ``T > 1`` softens an over-confident model.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.nn.functional import one_hot

from corex_eval.rules import SANE_TEMPERATURE


# Fitted temperatures outside this range are reported with a warning (and the findings say so).
EXTREME = SANE_TEMPERATURE  # corex_eval.rules


def unit_probabilities(logits: Tensor, unit: Tensor, units: int, temperature: float | Tensor = 1.0) -> Tensor:
    """Probabilities ``(units, K)`` of the scored units: the mean of ``softmax(logits / T)`` over
    the images of each unit (``unit`` ``(M,)`` numbers each image's study, or is ``arange(M)``)."""
    probabilities = torch.softmax(logits / temperature, dim=1)
    total = torch.zeros(units, logits.shape[1], dtype=probabilities.dtype).index_add(0, unit, probabilities)
    images = torch.bincount(unit, minlength=units).to(probabilities.dtype)
    return total / images[:, None]


def fit_temperature(logits: Tensor, unit: Tensor, labels: Tensor) -> float:
    """The temperature ``T`` that minimises the mean negative log-likelihood of ``labels``.

    ``logits`` ``(M, K)`` are per image and ``unit`` maps each image to its study, whose
    probability is the mean of its images' tempered softmax (as the evaluator scores it), so ``T``
    is fitted to the predictions that are actually scored. LBFGS runs on ``log T``, which keeps
    ``T`` positive and makes the problem well scaled; it starts at ``T = 1``.
    """
    logits, labels = logits.double(), labels.long()
    units = len(labels)
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    tiny = torch.finfo(torch.float64).tiny

    def closure() -> Tensor:
        optimizer.zero_grad()
        probabilities = unit_probabilities(logits, unit, units, log_temperature.exp())
        nll = -probabilities.gather(1, labels[:, None]).clamp(min=tiny).log().mean()
        nll.backward()
        return nll

    with torch.enable_grad():  # the engine evaluates under no_grad
        optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not math.isfinite(temperature):
        raise ValueError("temperature scaling diverged; the validation logits may contain inf or nan.")
    if (logits.argmax(1) == labels[unit]).all():
        # Without a single error the NLL keeps falling as T goes to 0: there is no minimum, and
        # the optimiser stops wherever the gradient becomes negligible.
        warnings.warn(f"temperature scaling: every validation image is classified correctly, so no temperature "
                      f"is best (the fit stopped at T = {temperature:.3g}); the calibrated figures are unreliable.",
                      stacklevel=2)
    elif not EXTREME[0] <= temperature <= EXTREME[1]:
        warnings.warn(f"temperature scaling fitted T = {temperature:.3g}, outside {EXTREME}; the calibrated "
                      "figures are unreliable.", stacklevel=2)
    return temperature


def weighted_ece(probabilities: Tensor, labels: Tensor, weights: Tensor, bins: int) -> Tensor:
    """Expected calibration error of the top-class confidence under each weighting ``(R, N)``: ``(R,)``.

    The binning is torchmetrics' (``multiclass_calibration_error``): ``bins`` equal-width bins
    ``[lower, upper)`` plus one for a confidence of exactly 1, and
    ``ECE = sum_b |sum_{i in b} w_i (conf_i - correct_i)| / sum_i w_i``.
    """
    confidence, predicted = probabilities.double().max(1)
    gap = confidence - (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges, right=True) - 1
    in_bin = one_hot(which, bins + 1).double()
    weights = weights.double()
    return (weights @ (gap[:, None] * in_bin)).abs().sum(1) / weights.sum(1)


def weighted_brier(probabilities: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Multi-class Brier score ``mean sum_k (p_k - y_k)^2`` under each weighting ``(R, N)``: ``(R,)``."""
    target = one_hot(labels, probabilities.shape[1]).double()
    squared_error = (probabilities.double() - target).pow(2).sum(1)
    weights = weights.double()
    return weights @ squared_error / weights.sum(1)
