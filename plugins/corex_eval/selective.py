"""Selective prediction: what is gained by referring the least confident studies to a reader.

A model that abstains on its least confident cases and answers the rest trades *coverage* (the share
answered) for *selective risk* (the error rate among them). The risk-coverage curve (Geifman and
El-Yaniv, "Selective classification for deep neural networks", NeurIPS 2017) ranks the studies by
the confidence of the predicted class (the softmax response, here the top-class probability after
temperature scaling) and plots, for each coverage ``k / N``, the error rate among the ``k`` most
confident. Its area (AURC) is low when errors are both rare and ranked last. An *oracle* that ranks
every error last has the smallest possible area for the same errors, ``AURC*``; the excess
``E-AURC = AURC - AURC*`` (Geifman et al., "Bias-reduced uncertainty estimation for deep neural
classifiers", ICLR 2019; used as the ranking measure by Ding et al., "Revisiting the evaluation of
uncertainty estimation and its application to explore model complexity-uncertainty trade-off",
CVPR-W 2020) measures the ranking alone, free of how many errors there are.

Conventions. ``AURC = (1/N) sum_{k=1..N} risk(k)`` (one point per study, as in Geifman et al.).
Studies with equal confidence form one tie group and are taken in a random order: ``risk(k)``
inside a group is its *expectation* over that order (the group's errors spread evenly over its
positions), so nothing depends on the order in which the studies arrive, and the AURC is the mean
AURC over all orderings of the ties. Weights (bootstrap draw counts) count a study that many times;
they enter through harmonic numbers (``H(n) = digamma(n + 1) + gamma``), so all resamples are
scored at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _groups(confidence: Tensor, correct: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per tie group, from the most confident down: weight ``(R, G)`` and weighted errors ``(R, G)``."""
    order = confidence.double().argsort(descending=True, stable=True)
    score = confidence.double()[order]
    new_group = torch.cat([torch.zeros(1, dtype=torch.long), (score[1:] != score[:-1]).long()])
    group = new_group.cumsum(0)
    count = int(group[-1]) + 1 if len(group) else 0
    w = weights.double()[:, order]
    errors = w * (~correct.bool()[order]).double()
    size = torch.zeros(w.shape[0], count, dtype=torch.float64).index_add_(1, group, w)
    wrong = torch.zeros(w.shape[0], count, dtype=torch.float64).index_add_(1, group, errors)
    return size, wrong


def _harmonic_difference(upper: Tensor, lower: Tensor) -> Tensor:
    """``H(upper) - H(lower)`` for real ``upper >= lower >= 0``."""
    return torch.special.digamma(upper + 1) - torch.special.digamma(lower + 1)


def _area(size: Tensor, wrong: Tensor) -> Tensor:
    """``sum_k risk(k)`` over the positions of tie groups ``(R, G)`` (errors spread evenly in a group)."""
    before = size.cumsum(1) - size
    errors_before = wrong.cumsum(1) - wrong
    rate = torch.where(size > 0, wrong / size.clamp(min=1e-300), 0.0)
    return ((errors_before - before * rate) * _harmonic_difference(before + size, before) + rate * size).sum(1)


def aurc(confidence: Tensor, correct: Tensor, weights: Tensor | None = None) -> Tensor:
    """Area under the risk-coverage curve; ``(R,)`` under weights ``(R, N)``, 0-d without."""
    w = torch.ones(1, len(confidence), dtype=torch.float64) if weights is None else weights.double()
    size, wrong = _groups(confidence, correct, w)
    value = _area(size, wrong) / w.sum(1)
    return value[0] if weights is None else value


def oracle_aurc(correct: Tensor, weights: Tensor | None = None) -> Tensor:
    """The AURC of a ranking with every error last: ``(1/N) (E - (N - E) (H(N) - H(N - E)))``."""
    w = torch.ones(1, len(correct), dtype=torch.float64) if weights is None else weights.double()
    total = w.sum(1)
    errors = (w * (~correct.bool()).double()).sum(1)
    value = (errors - (total - errors) * _harmonic_difference(total, total - errors)) / total
    return value[0] if weights is None else value


