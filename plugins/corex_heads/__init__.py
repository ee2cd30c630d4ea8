"""corex_heads: task heads on an encoder's feature pyramid.

* ``classification``: study-level logits (negative / typical / indeterminate / atypical),
  cross-entropy over labelled samples.
* ``segmentation``: opacity mask logits from a U-Net decoder, BCE + soft Dice over samples with a
  mask.

Multi-task learning needs no wrapper: the core sums ``weight * head.loss(output, batch)`` over a
stage's heads. Reusable parts: :class:`corex_heads.unet.UNetDecoder` and
:func:`corex_heads.losses.soft_dice_loss`.
"""

from __future__ import annotations

from corex import hookimpl
from corex_heads.classification import ClassificationHead
from corex_heads.losses import soft_dice_loss
from corex_heads.segmentation import SegmentationHead
from corex_heads.unet import UNetDecoder


@hookimpl
def corex_heads():
    return {"classification": ClassificationHead, "segmentation": SegmentationHead}


__all__ = ["ClassificationHead", "SegmentationHead", "UNetDecoder", "soft_dice_loss"]
