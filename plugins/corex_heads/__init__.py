"""corex_heads: task heads on an encoder's feature pyramid.

* ``classification``: study-level logits (negative / typical / indeterminate / atypical),
  cross-entropy over labelled samples; with ``multilabel: true``, one logit per finding
  (NIH ChestX-ray14, CheXpert) and binary cross-entropy over the known entries of ``labels``.
* ``segmentation``: opacity mask logits from a U-Net decoder, BCE + soft Dice over samples with a
  mask.

Multi-task learning needs no wrapper: the core sums ``weight * head.loss(output, batch)`` over a
stage's heads. Reusable parts: :class:`corex_heads.unet.UNetDecoder` and
:func:`corex_heads.losses.soft_dice_loss`.

This module imports no torch: ``corex --help`` and ``corex plugins`` load it to read the factories'
signatures; each factory imports its head's module when a run builds it, and the public names
(``from corex_heads import UNetDecoder``) are imported when first used.
"""

from __future__ import annotations

from collections.abc import Sequence

from corex import hookimpl
from corex.interfaces import Head
from corex.lazy import lazy_exports


def classification_head(
    *,
    channels: Sequence[int],
    num_classes: int,
    dropout: float = 0.0,
    class_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    feature_norm: bool = False,
    multilabel: bool = False,
) -> Head:
    """Study-level classification, single- or multi-label (see :class:`corex_heads.classification.ClassificationHead`)."""
    from corex_heads.classification import ClassificationHead

    return ClassificationHead(channels=channels, num_classes=num_classes, dropout=dropout, class_weights=class_weights,
                              label_smoothing=label_smoothing, feature_norm=feature_norm, multilabel=multilabel)


def segmentation_head(
    *,
    channels: Sequence[int],
    strides: Sequence[int],
    decoder_width: int | None = None,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    pos_weight: float | None = None,
) -> Head:
    """Opacity segmentation (see :class:`corex_heads.segmentation.SegmentationHead`)."""
    from corex_heads.segmentation import SegmentationHead

    return SegmentationHead(channels=channels, strides=strides, decoder_width=decoder_width, dice_weight=dice_weight,
                            bce_weight=bce_weight, pos_weight=pos_weight)


@hookimpl
def corex_heads():
    return {"classification": classification_head, "segmentation": segmentation_head}


__getattr__ = lazy_exports(__name__, {
    "ClassificationHead": "corex_heads.classification",
    "SegmentationHead": "corex_heads.segmentation",
    "UNetDecoder": "corex_heads.unet",
    "soft_dice_loss": "corex_heads.losses",
})
__all__ = ["ClassificationHead", "SegmentationHead", "UNetDecoder", "classification_head", "segmentation_head", "soft_dice_loss"]
