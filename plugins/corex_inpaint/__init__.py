"""corex_inpaint: the inpainting-CXR self-supervised objective.

Hide regions of each radiograph and train the shared encoder, with a U-Net decoder, to paint them
back (context encoders, Pathak et al., CVPR 2016; used as a pretext task for chest X-rays by
Ridzuan et al., MIUA 2022). ``masks`` decides which pixels to hide, ``objective`` holds the
model, the loss and the per-epoch preview grid.

Recipe::

    stages:
      pretrain:
        objective: {name: inpaint, policy: lungs, coverage: 0.25}
"""

from __future__ import annotations

from corex import hookimpl
from corex_inpaint.masks import lung_field_weights, random_masks
from corex_inpaint.objective import Inpainting, masked_reconstruction_loss

__all__ = ["Inpainting", "lung_field_weights", "masked_reconstruction_loss", "random_masks"]


@hookimpl
def corex_objectives():
    return {"inpaint": Inpainting}
