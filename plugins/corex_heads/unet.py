"""A U-Net decoder over an encoder's feature pyramid.

Ronneberger et al., "U-Net" (MICCAI 2015): walk back up the pyramid, at each level upsample the
coarser map, concatenate the encoder's map of that level (the skip connection) and refine with two
3x3 conv-BN-ReLU layers. Shared by the segmentation head and the inpainting objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip, two conv-BN-ReLU layers."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        # Nearest, not bilinear: bilinear's CUDA backward has no deterministic implementation, so
        # it would fail under torch.use_deterministic_algorithms.
        x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class UNetDecoder(nn.Module):
    """Decode a pyramid (highest resolution first) into ``(B, out_channels, H, W)`` at input size.

    ``width`` is the decoder's base width: the block at pyramid level ``i`` has ``width * 2**i``
    channels, mirroring a ResNet's doubling. The default, ``channels[0] // 2`` (32 for a standard
    ResNet/DenseNet stem of 64), gives 32-64-128-256, the same budget as the usual
    U-Net-on-ResNet decoders, and shrinks with tiny test encoders.

    The finest level is ``strides[0]`` times smaller than the input (2 for ResNet/DenseNet), so the
    last step upsamples by that factor before a 3x3 convolution makes the output. The input's
    height and width should be multiples of ``strides[-1]`` so the sizes round-trip exactly.
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        out_channels: int,
        width: int | None = None,
    ):
        super().__init__()
        if len(channels) != len(strides) or len(channels) < 2:
            raise ValueError(
                f"channels {tuple(channels)} and strides {tuple(strides)} must describe the same "
                "pyramid of at least two levels."
            )
        if out_channels < 1:
            raise ValueError(f"out_channels must be at least 1, got {out_channels}.")
        if width is None:
            width = max(channels[0] // 2, 1)
        if width < 1:
            raise ValueError(f"decoder width must be at least 1, got {width}.")
        self.channels = tuple(channels)
        self.strides = tuple(strides)
        self.out_channels = out_channels
        self.width = width

        levels = len(channels)
        widths = [width * 2**i for i in range(levels - 1)]
        # blocks[i] produces level i from level i+1 (decoded) and the encoder's level-i skip.
        self.blocks = nn.ModuleList(
            DecoderBlock(
                channels[i + 1] if i == levels - 2 else widths[i + 1],
                channels[i],
                widths[i],
            )
            for i in range(levels - 1)
        )
        self.output = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.blocks) + 1:
            raise ValueError(f"expected {len(self.blocks) + 1} feature maps, got {len(features)}.")
        x = features[-1]
        for i in reversed(range(len(self.blocks))):
            x = self.blocks[i](x, features[i])
        if self.strides[0] > 1:
            x = F.interpolate(x, scale_factor=self.strides[0], mode="nearest")
        return self.output(x)
