"""Named augmentation pipelines: supervised CXR training, MoCo-CXR and MoCo v2 views.

Every pipeline works on one grey channel in ``[0, 1]`` and keeps the input size, so the views of
a pre-training batch and the images of a training batch have the shape the encoder expects.
"""

from __future__ import annotations

import math

import kornia.augmentation as K

from corex_kornia.augmentation import BatchAugmentation

# Crops warp image and mask on one sampling grid; kornia's default "slice" mode crops and resizes
# each separately, and its nearest-resized mask drifts by up to half a pixel from the image.
RESAMPLE = "resample"


def cxr_light(
    *,
    degrees: float = 10.0,
    translate: float = 0.0625,
    scale: tuple[float, ...] = (0.9, 1.1),
    brightness: float = 0.1,
    contrast: float = 0.1,
    hflip: bool = False,
    p: float = 0.5,
) -> BatchAugmentation:
    """Light augmentation for supervised training (classification and segmentation).

    A small random affine (rotation up to ``degrees``, shift up to ``translate`` of the image
    size, zoom within ``scale``) followed by a small brightness/contrast jitter; each is applied
    to a sample with probability ``p``, so part of every epoch is seen as at test time.
    Rotation up to 10 degrees follows MoCo-CXR (Sowrirajan et al., MIDL 2021); shift 0.0625 and
    scale 0.9-1.1 are albumentations' ShiftScaleRotate defaults, common in SIIM-FISABIO-RSNA
    solutions. Defaults: degrees 10, translate 0.0625, scale (0.9, 1.1), brightness and
    contrast 0.1, p 0.5.

    No horizontal flip by default: CXR anatomy is lateralised (heart on the patient's left), so
    a mirrored image is not a plausible radiograph. ``hflip: true`` adds one (p = 0.5).
    """
    _check_range("degrees", degrees, 0.0, 180.0)
    _check_range("translate", translate, 0.0, 1.0)
    scale = _check_interval("scale", scale, 0.0, math.inf, open_low=True)
    _check_range("brightness", brightness, 0.0, 1.0)
    _check_range("contrast", contrast, 0.0, 1.0)
    _check_range("p", p, 0.0, 1.0)
    ops: list[K.AugmentationBase2D] = [K.RandomHorizontalFlip(p=0.5)] if hflip else []
    ops += [
        K.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale, p=p),
        K.ColorJitter(brightness=brightness, contrast=contrast, p=p),
    ]
    return BatchAugmentation(
        lambda height, width: ops,
        f"cxr_light: degrees={degrees}, translate={translate}, scale={scale}, "
        f"brightness={brightness}, contrast={contrast}, hflip={hflip}, p={p}",
    )


def moco_cxr(
    *,
    degrees: float = 10.0,
    crop_scale: tuple[float, ...] = (0.8, 1.0),
    hflip: bool = True,
) -> BatchAugmentation:
    """MoCo-CXR views (Sowrirajan et al., "MoCo-CXR: MoCo Pretraining Improves Representation and
    Transferability of Chest X-ray Models", MIDL 2021).

    The paper keeps only "random rotation (10 degrees) and horizontal flipping": colour jitter
    and grayscale mean nothing on a grey radiograph, and aggressive crops and blur "may
    eliminate disease-covering parts" or the few pixels a finding spans. Its code then takes a
    random crop (320 px on images whose shorter side is 320 px: the crop trims only the long
    side, keeping roughly 80% of the image). For our square-resized inputs the equivalent is a
    mild random resized crop back to the input size, ``crop_scale`` (0.8, 1.0) of the area with
    the input's aspect ratio (anatomy is not stretched).
    """
    _check_range("degrees", degrees, 0.0, 180.0)
    crop_scale = _check_interval("crop_scale", crop_scale, 0.0, 1.0, open_low=True)
    head: list[K.AugmentationBase2D] = [K.RandomHorizontalFlip(p=0.5)] if hflip else []
    head.append(K.RandomRotation(degrees=degrees, p=1.0))

    def make_ops(height: int, width: int) -> list[K.AugmentationBase2D]:
        aspect = width / height
        crop = K.RandomResizedCrop(
            (height, width), scale=crop_scale, ratio=(aspect, aspect), cropping_mode=RESAMPLE
        )
        return [*head, crop]

    return BatchAugmentation(
        make_ops, f"moco_cxr: degrees={degrees}, crop_scale={crop_scale}, hflip={hflip}"
    )


def mocov2(
    *,
    crop_scale: tuple[float, ...] = (0.2, 1.0),
    brightness: float = 0.4,
    contrast: float = 0.4,
    blur_sigma: tuple[float, ...] = (0.1, 2.0),
    hflip: bool = True,
) -> BatchAugmentation:
    """The MoCo v2 recipe (Chen et al. 2020, "Improved Baselines with Momentum Contrastive
    Learning"), adapted to one grey channel.

    MoCo v2: RandomResizedCrop scale (0.2, 1.0); colour jitter 0.4/0.4/0.4/0.1 with p = 0.8;
    grayscale p = 0.2; Gaussian blur sigma (0.1, 2.0) with p = 0.5; horizontal flip. Saturation,
    hue and grayscale do nothing to a one-channel image, so only the brightness/contrast jitter
    (0.4/0.4, p = 0.8) remains. Blur sigma is in pixels as in the reference (at 224 px); the
    kernel spans +-3 sigma. Crops keep the input size with the usual aspect ratios (3/4, 4/3).
    """
    crop_scale = _check_interval("crop_scale", crop_scale, 0.0, 1.0, open_low=True)
    _check_range("brightness", brightness, 0.0, 1.0)
    _check_range("contrast", contrast, 0.0, 1.0)
    blur_sigma = _check_interval("blur_sigma", blur_sigma, 0.0, math.inf, open_low=True)
    jitter = K.ColorJitter(brightness=brightness, contrast=contrast, p=0.8)
    flip: list[K.AugmentationBase2D] = [K.RandomHorizontalFlip(p=0.5)] if hflip else []

    def make_ops(height: int, width: int) -> list[K.AugmentationBase2D]:
        kernel = min(2 * math.ceil(3 * blur_sigma[1]) + 1, _largest_odd(min(height, width)))
        return [
            K.RandomResizedCrop(
                (height, width), scale=crop_scale, ratio=(3 / 4, 4 / 3), cropping_mode=RESAMPLE
            ),
            jitter,
            K.RandomGaussianBlur(kernel, blur_sigma, p=0.5),
            *flip,
        ]

    return BatchAugmentation(
        make_ops,
        f"mocov2: crop_scale={crop_scale}, brightness={brightness}, contrast={contrast}, "
        f"blur_sigma={blur_sigma}, hflip={hflip}",
    )


def _largest_odd(n: int) -> int:
    return n if n % 2 else n - 1


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_interval(
    name: str, interval: tuple[float, ...], low: float, high: float, *, open_low: bool = False
) -> tuple[float, float]:
    """Validate a (min, max) pair inside [low, high], or (low, high] with ``open_low``."""
    if len(interval) != 2:
        raise ValueError(f"{name} must be two numbers (min, max), got {tuple(interval)}")
    first, last = float(interval[0]), float(interval[1])
    above_low = first > low if open_low else first >= low
    if not (above_low and first <= last <= high):
        sign = "<" if open_low else "<="
        raise ValueError(
            f"{name} must be (min, max) with {low} {sign} min <= max <= {high}, "
            f"got {tuple(interval)}"
        )
    return first, last
