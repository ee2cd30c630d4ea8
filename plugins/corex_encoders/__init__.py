"""corex_encoders: ResNet-18/34/50 and DenseNet-121 feature pyramids in plain torch.

Each encoder maps ``(B, in_channels, H, W)`` to five feature maps at strides 2, 4, 8, 16, 32 and
uses torchvision's parameter names, so ImageNet weights load from a local file::

    encoder = resnet18(weights=Path("resnet18-f37072fd.pth"))  # conv1 folded to 1 channel
    features = encoder(images)  # [stride 2, 4, 8, 16, 32], highest resolution first

Options (all encoders): ``in_channels`` (1: grey radiographs), ``width`` (64: the standard
network; 8 or 16 for tiny test models), ``weights`` (a local state-dict file or None).
"""

from __future__ import annotations

from corex import hookimpl
from corex_encoders.densenet import DenseNet, densenet121
from corex_encoders.resnet import ResNet, resnet18, resnet34, resnet50
from corex_encoders.weights import load_weights


@hookimpl
def corex_encoders():
    return {
        "resnet18": resnet18,
        "resnet34": resnet34,
        "resnet50": resnet50,
        "densenet121": densenet121,
    }


__all__ = ["DenseNet", "ResNet", "densenet121", "load_weights", "resnet18", "resnet34", "resnet50"]