def _cumulative(confidence: Tensor, correct: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative weight and errors at the tie groups' ends, from 0: ``(R, G + 1)`` each."""
    size, wrong = _groups(confidence, correct, w)
    zero = torch.zeros(w.shape[0], 1, dtype=torch.float64)
    return torch.cat([zero, size.cumsum(1)], 1), torch.cat([zero, wrong.cumsum(1)], 1)


def _interpolate(edges: Tensor, errors: Tensor, x: Tensor) -> Tensor:
    """Errors among the first ``x`` ``(R, P)`` positions, linear inside a tie group."""
    right = torch.searchsorted(edges.contiguous(), x.contiguous(), right=False).clamp(1, edges.shape[1] - 1)
    left = right - 1
    x0, x1 = edges.gather(1, left), edges.gather(1, right)
    y0, y1 = errors.gather(1, left), errors.gather(1, right)
    share = torch.where(x1 > x0, (x - x0) / (x1 - x0).clamp(min=1e-300), 1.0)
    return y0 + share * (y1 - y0)


def expected_errors(confidence: Tensor, correct: Tensor, positions: Tensor) -> Tensor:
    """Expected errors among the ``positions`` ``(P,)`` most confident studies (real numbers of
    studies; linear inside a tie group): ``(P,)``."""
    w = torch.ones(1, len(confidence), dtype=torch.float64)
    edges, errors = _cumulative(confidence, correct, w)
    return _interpolate(edges, errors, positions.double()[None])[0]


def selective_accuracy(confidence: Tensor, correct: Tensor, coverage: float, weights: Tensor | None = None) -> Tensor:
    """Accuracy among the ``coverage`` share of most confident studies (expected over ties);
    ``(R,)`` under weights ``(R, N)``, 0-d without."""
    w = torch.ones(1, len(confidence), dtype=torch.float64) if weights is None else weights.double()
    kept = coverage * w.sum(1, keepdim=True)
    edges, errors = _cumulative(confidence, correct, w)
    value = 1 - _interpolate(edges, errors, kept)[:, 0] / kept[:, 0]
    return value[0] if weights is None else value


def risk_coverage(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The curve at every number of kept studies ``k = 1..N``: coverage ``k / N``, the model's
    (expected) risk and the oracle's, each ``(N,)``."""
    n = len(confidence)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    risk = expected_errors(confidence, correct, k) / k
    errors = float((~correct.bool()).sum())
    oracle = (k - (n - errors)).clamp(min=0) / k
    return k / n, risk, oracle


def coverage_at_accuracy(confidence: Tensor, correct: Tensor, target: float) -> float:
    """The largest coverage ``k / N`` at which the accuracy among the ``k`` most confident studies
    reaches ``target`` (expected over ties); 0 when no ``k`` does."""
    coverage, risk, _ = risk_coverage(confidence, correct)
    reached = (1 - risk) >= target - 1e-12
    return float(coverage[reached].max()) if reached.any() else 0.0


def plot_risk_coverage(confidence: Tensor, correct: Tensor, where: str, unit: str, calibration: str,
                       coverages: tuple[float, ...], target: float, path) -> None:
    """Risk against coverage for the model and the oracle, the chosen coverages marked."""
    from matplotlib.figure import Figure

    from corex_eval.artefacts import save_figure

    coverage, risk, oracle = (t.numpy() for t in risk_coverage(confidence, correct))
    area, best = float(aurc(confidence, correct)), float(oracle_aurc(correct))
    figure = Figure(figsize=(6.4, 5.6), layout="constrained")
    axes = figure.subplots()
    axes.plot(coverage, risk, color="tab:blue", linewidth=1.8, label=f"model (AURC {area:.3f})")
    axes.plot(coverage, oracle, color="grey", linestyle="--", label=f"oracle: every error ranked last (AURC {best:.3f})")
    axes.axhline(1 - target, color="tab:green", linestyle=":", label=f"risk {1 - target:.2f} (accuracy {target:.2f})")
    for share in coverages:
        accuracy = float(selective_accuracy(confidence, correct, share))
        axes.plot([share], [1 - accuracy], marker="o", color="tab:red", linestyle="none")
        axes.annotate(f"{share:.0%} answered: accuracy {accuracy:.2f}", (share, 1 - accuracy), textcoords="offset points",
                      xytext=(-8, 8), ha="right", fontsize=8)
    units = "studies" if unit == "study" else f"{unit}s"
    # Room above the target's line, so that it is not hidden in the frame's top edge.
    axes.set(xlim=(0, 1.01), ylim=(0, max(0.05, 1.2 * (1 - target), float(risk.max()) * 1.1)),
             xlabel=f"coverage (share of {units} answered, most confident first)",
             ylabel="selective risk (error rate among those answered)",
             title=f"Risk-coverage: {where}\nranked by the top-class probability ({calibration})")
    figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", fontsize=8, frameon=False)
    save_figure(figure, path)


__all__ = ["aurc", "coverage_at_accuracy", "expected_errors", "oracle_aurc", "plot_risk_coverage", "risk_coverage",
           "selective_accuracy"]
