"""DenseNet-121 feature pyramid in plain torch.

Huang et al., "Densely Connected Convolutional Networks" (CVPR 2017): DenseNet-121 has 64 initial
features, growth rate 32, bottleneck size 4 and dense blocks of 6-12-24-16 layers, with transitions
that halve the channels and the resolution. Module and parameter names follow torchvision's layout
exactly (``features.conv0``, ``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``features.norm5``; no ``classifier``) so its published ImageNet
state dicts load unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corex_encoders.weights import load_weights


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to ``bn_size * growth`` channels, BN-ReLU-3x3 conv to ``growth``; its
    output is concatenated to its input."""

    def __init__(self, in_channels: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        new = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(new)))
        return torch.cat([x, new], dim=1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv halving the channels, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    """A DenseNet returning five feature maps, highest resolution first.

    Tap points: the stem after ``relu0`` (stride 2); the output of dense blocks 1-3 after the
    following transition's BN-ReLU (strides 4, 8, 16), i.e. the normalised activations, since a
    dense block's raw output is an un-normalised concatenation; and dense block 4 after ``norm5``
    and a ReLU (stride 32), as torchvision's classifier sees it.

    ``width`` scales the network: ``width`` initial features and a growth rate of ``width // 2``
    (64 and 32 in the paper), so every level's channels scale by ``width / 64``. It must be even.
    """

    strides = (2, 4, 8, 16, 32)

    def __init__(
        self,
        arch: str,
        blocks: tuple[int, int, int, int],
        *,
        in_channels: int = 1,
        width: int = 64,
        bn_size: int = 4,
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}.")
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even number of at least 2 (growth rate is width // 2), got {width}.")
        self.arch = arch
        self.in_channels = in_channels
        growth = width // 2

        # A ModuleDict, not a Sequential: forward taps the maps between its parts.
        self.features = nn.ModuleDict()
        self.features["conv0"] = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.features["norm0"] = nn.BatchNorm2d(width)
        self.features["relu0"] = nn.ReLU(inplace=True)
        self.features["pool0"] = nn.MaxPool2d(3, stride=2, padding=1)
        channels = [width]
        num = width
        for i, layers in enumerate(blocks, start=1):
            block = nn.Sequential()
            for j in range(1, layers + 1):
                block.add_module(f"denselayer{j}", DenseLayer(num + (j - 1) * growth, growth, bn_size))
            self.features[f"denseblock{i}"] = block
            num += layers * growth
            channels.append(num)
            if i < len(blocks):
                self.features[f"transition{i}"] = Transition(num, num // 2)
                num //= 2
        self.features["norm5"] = nn.BatchNorm2d(num)
        self.channels = tuple(channels)

        # torchvision's DenseNet initialisation: Kaiming normal (fan_in) convs, BN weight 1 bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        f = self.features
        x = f["relu0"](f["norm0"](f["conv0"](x)))
        pyramid = [x]
        x = f["pool0"](x)
        for i in range(1, 5):
            x = f[f"denseblock{i}"](x)
            if i < 4:
                t = f[f"transition{i}"]
                x = t.relu(t.norm(x))
                pyramid.append(x)
                x = t.pool(t.conv(x))
        pyramid.append(F.relu(f["norm5"](x)))
        return pyramid


def densenet121(*, in_channels: int = 1, width: int = 64, weights: Path | None = None) -> DenseNet:
    """DenseNet-121 (dense blocks 6-12-24-16). ``weights``: a local state-dict file (torchvision's
    ImageNet file, old- or new-style keys, or a corex export); a 3-channel first convolution is
    folded to ``in_channels=1``."""
    model = DenseNet("densenet121", (6, 12, 24, 16), in_channels=in_channels, width=width)
    if weights is not None:
        load_weights(model, weights, first_conv="features.conv0.weight", drop_prefix="classifier.")
    return model
