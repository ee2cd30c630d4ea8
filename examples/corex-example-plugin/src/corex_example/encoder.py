"""A MobileNet-style feature pyramid: depthwise-separable convolutions, four levels.

Howard et al., "MobileNets" (2017): a 3x3 convolution applied per channel (depthwise) followed by
a 1x1 convolution mixing channels (pointwise) costs about 1/9 of a full 3x3 convolution. Unlike
the built-in ResNets this pyramid has no residual connections, no max-pool and four levels, not
five; corex needs nothing but what :class:`corex.interfaces.Encoder` says.
"""

from __future__ import annotations

from torch import Tensor, nn


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (strided) then pointwise 1x1, each followed by batch norm and ReLU6."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU6(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class MobileNetPyramid(nn.Module):
    """Images ``(B, in_channels, H, W)`` to four maps with ``width * (1, 2, 4, 8)`` channels at
    strides 2, 4, 8, 16, highest resolution first (the order corex's heads expect).

    The stem (a full 3x3 convolution, stride 2) is level 0; each later level starts with a
    stride-2 depthwise-separable block and adds ``blocks - 1`` more at that resolution.
    ``H`` and ``W`` should be multiples of 16 so every level is exactly ``1/stride`` of the input.
    """

    arch = "example_mobilenet"  # recorded by `corex export`, checked when weights are loaded
    strides = (2, 4, 8, 16)

    def __init__(self, *, in_channels: int = 1, width: int = 16, blocks: int = 1):
        super().__init__()
        # A plain ValueError: corex reports it under the recipe path (model.encoder) at validate time.
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}.")
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}.")
        if blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks}.")
        self.in_channels = in_channels
        self.channels = tuple(width * 2**level for level in range(4))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(inplace=True),
        )
        self.levels = nn.ModuleList()
        for level in range(1, 4):
            before, after = self.channels[level - 1], self.channels[level]
            layers = [depthwise_separable(before, after, stride=2)]
            layers += [depthwise_separable(after, after, stride=1) for _ in range(blocks - 1)]
            self.levels.append(nn.Sequential(*layers))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [self.stem(x)]
        for level in self.levels:
            features.append(level(features[-1]))
        return features
