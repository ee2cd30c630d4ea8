"""ResNet-18/34/50 feature pyramids in plain torch.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), in torchvision's variant
("ResNet v1.5": a Bottleneck downsamples in its 3x3 convolution, not its first 1x1). Module and
parameter names follow torchvision's layout exactly (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ...; no ``fc``) so its published ImageNet state dicts load unchanged.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from corex_encoders.weights import load_weights


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a shortcut (ResNet-50)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """A 1x1 projection where the block changes shape, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResNet(nn.Module):
    """A ResNet returning five feature maps: the stem after its ReLU (stride 2) and ``layer1``
    to ``layer4`` (strides 4, 8, 16, 32).

    ``width`` is the base width (64 in the paper); every stage scales with it, so ``width=8`` is
    a tiny model for tests. The stages have ``width * (1, 2, 4, 8)`` planes, times 4 for the
    Bottleneck's expansion.
    """

    strides = (2, 4, 8, 16, 32)

    def __init__(
        self,
        arch: str,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        in_channels: int = 1,
        width: int = 64,
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}.")
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}.")
        self.arch = arch
        self.in_channels = in_channels

        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        stages = []
        channels = width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stage = [block(channels, planes, stride)]
            channels = planes * block.expansion
            stage += [block(channels, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.channels = (width, *(width * 2**i * block.expansion for i in range(4)))

        # torchvision's initialisation (no zero-init of the last BN in each block).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        c1 = self.layer1(self.maxpool(stem))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [stem, c1, c2, c3, c4]


def resnet18(*, in_channels: int = 1, width: int = 64, weights: Path | None = None) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2). ``weights``: a local state-dict file (torchvision's
    ImageNet file or a corex export); a 3-channel first convolution is folded to ``in_channels=1``."""
    return _build("resnet18", BasicBlock, (2, 2, 2, 2), in_channels, width, weights)


def resnet34(*, in_channels: int = 1, width: int = 64, weights: Path | None = None) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3). Options as for ``resnet18``."""
    return _build("resnet34", BasicBlock, (3, 4, 6, 3), in_channels, width, weights)


def resnet50(*, in_channels: int = 1, width: int = 64, weights: Path | None = None) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3). Options as for ``resnet18``."""
    return _build("resnet50", Bottleneck, (3, 4, 6, 3), in_channels, width, weights)


def _build(
    arch: str,
    block: type[BasicBlock | Bottleneck],
    layers: tuple[int, int, int, int],
    in_channels: int,
    width: int,
    weights: Path | None,
) -> ResNet:
    model = ResNet(arch, block, layers, in_channels=in_channels, width=width)
    if weights is not None:
        load_weights(model, weights, first_conv="conv1.weight", drop_prefix="fc.")
    return model
