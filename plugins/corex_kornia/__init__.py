"""corex_kornia: batch-level augmentation with Kornia, on the device where the batch lives.

Recipe key ``stages.<name>.augment``; each pipeline transforms ``image`` and ``mask`` with the
same per-sample geometry, touches only the image with intensity ops, and passes every other key
through:

``cxr_light``  supervised training: small affine and brightness/contrast jitter, no flip
``moco_cxr``   MoCo-CXR views: flip, rotation up to 10 degrees, mild crop
``mocov2``     MoCo v2 views on one grey channel: crop, brightness/contrast, blur, flip
``kornia``     any sequence of kornia.augmentation ops spelled out in the recipe
``none``       identity
"""

from __future__ import annotations

from corex import hookimpl
from corex_kornia.augmentation import BatchAugmentation, NoAugmentation
from corex_kornia.pipelines import cxr_light, moco_cxr, mocov2
from corex_kornia.spelled import kornia_pipeline


@hookimpl
def corex_augmentations():
    return {
        "cxr_light": cxr_light,
        "moco_cxr": moco_cxr,
        "mocov2": mocov2,
        "kornia": kornia_pipeline,
        "none": NoAugmentation,
    }


__all__ = [
    "BatchAugmentation",
    "NoAugmentation",
    "corex_augmentations",
    "cxr_light",
    "kornia_pipeline",
    "moco_cxr",
    "mocov2",
]
