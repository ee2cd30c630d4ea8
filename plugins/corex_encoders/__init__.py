"""corex_encoders: ResNet-18/34/50 and DenseNet-121 feature pyramids in plain torch.

Each encoder maps ``(B, in_channels, H, W)`` to five feature maps at strides 2, 4, 8, 16, 32 and
uses torchvision's parameter names, so ImageNet weights load from a local file::

    encoder = resnet18(weights=Path("resnet18-f37072fd.pth"))  # conv1 folded to 1 channel
    features = encoder(images)  # [stride 2, 4, 8, 16, 32], highest resolution first

Options (all encoders): ``in_channels`` (1: grey radiographs), ``width`` (64: the standard
network; 8 or 16 for tiny test models), ``weights`` (a local state-dict file or None).

This module imports no torch: ``corex --help`` and ``corex plugins`` load it to read the factories'
signatures; each factory imports its implementation (:mod:`corex_encoders.resnet`,
:mod:`corex_encoders.densenet`) when a run builds it.
"""

from __future__ import annotations

from pathlib import Path

from corex import hookimpl
from corex.interfaces import Encoder
from corex.lazy import lazy_exports


def resnet18(*, in_channels: int = 1, width: int = 64, weights: Path | None = None) -> Encoder:
    """ResNet-18 (see :func:`corex_encoders.resnet.resnet18`)."""
    from corex_encoders.resnet import resnet18 as build

    return build(in_channels=in_channels, width=width, weights=weights)


def resnet34(*, in_channels: int = 1, width: int = 64, weights: Path | None = None) -> Encoder:
    """ResNet-34 (see :func:`corex_encoders.resnet.resnet34`)."""
    from corex_encoders.resnet import resnet34 as build

    return build(in_channels=in_channels, width=width, weights=weights)


def resnet50(*, in_channels: int = 1, width: int = 64, weights: Path | None = None) -> Encoder:
    """ResNet-50 (see :func:`corex_encoders.resnet.resnet50`)."""
    from corex_encoders.resnet import resnet50 as build

    return build(in_channels=in_channels, width=width, weights=weights)


def densenet121(*, in_channels: int = 1, width: int = 64, weights: Path | None = None) -> Encoder:
    """DenseNet-121 (see :func:`corex_encoders.densenet.densenet121`)."""
    from corex_encoders.densenet import densenet121 as build

    return build(in_channels=in_channels, width=width, weights=weights)


@hookimpl
def corex_encoders():
    return {
        "resnet18": resnet18,
        "resnet34": resnet34,
        "resnet50": resnet50,
        "densenet121": densenet121,
    }


__getattr__ = lazy_exports(__name__, {
    "DenseNet": "corex_encoders.densenet",
    "ResNet": "corex_encoders.resnet",
    "load_weights": "corex_encoders.weights",
})
__all__ = ["DenseNet", "ResNet", "densenet121", "load_weights", "resnet18", "resnet34", "resnet50"]
