"""corex_kornia: batch-level augmentation with Kornia, on the device where the batch lives.

Recipe key ``stages.<name>.augment``; each pipeline transforms ``image`` and ``mask`` with the
same per-sample geometry, touches only the image with intensity ops, and passes every other key
through:

``cxr_light``  supervised training: small affine and brightness/contrast jitter, no flip
``moco_cxr``   MoCo-CXR views: flip, rotation up to 10 degrees, mild crop
``mocov2``     MoCo v2 views on one grey channel: crop, brightness/contrast, blur, flip
``kornia``     any sequence of kornia.augmentation ops spelled out in the recipe
``none``       identity

This module imports neither torch nor kornia: ``corex --help`` and ``corex plugins`` load it to read
the factories' signatures; each factory imports its implementation (:mod:`corex_kornia.pipelines`,
:mod:`corex_kornia.spelled`, :mod:`corex_kornia.augmentation`) when a run builds it.
"""

from __future__ import annotations

from corex import hookimpl
from corex.interfaces import Augmentation
from corex.lazy import lazy_exports


def cxr_light(
    *,
    degrees: float = 10.0,
    translate: float = 0.0625,
    scale: tuple[float, ...] = (0.9, 1.1),
    brightness: float = 0.1,
    contrast: float = 0.1,
    hflip: bool = False,
    p: float = 0.5,
) -> Augmentation:
    """Light augmentation for supervised training (see :func:`corex_kornia.pipelines.cxr_light`)."""
    from corex_kornia.pipelines import cxr_light as build

    return build(degrees=degrees, translate=translate, scale=scale, brightness=brightness, contrast=contrast, hflip=hflip, p=p)


def moco_cxr(
    *,
    degrees: float = 10.0,
    crop_scale: tuple[float, ...] = (0.8, 1.0),
    hflip: bool = True,
) -> Augmentation:
    """MoCo-CXR views (see :func:`corex_kornia.pipelines.moco_cxr`)."""
    from corex_kornia.pipelines import moco_cxr as build

    return build(degrees=degrees, crop_scale=crop_scale, hflip=hflip)


def mocov2(
    *,
    crop_scale: tuple[float, ...] = (0.2, 1.0),
    brightness: float = 0.4,
    contrast: float = 0.4,
    blur_sigma: tuple[float, ...] = (0.1, 2.0),
    hflip: bool = True,
) -> Augmentation:
    """MoCo v2 views on one grey channel (see :func:`corex_kornia.pipelines.mocov2`)."""
    from corex_kornia.pipelines import mocov2 as build

    return build(crop_scale=crop_scale, brightness=brightness, contrast=contrast, blur_sigma=blur_sigma, hflip=hflip)


def kornia_pipeline(*, ops: list[str | dict]) -> Augmentation:
    """kornia.augmentation ops spelled out in the recipe (see :func:`corex_kornia.spelled.kornia_pipeline`)."""
    from corex_kornia.spelled import kornia_pipeline as build

    return build(ops=ops)


def no_augmentation() -> Augmentation:
    """The identity (see :class:`corex_kornia.augmentation.NoAugmentation`)."""
    from corex_kornia.augmentation import NoAugmentation

    return NoAugmentation()


@hookimpl
def corex_augmentations():
    return {
        "cxr_light": cxr_light,
        "moco_cxr": moco_cxr,
        "mocov2": mocov2,
        "kornia": kornia_pipeline,
        "none": no_augmentation,
    }


__getattr__ = lazy_exports(__name__, {
    "BatchAugmentation": "corex_kornia.augmentation",
    "NoAugmentation": "corex_kornia.augmentation",
})
__all__ = [
    "BatchAugmentation",
    "NoAugmentation",
    "corex_augmentations",
    "cxr_light",
    "kornia_pipeline",
    "moco_cxr",
    "mocov2",
    "no_augmentation",
]
