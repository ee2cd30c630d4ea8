"""Opacity segmentation head: a U-Net decoder trained with BCE plus soft Dice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corex.interfaces import Batch
from corex_heads.losses import soft_dice_loss
from corex_heads.unet import UNetDecoder


class SegmentationHead(nn.Module):
    """Opacity mask logits ``(B, 1, H, W)`` at input resolution.

    The paper's multi-task arm segments the opacities (masks drawn from the radiologists' boxes)
    with a U-Net decoder on the shared encoder. The loss is
    ``bce_weight * BCE + dice_weight * soft Dice`` over the samples with ``has_mask``; a negative
    study's empty mask counts as a real target. ``pos_weight`` up-weights opacity pixels in the
    BCE (they are a small fraction of a radiograph). ``decoder_width``: see
    :class:`~corex_heads.unet.UNetDecoder` (default: half the encoder's first width).
    """

    task = "segmentation"

    def __init__(
        self,
        *,
        channels: Sequence[int],
        strides: Sequence[int],
        decoder_width: int | None = None,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        pos_weight: float | None = None,
    ):
        super().__init__()
        if decoder_width is not None and decoder_width < 1:
            raise ValueError(f"decoder_width must be at least 1, got {decoder_width}.")
        if dice_weight < 0 or bce_weight < 0:
            raise ValueError(f"dice_weight and bce_weight must be non-negative, got {dice_weight} and {bce_weight}.")
        if dice_weight == 0 and bce_weight == 0:
            raise ValueError("dice_weight and bce_weight are both 0, so the head would learn nothing.")
        if pos_weight is not None and pos_weight <= 0:
            raise ValueError(f"pos_weight must be positive, got {pos_weight}.")
        self.decoder = UNetDecoder(channels, strides, out_channels=1, width=decoder_width)
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.tensor([pos_weight]), persistent=False
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.decoder(features)

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """BCE + soft Dice over the samples with ``has_mask``; a graph-carrying zero when none."""
        has_mask = batch["has_mask"].to(logits.device)
        if not bool(has_mask.any()):
            return logits.sum() * 0
        logits = logits[has_mask].float()
        target = batch["mask"].to(logits.device)[has_mask].float()
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
        dice = soft_dice_loss(logits, target).mean()
        return self.bce_weight * bce + self.dice_weight * dice
