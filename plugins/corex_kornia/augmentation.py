"""The module every corex_kornia pipeline builds: kornia ops applied to a batch dict."""

from __future__ import annotations

from collections.abc import Callable

import kornia.augmentation as K
from torch import nn

from corex.interfaces import Batch

# Builds the ops for one image size (height, width); crops that keep the input size need it.
MakeOps = Callable[[int, int], list[K.AugmentationBase2D]]


class BatchAugmentation(nn.Module):
    """Applies kornia ops to ``image`` and ``mask`` with one random draw per sample.

    Geometric ops move image and mask together (kornia resamples masks with nearest
    interpolation); intensity ops touch the image only. Afterwards the image is clamped to
    ``[0, 1]`` and the mask thresholded back to ``{0, 1}`` (some ops, e.g. the elastic transform,
    resample masks bilinearly). Other keys pass through untouched. Random parameters come from
    torch's global RNG, so ``torch.manual_seed`` repeats them; the work runs on the batch's device.
    """

    def __init__(self, make_ops: MakeOps, description: str = "") -> None:
        super().__init__()
        self.make_ops = make_ops
        self.description = description
        # Plain dict, not submodules: kornia ops hold no weights, and leaving them out of
        # ``.to(device)`` keeps their random draws on the CPU generator that the seed controls.
        self._sequences: dict[tuple[int, int], K.AugmentationSequential] = {}

    def sequence(self, height: int, width: int) -> K.AugmentationSequential:
        """The kornia pipeline for images of this size (built on first use)."""
        key = (height, width)
        if key not in self._sequences:
            ops = self.make_ops(height, width)
            self._sequences[key] = K.AugmentationSequential(*ops, data_keys=["input", "mask"])
        return self._sequences[key]

    def forward(self, batch: Batch) -> Batch:
        image = batch["image"]
        sequence = self.sequence(*image.shape[-2:])
        out = dict(batch)
        if "mask" in batch:
            mask = batch["mask"]
            image, moved = sequence(image, mask.to(image.dtype))
            out["mask"] = (moved > 0.5).to(mask.dtype)
        else:
            image = sequence(image, data_keys=["input"])
        out["image"] = image.clamp(0.0, 1.0)
        return out

    def extra_repr(self) -> str:
        return self.description


class NoAugmentation(nn.Module):
    """Identity: returns the batch as it came (``augment: none`` switches augmentation off)."""

    def __init__(self) -> None:  # no options (nn.Module's own signature would accept any)
        super().__init__()

    def forward(self, batch: Batch) -> Batch:
        return dict(batch)
