"""Losses shared by heads and evaluators."""

from __future__ import annotations

import torch
from torch import Tensor


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-sample soft Dice loss ``1 - (2|P.T| + s) / (|P| + |T| + s)`` with ``P = sigmoid(logits)``.

    Milletari et al., "V-Net" (3DV 2016), computed per sample over all but the batch dimension
    and returned as a ``(B,)`` tensor so the caller picks the samples that have a target.

    Why ``smooth=1`` (one pixel's worth): it is negligible against any real opacity, and it keeps an
    empty target meaningful. A negative study's empty mask is a real annotation: an empty prediction
    scores Dice 1 (loss 0), and a prediction with foreground mass ``S`` scores loss ``S / (S + 1)``,
    a false-positive penalty that is already 0.5 at one pixel's worth.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape.")
    # float32: half-precision sums overflow on full-size radiographs (512 x 512 > 65504).
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    overlap = (probs * target).sum(1)
    total = probs.sum(1) + target.sum(1)
    return 1 - (2 * overlap + smooth) / (total + smooth)
