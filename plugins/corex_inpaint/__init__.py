"""corex_inpaint: the inpainting-CXR self-supervised objective.

Hide regions of each radiograph and train the shared encoder, with a U-Net decoder, to paint them
back (context encoders, Pathak et al., CVPR 2016; used as a pretext task for chest X-rays by
Ridzuan et al., MIUA 2022). ``masks`` decides which pixels to hide, ``objective`` holds the
model, the loss and the per-epoch preview grid.

Recipe::

    stages:
      pretrain:
        objective: {name: inpaint, policy: lungs, coverage: 0.25}

This module imports no torch: ``corex --help`` and ``corex plugins`` load it to read the factory's
signature, and :func:`inpaint_objective` imports the implementation when a run builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from corex import hookimpl
from corex.interfaces import Encoder, Objective
from corex.lazy import lazy_exports


def inpaint_objective(
    *,
    encoder: Encoder,
    channels: Sequence[int],
    strides: Sequence[int],
    policy: Literal["rectangles", "strokes", "lungs"] = "rectangles",
    coverage: float = 0.25,
    max_regions: int = 4,
    fill: Literal["zero", "mean", "noise"] = "zero",
    loss: Literal["l1", "l2"] = "l1",
    visible_weight: float = 0.0,
    decoder_width: int | None = None,
) -> Objective:
    """Inpainting-CXR on ``encoder`` (see :class:`corex_inpaint.objective.Inpainting` for what each option does)."""
    from corex_inpaint.objective import Inpainting

    return Inpainting(encoder=encoder, channels=channels, strides=strides, policy=policy, coverage=coverage,
                      max_regions=max_regions, fill=fill, loss=loss, visible_weight=visible_weight, decoder_width=decoder_width)


@hookimpl
def corex_objectives():
    return {"inpaint": inpaint_objective}


__getattr__ = lazy_exports(__name__, {
    "Inpainting": "corex_inpaint.objective",
    "masked_reconstruction_loss": "corex_inpaint.objective",
    "lung_field_weights": "corex_inpaint.masks",
    "random_masks": "corex_inpaint.masks",
})
__all__ = ["Inpainting", "inpaint_objective", "lung_field_weights", "masked_reconstruction_loss", "random_masks"]
